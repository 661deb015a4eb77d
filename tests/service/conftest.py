"""Starts the real service (uvicorn in its own process) on a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from service.launch import free_port, serve  # noqa: F401 - free_port is used by tests
from tests.conftest import RANKING_CONFIG


@contextmanager
def run_service(
    env: dict[str, str],
    timeout: float = 60.0,
    args: Sequence[str] = (),
    log_path: Path | None = None,
) -> Iterator[str]:
    """Runs ``ranker serve`` with ``RANKER_*`` settings and extra CLI ``args``; yields its base
    URL once ready.

    Unless ``env`` says otherwise: one torch thread, and the exact fp32 ``eager`` engine. The
    service's default, ``auto``, serves whichever guard-admitted engine is fastest on the CPU
    at hand (bf16 expert layers where there are bf16 matrix units, within 5e-3 of fp32), so
    tests that compare served numbers with the offline fp32 path or with another process pin
    the engine; the tests of ``auto`` set it explicitly."""
    defaults = {"RANKER_THREADS": "1", "RANKER_BACKEND": "eager"}
    with serve(defaults | env, args, log_path, timeout) as running:
        yield running.url


@pytest.fixture(scope="session")
def service_url(tiny_artifact: Path) -> Iterator[str]:
    with run_service(
        {"RANKER_ARTIFACT": str(tiny_artifact), "RANKER_RANKING_CONFIG": str(RANKING_CONFIG)}
    ) as url:
        yield url
