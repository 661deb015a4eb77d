"""Starts the real service (uvicorn in its own process) on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import RANKING_CONFIG, ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def run_service(
    env: dict[str, str],
    timeout: float = 60.0,
    args: Sequence[str] = (),
    log_path: Path | None = None,
) -> Iterator[str]:
    """Runs ``ranker serve`` with ``RANKER_*`` settings (and extra CLI ``args``); yields its base
    URL once ready. Its output (the JSON logs) goes to ``log_path``, or to a temporary file: a
    pipe nobody reads would block the service once full."""
    port = free_port()
    full_env = os.environ | {"RANKER_THREADS": "1"} | env
    out = open(log_path, "w+") if log_path is not None else tempfile.TemporaryFile("w+")  # noqa: SIM115
    cmd = [sys.executable, "-m", "ranker", "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, *args], cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                out.seek(0)
                raise RuntimeError(f"service exited with {proc.returncode}:\n{out.read()}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("service did not become ready")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.close()


@pytest.fixture(scope="session")
def service_url(tiny_artifact: Path) -> Iterator[str]:
    with run_service(
        {"RANKER_ARTIFACT": str(tiny_artifact), "RANKER_RANKING_CONFIG": str(RANKING_CONFIG)}
    ) as url:
        yield url
