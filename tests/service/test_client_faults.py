"""Clients that misbehave at the protocol level, on the real service: what they get, what the
request log and the metrics record. A client must not be able to flood the log with tracebacks
or make its own faults count as server errors."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import RANKING_CONFIG
from tests.service.conftest import run_service

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def logged(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """The service with its JSON log in a file: ``(url, log path)``."""
    log = tmp_path_factory.mktemp("faults") / "service.log"
    env = {"RANKER_ARTIFACT": str(tiny_artifact), "RANKER_RANKING_CONFIG": str(RANKING_CONFIG)}
    with run_service(env, log_path=log) as url:
        yield url, log


def log_lines(log: Path) -> list[dict]:
    out = []
    for line in log.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            out.append({"not_json": line})
    return out


def lines_of(log: Path, request_id: str, timeout: float = 10.0) -> list[dict]:
    """The log lines naming ``request_id`` (waiting for the request line, written after the
    response), plus any line that is not JSON."""
    deadline = time.monotonic() + timeout
    while True:
        lines = log_lines(log)
        mine = [x for x in lines if x.get("request_id") == request_id or "not_json" in x]
        if any(x.get("msg") == "request" for x in mine) or time.monotonic() > deadline:
            return mine
        time.sleep(0.05)


def test_deep_nesting_is_a_422_and_one_log_line(logged: tuple) -> None:
    url, log = logged
    for i in range(3):
        r = httpx.post(
            f"{url}/v1/rank",
            content=b"[" * 2000,
            headers={"content-type": "application/json", "x-request-id": f"deep-{i}"},
            timeout=30,
        )
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["body"]
        mine = lines_of(log, f"deep-{i}")
        assert len(mine) == 1, mine
        assert mine[0]["level"] == "info" and mine[0]["status"] == 422 and "exc" not in mine[0]
    assert "RecursionError" not in log.read_text()


def test_a_client_that_disconnects_mid_body_is_a_499_not_a_500(logged: tuple) -> None:
    url, log = logged
    port = int(url.rsplit(":", 1)[1])
    for i in range(2):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(
                b"POST /v1/rank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 5000\r\nX-Request-ID: gone-%d\r\n\r\n"
                % i
                + b'{"user_id": 1, "candidates": ['
            )
            time.sleep(0.2)  # the service is reading the body when the client leaves
        mine = lines_of(log, f"gone-{i}")
        assert [x.get("status") for x in mine] == [499], mine
        assert mine[0]["level"] == "info" and "exc" not in mine[0]
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'ranker_requests_total{endpoint="/v1/rank",method="POST",status="499"} 2.0' in metrics
    assert 'status="500"' not in metrics
    assert "ClientDisconnect" not in log.read_text()
