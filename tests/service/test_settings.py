"""Service settings that are computed, not just read."""

from __future__ import annotations

import pytest

from service.settings import Settings, default_threads


@pytest.mark.parametrize("threads", [None, 1, 3])
def test_one_thread_per_worker_unless_set(threads: int | None) -> None:
    """Whatever the host's core count: one intra-op thread (a busy core cost 5-7x throughput
    with one per core, docs/performance.md); an explicit RANKER_THREADS wins (within the usable
    CPUs, here 16)."""
    assert default_threads(Settings(threads=threads), cpus=16) == (threads or 1)


def test_auto_is_the_default_backend() -> None:
    assert Settings().backend == "auto"


def test_the_service_runs_one_thread_when_unset_whatever_it_ran_before(tiny_artifact) -> None:  # noqa: ANN001
    """Start-up sets torch's threads to the default even when the process had more (torch's
    own default is one per core of the host). Read from a new thread, as the forward thread
    reads it: torch keeps a thread's own OpenMP setting once initialised, and a new thread
    takes the process-wide value last set (the lifespan runs in TestClient's portal thread)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from fastapi.testclient import TestClient

    from service.app import create_app
    from tests.conftest import RANKING_CONFIG

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        app = create_app(
            Settings(artifact=tiny_artifact, backend="eager", ranking_config=RANKING_CONFIG)
        )
        with TestClient(app), ThreadPoolExecutor(1) as fresh:
            assert fresh.submit(torch.get_num_threads).result() == 1
    finally:
        torch.set_num_threads(before)


def test_threads_never_exceed_the_cpus_the_process_may_use() -> None:
    """Pinned to one CPU (real affinity, in a child process), ``RANKER_THREADS=2`` runs one
    thread and the default stays one; a cgroup quota of one core does the same (fake tree)."""
    import subprocess
    import sys

    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "from service.settings import Settings, default_threads\n"
        "print(default_threads(Settings(threads=2)), default_threads(Settings()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1"]


def test_a_cgroup_quota_caps_the_threads(tmp_path) -> None:  # noqa: ANN001
    from ranker.cpu import usable_cpus

    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text("0::/pod/c1\n")
    (tmp_path / "sys/fs/cgroup/pod/c1").mkdir(parents=True)
    (tmp_path / "sys/fs/cgroup/pod/c1/cpu.max").write_text("150000 100000\n")  # 1.5 cores
    cpus = usable_cpus(tmp_path, affinity=set(range(16)))
    assert [default_threads(Settings(threads=t), cpus) for t in (None, 1, 2, 8)] == [1, 1, 2, 2]
