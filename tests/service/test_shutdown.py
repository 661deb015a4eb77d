"""Graceful shutdown of the real ``ranker serve`` process: on SIGTERM it stops accepting, finishes
the request in flight and exits 0.

No sleeps decide anything: the request is known to be in flight because the server has answered
its ``Expect: 100-continue`` (uvicorn sends that when the app starts reading the body), and the
listener is known to be closed when a new connection is refused. Only then is the body sent.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from tests.conftest import RANKING_CONFIG, ROOT
from tests.service.conftest import free_port

pytestmark = pytest.mark.slow


def read_until(sock: socket.socket, marker: bytes, deadline: float) -> bytes:
    data = b""
    while marker not in data:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_sigterm_finishes_the_request_in_flight_and_exits_0(
    tiny_artifact: Path, tiny_world: Path, tmp_path: Path
) -> None:
    port = free_port()
    env = os.environ | {
        "RANKER_ARTIFACT": str(tiny_artifact),
        "RANKER_RANKING_CONFIG": str(RANKING_CONFIG),
        "RANKER_THREADS": "1",
    }
    log = open(tmp_path / "service.log", "w+")  # noqa: SIM115 - the process's lifetime
    cmd = [sys.executable, "-m", "ranker", "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "service.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the service did not become ready"
            time.sleep(0.1)

        videos = pq.read_table(tiny_world / "videos.parquet").column("video_id").to_numpy()
        body = json.dumps(
            {
                "user_id": 1,
                "context": {"device": "ios", "hour": 20},
                "candidates": [{"video_id": int(v)} for v in videos],
            }
        ).encode()
        head = (
            f"POST /v1/rank HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Expect: 100-continue\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(head)
            deadline = time.monotonic() + 15
            assert b"100 Continue" in read_until(sock, b"\r\n\r\n", deadline)

            proc.send_signal(signal.SIGTERM)  # the request is in flight: its body is awaited
            while True:  # the listener closes: new connections are refused
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except ConnectionRefusedError:
                    break
                assert time.monotonic() < deadline, "still accepting after SIGTERM"
                time.sleep(0.05)
            assert proc.poll() is None, "exited with a request in flight"

            sock.sendall(body)
            response = b""
            sock.settimeout(15)
            while chunk := sock.recv(65536):  # the server closes the connection after it
                response += chunk
        status, _, rest = response.partition(b"\r\n")
        assert status == b"HTTP/1.1 200 OK", response[:500]
        items = json.loads(rest.partition(b"\r\n\r\n")[2])["items"]
        assert len(items) == len(videos)
        assert proc.wait(timeout=30) == 0, (tmp_path / "service.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
