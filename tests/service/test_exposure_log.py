"""The exposure and event logs against the real service: what ``POST /v1/rank`` answered and what
``POST /v1/events`` accepted, read back from the Parquet files the service wrote."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ranker.exposure import EVENT_SCHEMA, EXPOSURE_SCHEMA, check_schema
from service.launch import serve
from tests.conftest import RANKING_CONFIG
from tests.service.test_serve_cli import assert_one_line_error
from tests.service.test_serve_cli import serve as serve_once

pytestmark = pytest.mark.slow

NAME = re.compile(r"(exposures|events)-\d{8}T\d{6}\.\d{6}Z-p\d+-\d{6}\.parquet")


def env_for(artifact: Path, directory: Path, **settings: Any) -> dict[str, str]:
    env = {
        "RANKER_ARTIFACT": str(artifact),
        "RANKER_RANKING_CONFIG": str(RANKING_CONFIG),
        "RANKER_THREADS": "1",
        "RANKER_BACKEND": "eager",
        "RANKER_EXPOSURE_DIR": str(directory),
    }
    return env | {f"RANKER_{k.upper()}": str(v) for k, v in settings.items()}


def complete_files(directory: Path) -> list[Path]:
    """The log's complete files (the hidden temporary names excluded), by name."""
    return sorted(p for p in directory.iterdir() if not p.name.startswith("."))


def read_log(directory: Path, schema: pa.Schema) -> pa.Table:
    files = complete_files(directory)
    for f in files:
        assert NAME.fullmatch(f.name), f.name
        check_schema(pq.read_schema(f), schema, str(f))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else schema.empty_table()


