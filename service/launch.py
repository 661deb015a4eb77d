"""Runs ``ranker serve`` as a child process on a free loopback port, for the demo, the
end-to-end tests and the benchmarks: one launcher, so they all start and stop it the same way."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Running:
    url: str
    port: int
    proc: subprocess.Popen


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=1.0) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_until_ready(
    url: str, proc: subprocess.Popen, timeout: float, output: Path | None = None
) -> None:
    """Polls ``url/readyz`` until it answers 200. ``RuntimeError`` when the process exits first
    (with the tail of ``output``, its log, when given) or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not _ready(url):
        if proc.poll() is not None:
            tail = output.read_text()[-4000:] if output is not None else ""
            raise RuntimeError(f"service exited with {proc.returncode}:\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"service did not become ready within {timeout:.0f} s")
        time.sleep(0.1)


@contextmanager
def serve(
    env: dict[str, str],
    args: Sequence[str] = (),
    log_path: Path | None = None,
    timeout: float = 60.0,
    source: Path = ROOT,
) -> Iterator[Running]:
    """Starts the service with ``RANKER_*`` settings in ``env`` (added to this environment) and
    extra CLI ``args``; yields once ``/readyz`` answers 200 and stops it afterwards. Its output
    goes to ``log_path`` or a temporary file: a pipe nobody reads would block it once full.
    ``source``: the source tree to run (another checkout, e.g. an earlier commit to compare
    against; ``python -m`` finds the packages in its working directory first)."""
    port = free_port()
    out = open(log_path, "w+") if log_path is not None else tempfile.TemporaryFile("w+")  # noqa: SIM115
    cmd = [sys.executable, "-m", "ranker", "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, *args],
        cwd=source,
        env=os.environ | env,
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_ready(url, proc, timeout)
        except RuntimeError as e:
            out.seek(0)
            raise RuntimeError(f"{e}\n{out.read()[-4000:]}") from None
        yield Running(url, port, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.close()
