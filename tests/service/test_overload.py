"""Overload on the real service (uvicorn, HTTP): past ``RANKER_MAX_IN_FLIGHT`` an immediate 503
with ``Retry-After``, never a queue and never another 5xx; past a request's deadline an answer
on time in the request's order, marked degraded. Requests are held in flight by a gate on the
forward pass (``tests/service/gated_app.py``), not by timing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from service.launch import ROOT, free_port, wait_until_ready
from tests.conftest import RANKING_CONFIG
from tests.service.gated_app import GATE_ENV

pytestmark = pytest.mark.slow

BOUND = 3


class Gated:
    def __init__(self, url: str, gate: Path) -> None:
        self.url = url
        self.gate = gate

    def close(self) -> None:
        self.gate.touch()

    def open(self) -> None:
        self.gate.unlink(missing_ok=True)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def wait_in_flight(self, n: int, timeout: float = 30.0) -> None:
        """Until the worker reports ``n`` rank requests in flight (polls /metrics)."""
        end = time.monotonic() + timeout
        while self.metric("ranker_rank_in_flight") != n:
            assert time.monotonic() < end, f"never {n} requests in flight"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def gated(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gated]:
    """The gated service under uvicorn, bound ``BOUND``, one torch thread, eager engine."""
    tmp = tmp_path_factory.mktemp("overload")
    gate = tmp / "gate"
    port = free_port()
    env = os.environ | {
        "RANKER_ARTIFACT": str(tiny_artifact),
        "RANKER_RANKING_CONFIG": str(RANKING_CONFIG),
        "RANKER_THREADS": "1",
        "RANKER_BACKEND": "eager",
        "RANKER_MAX_IN_FLIGHT": str(BOUND),
        GATE_ENV: str(gate),
    }
    cmd = [sys.executable, "-m", "uvicorn", "tests.service.gated_app:create", "--factory"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_ready(url, proc, 60.0)
            yield Gated(url, gate)
        finally:
            gate.unlink(missing_ok=True)
            proc.terminate()
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def body(tiny_world: Path) -> dict:
    videos = pq.read_table(tiny_world / "videos.parquet").column("video_id").to_numpy()
    return {
        "user_id": 1,
        "context": {"device": "ios", "hour": 20},
        "candidates": [{"video_id": int(v)} for v in videos[:20][::-1]],
    }


def rank(url: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/rank", json=body, headers=headers, timeout=60)


def test_past_the_bound_an_immediate_503_with_retry_after(gated: Gated, body: dict) -> None:
    gated.close()
    shed_before = gated.metric("ranker_shed_requests_total")
    with ThreadPoolExecutor(BOUND) as pool:
        try:
            held = [pool.submit(rank, gated.url, body) for _ in range(BOUND)]
            gated.wait_in_flight(BOUND)
            refused = [rank(gated.url, body) for _ in range(2)]  # answered while BOUND are held
            alive = httpx.get(f"{gated.url}/healthz", timeout=10)
        finally:
            gated.open()
        answers = [f.result() for f in held]
    for r in refused:
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert "RANKER_MAX_IN_FLIGHT" in r.json()["detail"]
    assert alive.status_code == 200  # probes are never refused
    assert [r.status_code for r in answers] == [200] * BOUND
    assert not any(r.json()["degraded"] for r in answers)
    assert gated.metric("ranker_shed_requests_total") == shed_before + 2
    assert gated.metric('ranker_requests_total{endpoint="/v1/rank",method="POST",status="503"}')
    # the bound is on requests in flight, not a quota: once they finish, requests are admitted
    gated.wait_in_flight(0)
    assert rank(gated.url, body).status_code == 200
    text = httpx.get(f"{gated.url}/metrics", timeout=10).text
    statuses = set(re.findall(r'^ranker_requests_total\{.*status="(\d+)"', text, re.M))
    assert {s for s in statuses if s.startswith("5")} == {"503"}


def test_past_the_deadline_the_request_order_marked_degraded(gated: Gated, body: dict) -> None:
    before = gated.metric("ranker_deadline_fallbacks_total")
    gated.close()  # the ranking cannot finish: the deadline must answer
    try:
        start = time.monotonic()
        r = rank(gated.url, body | {"top_k": 5}, {"X-Request-Deadline-Ms": "300"})
        elapsed = time.monotonic() - start
    finally:
        gated.open()
    assert r.status_code == 200
    out = r.json()
    assert out["degraded"] is True
    assert "deadline" in out["degraded_reason"] and "300 ms" in out["degraded_reason"]
    sent = [c["video_id"] for c in body["candidates"]]
    assert [i["video_id"] for i in out["items"]] == sent[:5]
    assert all(i["score"] is None and i["predictions"] == {} for i in out["items"])
    assert out["user_known"] is None
    assert elapsed >= 0.3  # not before the deadline
    assert gated.metric("ranker_deadline_fallbacks_total") == before + 1
    # with the gate open and a generous deadline the answer is ranked
    gated.wait_in_flight(0)
    ok = rank(gated.url, body, {"X-Request-Deadline-Ms": "30000"}).json()
    assert ok["degraded"] is False
    assert all(isinstance(i["score"], float) for i in ok["items"])
    assert gated.metric("ranker_deadline_fallbacks_total") == before + 1


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan", "inf", "1e9", ""])
def test_a_bad_deadline_header_is_a_422_naming_it(service_url: str, value: str) -> None:
    r = httpx.post(
        f"{service_url}/v1/rank",
        json={"user_id": 1, "candidates": [{"video_id": 1}]},
        headers={"X-Request-Deadline-Ms": value},
        timeout=30,
    )
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["header", "x-request-deadline-ms"]
