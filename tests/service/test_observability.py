"""Metrics, request ids and request logs: unit checks of the pieces, then the real service
(uvicorn in a subprocess) scraped before and after a few requests, with one and two workers."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from ranker.artifact import load_artifact
from ranker.cli import main
from ranker.config import TaskSpec
from ranker.errors import ConfigError
from service.logs import logging_config
from service.observability import (
    PROBABILITY_BUCKETS,
    VALUE_BUCKETS,
    Observability,
    VectorHistogram,
    _Exchange,
    _outcome,
    prediction_buckets,
)
from service.store import Lookup
from tests.conftest import RANKING_CONFIG
from tests.service.conftest import run_service

STAGES = ("decode", "features", "forward", "combine", "encode")
LOG_FIELDS = {
    "ts", "level", "logger", "pid", "msg", "request_id", "method", "path", "status",
    "latency_ms", "candidates", "model_version", "ranking_version", "degraded", "user_known",
    "unknown_videos", "unknown_context", "stages_ms", "variant",
}  # fmt: skip


# --- units --------------------------------------------------------------------------------------


def _samples(registry: CollectorRegistry, name: str) -> dict[tuple, float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for m in registry.collect()
        for s in m.samples
        if s.name.startswith(name) and not s.name.endswith("_created")
    }


def test_vector_histogram_equals_observe() -> None:
    bounds = (-1.0, 0.0, 0.5, 1.0, 2.0)
    values = np.array([-3.0, -1.0, 0.0, 0.25, 0.5, 0.5, 1.0, 1.5, 2.0, 7.0, np.inf, np.nan])
    one, many = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("h", "per value", buckets=bounds, registry=one)
    h2 = Histogram("h", "vector", buckets=bounds, registry=many)
    for v in values[~np.isnan(values)][:-1]:  # observe() would make the sum inf/nan: skip those
        h1.observe(float(v))
    h1.observe(float("inf"))
    vector = VectorHistogram(h2)
    vector.observe(values[:6])
    vector.observe(values[6:])
    assert _samples(many, "h") != _samples(one, "h")  # pending until flushed
    vector.flush()
    assert _samples(many, "h") == _samples(one, "h")
    vector.flush()  # nothing pending: no change
    assert _samples(many, "h") == _samples(one, "h")


def test_prediction_buckets_fit_each_head() -> None:
    click = TaskSpec(name="click", kind="binary", label="click", loss="bce")
    watch = TaskSpec(name="watch", kind="regression", label="w", loss="mse_log1p")
    stars = TaskSpec(
        name="rating", kind="regression", label="r", loss="ordinal", levels=5, value_range=(1, 5)
    )
    assert prediction_buckets(click) == PROBABILITY_BUCKETS and PROBABILITY_BUCKETS[-1] == 1.0
    assert prediction_buckets(watch) == VALUE_BUCKETS
    b = prediction_buckets(stars)
    assert b[0] == 1.0 and b[-1] == 5.0 and len(b) == 17


def test_unknown_log_level_is_refused_naming_the_setting() -> None:
    with pytest.raises(ConfigError, match="log_level"):
        logging_config("loud")
    assert logging_config("debug")["loggers"]["ranker"]["level"] == "DEBUG"


def test_serve_refuses_zero_workers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err


def _fake_exchange(  # noqa: ANN202
    degraded: str | None,
    user_missing: bool,
    videos_missing: list[bool],
    unknown_context: tuple[str, ...] = (),
):
    n = len(videos_missing)
    task = TaskSpec(name="click", kind="binary", label="click", loss="bce")
    model = SimpleNamespace(
        version="m1",
        artifact=SimpleNamespace(config=SimpleNamespace(tasks=[task])),
        predictor=SimpleNamespace(backend="eager", selection=None),
    )
    ranked = SimpleNamespace(
        scores=np.zeros(2),
        predictions={},
        all_scores=np.linspace(0, 1, n),
        all_predictions={"click": np.full(n, 0.2)},
        lookup=Lookup(None, None, user_missing, np.array(videos_missing), degraded),  # type: ignore[arg-type]
        timings={"features": 0.001, "forward": 0.002, "combine": 0.0001},
        started=10.001,
        unknown_context=unknown_context,
        variant=None,
    )
    ex = _Exchange("id", 10.0, status=200, responded=10.01, ranked=ranked, ranked_at=10.005)  # type: ignore[arg-type]
    ex.model, ex.formula = model, SimpleNamespace(version="r1")  # type: ignore[assignment]
    return ex


def test_degraded_responses_are_counted_apart_from_unknown_ids() -> None:
    obs = Observability()
    for ex in (
        _fake_exchange(None, True, [True, False, True], ("hour",)),  # user, 2 videos, hour
        _fake_exchange("feature store: Redis unreachable", True, [True, True, True]),
    ):
        obs.observe("/v1/rank", "POST", ex, _outcome(ex), 10.02)
    obs.flush()
    reg = obs.registry
    assert reg is not None
    assert reg.get_sample_value("ranker_unknown_users_total") == 1
    assert reg.get_sample_value("ranker_unknown_videos_total") == 2
    assert reg.get_sample_value("ranker_degraded_responses_total") == 1
    assert reg.get_sample_value("ranker_unknown_context_values_total", {"feature": "hour"}) == 1
    assert reg.get_sample_value("ranker_prediction_click_count") == 6
    assert reg.get_sample_value("ranker_model_info", {"version": "m1"}) == 1
    assert reg.get_sample_value("ranker_ranking_config_info", {"version": "r1"}) == 1
    for stage in STAGES:
        assert reg.get_sample_value("ranker_stage_duration_seconds_count", {"stage": stage}) == 2
    decode = reg.get_sample_value("ranker_stage_duration_seconds_sum", {"stage": "decode"})
    assert decode == pytest.approx(2 * 0.001)
    obs.set_versions("m2", "r1")  # a reload: the old version drops to 0
    assert reg.get_sample_value("ranker_model_info", {"version": "m1"}) == 0
    assert reg.get_sample_value("ranker_model_info", {"version": "m2"}) == 1


# --- the real service ---------------------------------------------------------------------------

slow = pytest.mark.slow  # the tests below start real services


def scrape(url: str) -> dict[tuple, float]:
    """``(sample name, sorted labels) -> value`` from ``GET /metrics``."""
    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(metrics: dict[tuple, float], name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def rank_body(world: Path, n: int, user_id: int | None = None) -> dict:
    log = pq.read_table(world / "log").slice(0, 400)
    videos = np.unique(log.column("video_id").to_numpy())[:n]
    return {
        "user_id": int(log.column("user_id")[0].as_py()) if user_id is None else user_id,
        "context": {"device": "ios", "hour": 13},
        "candidates": [{"video_id": int(v)} for v in videos],
    }


def log_lines(file: Path, wanted: int, /, **match: object) -> list[dict]:
    """The request log lines matching ``match``, waiting a little for ``wanted`` of them: a
    line is written just after its response is sent."""
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(x) for x in file.read_text().splitlines() if x.startswith("{")]
        found = [
            x
            for x in lines
            if x.get("logger") == "ranker.access" and all(x.get(k) == v for k, v in match.items())
        ]
        if len(found) >= wanted or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@pytest.fixture(scope="module")
def observed(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """One service of our own (the session one's output is not kept): ``(url, log path)``."""
    log = tmp_path_factory.mktemp("observed") / "service.log"
    env = {
        "RANKER_ARTIFACT": str(tiny_artifact),
        "RANKER_RANKING_CONFIG": str(RANKING_CONFIG),
        "RANKER_LOG_LEVEL": "info",
    }
    with run_service(env, log_path=log) as url:
        yield url, log


@slow
def test_metrics_move_with_requests(observed: tuple, tiny_world: Path, tiny_artifact: Path) -> None:
    url, _ = observed
    heads = load_artifact(tiny_artifact).config.task_names
    before = scrape(url)
    bodies = [rank_body(tiny_world, 30), rank_body(tiny_world, 20) | {"top_k": 5}]
    unknown = rank_body(tiny_world, 10, user_id=10**12)
    unknown["candidates"] += [{"video_id": 10**12 + 1}, {"video_id": 10**12 + 2}]
    bodies.append(unknown)
    for body in bodies:
        assert httpx.post(f"{url}/v1/rank", json=body, timeout=10).status_code == 200
    assert httpx.post(f"{url}/v1/rank", json={"user_id": 1}, timeout=10).status_code == 422
    scored = 30 + 20 + 12  # top_k returns 5, but all 20 were scored and observed
    rank_ok = {"endpoint": "/v1/rank", "method": "POST", "status": "200"}

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    deadline = time.monotonic() + 5  # a request is counted just after its response is sent
    while True:
        after = scrape(url)
        if delta("ranker_requests_total", **(rank_ok | {"status": "422"})) or (
            time.monotonic() > deadline
        ):
            break
        time.sleep(0.05)
    assert delta("ranker_requests_total", **rank_ok) == 3
    assert delta("ranker_requests_total", **(rank_ok | {"status": "422"})) == 1
    assert delta("ranker_request_duration_seconds_count", endpoint="/v1/rank") == 4
    assert delta("ranker_candidates_count") == 3
    assert delta("ranker_candidates_sum") == scored
    assert delta("ranker_candidates_bucket", le="10.0") == 0
    assert delta("ranker_candidates_bucket", le="25.0") == 2  # cumulative: the 20 and the 12
    for head in heads:
        assert delta(f"ranker_prediction_{head}_count") == scored, head
        assert delta(f"ranker_prediction_{head}_bucket", le="+Inf") == scored, head
    assert delta("ranker_prediction_click_sum") > 0
    assert delta("ranker_score_count") == scored
    for stage in STAGES:
        assert delta("ranker_stage_duration_seconds_count", stage=stage) == 3, stage
        assert delta("ranker_stage_duration_seconds_sum", stage=stage) > 0, stage
    assert delta("ranker_unknown_users_total") == 1
    assert delta("ranker_unknown_videos_total") == 2
    assert delta("ranker_degraded_responses_total") == 0
    ready = httpx.get(f"{url}/readyz").json()
    assert value(after, "ranker_model_info", version=ready["model_version"]) == 1
    assert value(after, "ranker_ranking_config_info", version=ready["ranking_version"]) == 1
    assert delta("ranker_requests_total", endpoint="/metrics", method="GET", status="200") >= 1
    assert "/metrics" not in httpx.get(f"{url}/openapi.json").json()["paths"]


@slow
def test_request_id_is_returned_given_or_generated(observed: tuple) -> None:
    url, _ = observed
    given = httpx.get(f"{url}/healthz", headers={"X-Request-ID": "trace-42.a:b"})
    assert given.headers["x-request-id"] == "trace-42.a:b"
    generated = {httpx.get(f"{url}/healthz").headers["x-request-id"] for _ in range(2)}
    assert len(generated) == 2 and all(re.fullmatch(r"[0-9a-f]{32}", g) for g in generated)
    junk = httpx.get(f"{url}/healthz", headers={"X-Request-ID": "x" * 200})
    assert re.fullmatch(r"[0-9a-f]{32}", junk.headers["x-request-id"])
    missing = httpx.get(f"{url}/no/such/path", headers={"X-Request-ID": "on-a-404"})
    assert missing.status_code == 404 and missing.headers["x-request-id"] == "on-a-404"


@slow
def test_one_log_line_per_request_without_the_payload(
    observed: tuple, tiny_world: Path, tiny_artifact: Path
) -> None:
    url, log = observed
    body = rank_body(tiny_world, 25, user_id=987654321)
    body["candidates"] += [{"video_id": 555000111}, {"video_id": 555000222}]  # unknown ids
    r = httpx.post(f"{url}/v1/rank", json=body, headers={"X-Request-ID": "log-ok"}, timeout=10)
    assert r.status_code == 200
    bad = httpx.post(f"{url}/v1/rank", json={"user_id": 5}, headers={"X-Request-ID": "log-422"})
    assert bad.status_code == 422
    [ok] = log_lines(log, 1, request_id="log-ok")
    [err] = log_lines(log, 1, request_id="log-422")
    assert set(ok) == LOG_FIELDS and set(err) == LOG_FIELDS
    assert ok["method"] == "POST" and ok["path"] == "/v1/rank" and ok["status"] == 200
    assert ok["candidates"] == 27 and ok["degraded"] is False and ok["user_known"] is False
    assert ok["unknown_videos"] == 2
    assert ok["model_version"] == r.json()["model_version"] == tiny_artifact.name
    assert ok["latency_ms"] > 0 and set(ok["stages_ms"]) == set(STAGES)
    assert ok["level"] == "info" and ok["msg"] == "request"
    assert err["status"] == 422 and err["candidates"] is None
    assert err["model_version"] == ok["model_version"]  # what was served when it came
    text = log.read_text()
    assert "987654321" not in text and "555000111" not in text  # the body's ids
    assert "video_id" not in text and '"ios"' not in text  # nor its keys or context
    # probes are quiet at info level; every line of the output is JSON (warnings included)
    assert not log_lines(log, 0, path="/healthz")
    assert all(json.loads(x) for x in text.splitlines())


@slow
def test_two_workers_add_up(tiny_artifact: Path, tiny_world: Path, tmp_path: Path) -> None:
    mp_dir = tmp_path / "metrics"
    mp_dir.mkdir()
    (mp_dir / "counter_999999.db").write_bytes(b"stale")  # an earlier run's: removed at start
    log = tmp_path / "service.log"
    env = {
        "RANKER_ARTIFACT": str(tiny_artifact),
        "RANKER_RANKING_CONFIG": str(RANKING_CONFIG),
        "RANKER_LOG_LEVEL": "info",
        "PROMETHEUS_MULTIPROC_DIR": str(mp_dir),
    }
    body = rank_body(tiny_world, 10)
    sent = 0
    with run_service(env, args=["--workers", "2"], log_path=log) as url:

        def post(_: int) -> int:
            return httpx.post(f"{url}/v1/rank", json=body, timeout=20).status_code

        pids: set[int] = set()
        deadline = time.monotonic() + 60
        with ThreadPoolExecutor(4) as pool:
            while len(pids) < 2:  # until both workers have served (the second may start later)
                assert time.monotonic() < deadline, f"only worker(s) {pids} served"
                assert set(pool.map(post, range(16))) == {200}
                sent += 16
                pids = {x["pid"] for x in log_lines(log, sent, path="/v1/rank")}
        # Each worker flushes its prediction histograms within a second; counters at once.
        deadline = time.monotonic() + 10
        while True:
            m = scrape(url)
            done = value(m, "ranker_prediction_click_count") == sent * 10
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        ok = {"endpoint": "/v1/rank", "method": "POST", "status": "200"}
        assert value(m, "ranker_requests_total", **ok) == sent
        assert value(m, "ranker_candidates_count") == sent
        assert value(m, "ranker_candidates_sum") == sent * 10
        assert value(m, "ranker_stage_duration_seconds_count", stage="forward") == sent
        assert value(m, "ranker_prediction_click_count") == sent * 10
        assert value(m, "ranker_score_count") == sent * 10
        model = httpx.get(f"{url}/readyz").json()["model_version"]
        assert value(m, "ranker_model_info", version=model) == 1
        written = {int(p.stem.rsplit("_", 1)[1]) for p in mp_dir.glob("counter_*.db")}
        assert pids <= written and 999999 not in written
    # Both workers shut down and marked themselves dead: no live gauge files are left.
    assert not list(mp_dir.glob("gauge_live*.db"))