def rank_bodies(world: Path, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` requests: random users, candidates and contexts; some with top_k, some with a time."""
    rng = np.random.default_rng(seed)
    videos = pq.read_table(world / "videos.parquet").column("video_id").to_numpy()
    users = pq.read_table(world / "users.parquet").column("user_id").to_numpy()
    bodies = []
    for i in range(n):
        body: dict[str, Any] = {
            "user_id": int(rng.choice(users)) if i % 7 else 10**12 + i,  # some unknown users
            "context": {"device": ["ios", "android", "web"][i % 3], "hour": int(i % 24)},
            "candidates": [
                {"video_id": int(v)}
                for v in rng.choice(videos, size=int(rng.integers(1, 40)), replace=False)
            ],
        }
        if i % 2:
            body["top_k"] = int(rng.integers(1, 8))
        if i % 3 == 0:
            body["time"] = 1000.0 + i
        bodies.append(body)
    return bodies


def test_exposures_are_the_responses_and_sigterm_writes_them(
    tiny_artifact: Path, tiny_world: Path, tmp_path: Path
) -> None:
    """Every returned candidate, row for row; nothing written before SIGTERM (the rotation
    limits are far away), everything after it, and the process exits 0."""
    bodies = rank_bodies(tiny_world, 40)
    answers: list[tuple[dict[str, Any], dict[str, Any], str, float, float]] = []
    with serve(env_for(tiny_artifact, tmp_path, exposure_rotate_s=3600)) as running:
        with httpx.Client(base_url=running.url, timeout=30) as client:
            for i, body in enumerate(bodies):
                headers = {"X-Request-ID": f"client-{i}"} if i % 4 == 0 else {}
                before = time.time()
                r = client.post("/v1/rank", json=body, headers=headers)
                after = time.time()
                assert r.status_code == 200, r.text
                answers.append((body, r.json(), r.headers["x-request-id"], before, after))
        assert complete_files(tmp_path / "exposures") == []  # all pending in memory
        proc = running.proc
    assert proc.returncode == 0

    table = read_log(tmp_path / "exposures", EXPOSURE_SCHEMA)
    unit = json.loads((tiny_artifact / "config.json").read_text())["data"]["time_unit_s"]
    rows = table.to_pylist()
    assert len(rows) == sum(len(a[1]["items"]) for a in answers)
    by_request: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_request.setdefault(row["request_id"], []).append(row)
    assert len(by_request) == len(answers)
    for i, (body, res, request_id, before, after) in enumerate(answers):
        if i % 4 == 0:
            assert request_id == f"client-{i}"
        got = sorted(by_request[request_id], key=lambda r: r["position"])
        assert [r["position"] for r in got] == list(range(len(res["items"])))
        assert [r["video_id"] for r in got] == [it["video_id"] for it in res["items"]]
        assert [r["score"] for r in got] == [float(np.float32(it["score"])) for it in res["items"]]
        for r, it in zip(got, res["items"], strict=True):
            assert dict(r["predictions"]) == {
                k: float(np.float32(v)) for k, v in it["predictions"].items()
            }
            assert r["user_id"] == body["user_id"]
            assert json.loads(r["context"]) == body["context"]
            assert r["model_version"] == res["model_version"]
            assert r["ranking_version"] == res["ranking_version"]
            assert r["degraded"] is res["degraded"] is False
            assert r["variant"] is None
            if "time" in body:
                assert r["time"] == body["time"]
            else:
                assert before / unit - 1e-6 <= r["time"] <= after / unit + 1e-6


def test_events_are_logged_once_and_the_404_stays_without_a_log(
    tiny_artifact: Path, tmp_path: Path, service_url: str
) -> None:
    """A model without live counters: the event log takes every event once (a retried batch and
    a repeat inside a batch are duplicates); without the log the endpoint still answers 404."""
    assert httpx.post(f"{service_url}/v1/events", json={"events": []}).status_code == 422
    one = {"event_id": "x", "user_id": 1, "video_id": 2, "type": "click", "time": 1.0}
    assert httpx.post(f"{service_url}/v1/events", json={"events": [one]}).status_code == 404

    events = [
        {
            "event_id": f"e{i}",
            "user_id": i % 5,
            "video_id": 100 + i,
            "type": ["impression", "click", "like", "watch_seconds"][i % 4],
            "time": 50.0 + i,
            "value": 1.0 if i % 4 != 3 else 12.5,
            **({"request_id": f"req-{i // 4}"} if i % 5 else {}),
        }
        for i in range(20)
    ]
    with serve(env_for(tiny_artifact, tmp_path)) as running:
        url = running.url
        before = time.time()
        r = httpx.post(f"{url}/v1/events", json={"events": events[:12]})
        assert r.status_code == 200 and r.json() == {"accepted": 12, "duplicates": 0}
        r = httpx.post(f"{url}/v1/events", json={"events": events[8:] + [events[15]]})
        assert r.status_code == 200 and r.json() == {"accepted": 8, "duplicates": 5}
        r = httpx.post(f"{url}/v1/events", json={"events": events[:12]})  # a retry
        assert r.status_code == 200 and r.json() == {"accepted": 0, "duplicates": 12}
        bad = [events[0] | {"request_id": ""}]
        r = httpx.post(f"{url}/v1/events", json={"events": bad})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "request_id"
        after = time.time()
        # Past its deadline (a wait of 0 s: the ranking never ran) the request order is shown,
        # and logged as shown: no scores, no predictions, degraded.
        body = {"user_id": 1, "candidates": [{"video_id": v} for v in (5, 3, 9)], "top_k": 2}
        late = httpx.post(f"{url}/v1/rank", json=body, headers={"X-Request-Deadline-Ms": "1e-6"})
        assert late.status_code == 200 and late.json()["degraded"] is True
    shown = read_log(tmp_path / "exposures", EXPOSURE_SCHEMA).to_pylist()
    assert [(r["video_id"], r["position"]) for r in shown] == [(5, 0), (3, 1)]
    assert all(np.isnan(r["score"]) and r["predictions"] == [] and r["degraded"] for r in shown)
    assert {r["request_id"] for r in shown} == {late.headers["x-request-id"]}
    table = read_log(tmp_path / "events", EVENT_SCHEMA)
    rows = sorted(table.to_pylist(), key=lambda r: int(r["event_id"][1:]))
    assert [r["event_id"] for r in rows] == [e["event_id"] for e in events]
    for r, e in zip(rows, events, strict=True):
        assert r["request_id"] == e.get("request_id")
        assert (r["user_id"], r["video_id"], r["type"]) == (e["user_id"], e["video_id"], e["type"])
        assert (r["time"], r["value"]) == (e["time"], e["value"])
        assert before <= r["received"] <= after


def test_files_rotate_by_rows_and_by_age(
    tiny_artifact: Path, tiny_world: Path, tmp_path: Path
) -> None:
    bodies = [b | {"top_k": 3} for b in rank_bodies(tiny_world, 24, seed=1)]
    shown = 0
    env = env_for(tiny_artifact, tmp_path / "rows", exposure_rotate_rows=6)
    with serve(env) as running, httpx.Client(base_url=running.url, timeout=30) as client:
        for body in bodies:
            r = client.post("/v1/rank", json=body)
            assert r.status_code == 200
            shown += len(r.json()["items"])
    files = complete_files(tmp_path / "rows" / "exposures")
    sizes = [pq.read_metadata(f).num_rows for f in files]
    assert len(files) >= 3 and sum(sizes) == shown
    assert all(n >= 6 for n in sizes[:-1]), sizes  # complete at 6 rows; the last one at SIGTERM
    sequence = [int(f.stem.rsplit("-", 1)[1]) for f in files]
    assert sequence == sorted(sequence) == list(range(1, len(files) + 1))  # names sort by time

    with serve(env_for(tiny_artifact, tmp_path / "age", exposure_rotate_s=0.3)) as running:
        directory = tmp_path / "age" / "exposures"
        with httpx.Client(base_url=running.url, timeout=30) as client:
            for round_ in (1, 2):
                assert client.post("/v1/rank", json=bodies[round_]).status_code == 200
                deadline = time.monotonic() + 20
                while len(complete_files(directory)) < round_:  # no more requests: age alone
                    assert time.monotonic() < deadline, "no file after its age limit"
                    time.sleep(0.05)
                assert len(complete_files(directory)) == round_
    assert [pq.read_metadata(f).num_rows for f in complete_files(directory)] == [3, 3]


@contextmanager
def in_process_service(settings: Any) -> Iterator[str]:
    """The real app under a real uvicorn server, in a thread of this process: the test can
    then stall the log writer itself (``test_a_full_queue_drops_and_counts``)."""
    import torch
    import uvicorn

    from service.app import create_app
    from tests.service.conftest import free_port

    threads = torch.get_num_threads()
    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="error")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the service did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)
        torch.set_num_threads(threads)


def test_a_full_queue_drops_and_counts_without_blocking(
    tiny_artifact: Path, tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer is stalled (its table building waits on a gate) and the queue holds 2
    records: requests keep answering 200, the records that do not fit are dropped and counted,
    and what was written plus what was dropped is everything shown."""
    import service.exposure_log as exposure_log
    from service.settings import Settings

    gate = threading.Event()
    real = exposure_log.exposure_table

    def stalled(records: Any) -> pa.Table:
        gate.wait(120)
        return real(records)

    monkeypatch.setattr(exposure_log, "exposure_table", stalled)
    settings = Settings(
        artifact=tiny_artifact,
        ranking_config=RANKING_CONFIG,
        backend="eager",
        threads=1,
        exposure_dir=tmp_path,
        exposure_queue_size=2,
    )
    bodies = [b | {"top_k": 2} for b in rank_bodies(tiny_world, 12, seed=2)]
    shown = 0
    with in_process_service(settings) as url:
        with httpx.Client(base_url=url, timeout=10) as client:  # a blocked put would time out
            for body in bodies:
                r = client.post("/v1/rank", json=body)
                assert r.status_code == 200
                shown += len(r.json()["items"])
            metrics = client.get("/metrics").text
        dropped = _metric(metrics, 'ranker_exposure_dropped_rows_total{log="exposures"}')
        assert shown - 3 * 2 <= dropped < shown  # at most 1 taken + 2 queued records kept
        gate.set()
    written = pq.read_table(tmp_path / "exposures").num_rows
    assert written + dropped == shown


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_bad_setting_is_one_error_line(tiny_artifact: Path, tmp_path: Path) -> None:
    r = serve_once({"RANKER_ARTIFACT": str(tiny_artifact), "RANKER_EXPOSURE_QUEUE_SIZE": "0"})
    assert r.returncode == 2 and r.stderr.startswith("error: RANKER_EXPOSURE_QUEUE_SIZE")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    env = {"RANKER_ARTIFACT": str(tiny_artifact), "RANKER_EXPOSURE_DIR": str(blocked / "logs")}
    assert_one_line_error(serve_once(env), "RANKER_EXPOSURE_DIR", str(blocked))
    assert not os.path.exists(blocked / "logs")


def test_each_exposure_carries_its_response_variant(
    tiny_artifact: Path, tiny_world: Path, tmp_path: Path
) -> None:
    """With variants declared, every exposure row says the variant its response named (the
    A/B report groups the joined log by it)."""
    from tests.service.test_variants_http import _config

    ranking = _config(tmp_path)
    env = env_for(tiny_artifact, tmp_path / "logs") | {"RANKER_RANKING_CONFIG": str(ranking)}
    bodies = rank_bodies(tiny_world, 30, seed=3)
    variants: dict[str, str | None] = {}
    with serve(env) as running, httpx.Client(base_url=running.url, timeout=30) as client:
        for i, body in enumerate(bodies):
            r = client.post("/v1/rank", json=body, headers={"X-Request-ID": f"v-{i}"})
            assert r.status_code == 200, r.text
            variants[f"v-{i}"] = r.json()["variant"]
    assert len(set(variants.values())) > 1  # more than one arm among 30 users
    rows = read_log(tmp_path / "logs" / "exposures", EXPOSURE_SCHEMA).to_pylist()
    assert rows and {r["request_id"] for r in rows} == set(variants)
    for r in rows:
        assert r["variant"] == variants[r["request_id"]]
