"""Service settings that are computed, not just read."""

from __future__ import annotations

import pytest

from service.settings import Settings, default_threads


@pytest.mark.parametrize("threads", [None, 1, 3])
def test_one_thread_per_worker_unless_set(threads: int | None) -> None:
    """Whatever the host's core count: one intra-op thread (a busy core cost 5-7x throughput
    with one per core, docs/performance.md); an explicit RANKER_THREADS wins."""
    assert default_threads(Settings(threads=threads)) == (threads or 1)


def test_auto_is_the_default_backend() -> None:
    assert Settings().backend == "auto"
