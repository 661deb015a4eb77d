"""Service settings that are computed, not just read."""

from __future__ import annotations

import pytest

from service.settings import threads_per_worker


@pytest.mark.parametrize(
    ("workers", "cpus", "threads"),
    [(1, 2, 2), (2, 2, 1), (2, 8, 4), (3, 8, 2), (4, 2, 1), (2, None, 1), (0, 4, 4)],
)
def test_workers_share_the_cores_instead_of_each_taking_all(
    workers: int, cpus: int | None, threads: int
) -> None:
    assert threads_per_worker(workers, cpus) == threads
