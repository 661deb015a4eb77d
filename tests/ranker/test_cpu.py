"""The CPUs a process may use and the CPU's matrix features (``ranker/cpu.py``), read from fake
``/proc`` and ``/sys/fs/cgroup`` trees: the real ones here have no quota to find."""

from __future__ import annotations

from pathlib import Path

import pytest

from ranker.cpu import cgroup_cpu_limit, cpu_features, usable_cpus


def _tree(tmp: Path, cgroup: str, files: dict[str, str], proc_self: str | None = None) -> Path:
    """A fake root: ``proc/self/cgroup`` saying ``cgroup`` and files under ``sys/fs/cgroup``."""
    (tmp / "proc/self").mkdir(parents=True)
    (tmp / "proc/self/cgroup").write_text(proc_self or f"0::{cgroup}\n")
    for rel, text in files.items():
        path = tmp / "sys/fs/cgroup" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp


@pytest.mark.parametrize(
    ("cpu_max", "cores"),
    [("200000 100000", 2.0), ("150000 100000", 1.5), ("50000 100000", 0.5), ("max 100000", None)],
)
def test_cgroup_v2_quota_in_cores(tmp_path: Path, cpu_max: str, cores: float | None) -> None:
    root = _tree(tmp_path, "/kubepods/pod1/c1", {"kubepods/pod1/c1/cpu.max": cpu_max + "\n"})
    assert cgroup_cpu_limit(root) == cores


def test_a_parents_quota_limits_its_children(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        "/kubepods/pod1/c1",
        {
            "cpu.max": "max 100000",
            "kubepods/pod1/cpu.max": "100000 100000",  # the pod: one core
            "kubepods/pod1/c1/cpu.max": "400000 100000",  # the container asks for four
        },
    )
    assert cgroup_cpu_limit(root) == 1.0
    assert usable_cpus(root, affinity=set(range(16))) == 1


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        "",
        {
            "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000",
            "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
        },
        proc_self="4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n",
    )
    assert cgroup_cpu_limit(root) == 3.0
    unlimited = _tree(
        tmp_path / "u",
        "",
        {"cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
        proc_self="4:cpu,cpuacct:/\n",
    )
    assert cgroup_cpu_limit(unlimited) is None


@pytest.mark.parametrize(
    ("affinity", "cpu_max", "usable"),
    [
        (set(range(64)), "200000 100000", 2),  # a 64-core host, a 2-core container
        ({0, 1}, "max 100000", 2),  # pinned to two cores, no quota
        ({3}, "800000 100000", 1),  # pinned to one core: the quota does not add cores
        (set(range(8)), "150000 100000", 2),  # 1.5 cores: two threads stay busy part-time
        (set(range(8)), "10000 100000", 1),  # a tenth of a core: still one
    ],
)
def test_usable_cpus_is_the_tighter_of_affinity_and_quota(
    tmp_path: Path, affinity: set[int], cpu_max: str, usable: int
) -> None:
    root = _tree(tmp_path, "/svc", {"svc/cpu.max": cpu_max})
    assert usable_cpus(root, affinity) == usable


def test_no_cgroup_files_means_affinity_alone(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path) is None
    assert usable_cpus(tmp_path, {0, 1, 2}) == 3


def test_matrix_features_from_cpuinfo(tmp_path: Path) -> None:
    xeon = tmp_path / "xeon"
    xeon.write_text(
        "processor\t: 0\nmodel name\t: Intel Xeon\n"
        "flags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n"
    )
    f = cpu_features(xeon)
    assert f.bf16 and f.amx and f.vnni
    assert f.summary() == "avx2 avx512 avx512_vnni avx512_bf16 amx_bf16 amx_int8"
    old = tmp_path / "old"
    old.write_text("processor\t: 0\nflags\t\t: fpu sse avx avx2 fma\n")
    g = cpu_features(old)
    assert not (g.bf16 or g.amx or g.vnni)
    assert g.summary() == "avx2"
    assert cpu_features(tmp_path / "missing").summary() == "none"
