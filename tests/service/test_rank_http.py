"""End to end: the real service process, real HTTP, the tiny trained artifact."""

from __future__ import annotations

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.service.conftest import run_service

pytestmark = pytest.mark.slow


def sample_request(world, n: int = 30) -> dict:  # noqa: ANN001
    log = pq.read_table(world / "log").slice(0, 400)
    return {
        "user_id": int(log.column("user_id")[0].as_py()),
        "context": {"device": "ios", "hour": 13},
        "candidates": [
            {"video_id": int(v)} for v in np.unique(log.column("video_id").to_numpy())[:n]
        ],
    }


def test_rank_returns_sorted_candidates_with_every_head(service_url: str, tiny_world) -> None:  # noqa: ANN001
    body = sample_request(tiny_world)
    r = httpx.post(f"{service_url}/v1/rank", json=body, timeout=10)
    assert r.status_code == 200, r.text
    out = r.json()
    scores = [i["score"] for i in out["items"]]
    assert scores == sorted(scores, reverse=True)
    assert len(out["items"]) == len(body["candidates"])
    assert {i["video_id"] for i in out["items"]} == {c["video_id"] for c in body["candidates"]}
    for item in out["items"]:
        p = item["predictions"]
        assert set(p) == {"click", "watch_time", "like", "rating"}
        assert 0 <= p["click"] <= 1 and 0 <= p["like"] <= 1
        assert p["watch_time"] >= 0 and 1 <= p["rating"] <= 5
    assert out["user_known"] is True and out["unknown_videos"] == 0
    assert out["model_version"] and out["ranking_version"]


def test_top_k_and_unknown_ids_are_reported(service_url: str, tiny_world) -> None:  # noqa: ANN001
    body = sample_request(tiny_world, 10)
    body["user_id"] = 10**12
    body["candidates"] += [{"video_id": 10**12 + 1}, {"video_id": 10**12 + 2}]
    body["top_k"] = 5
    out = httpx.post(f"{service_url}/v1/rank", json=body, timeout=10).json()
    assert len(out["items"]) == 5
    assert out["user_known"] is False and out["unknown_videos"] == 2


def _unknown_context_counts(url: str) -> dict[str, float]:
    counts = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("ranker_unknown_context_values_total{"):
            labels, value = line.rsplit(" ", 1)
            counts[labels.split('"')[1]] = float(value)
    return counts


def test_context_values_the_model_does_not_know_are_named(service_url: str, tiny_world) -> None:  # noqa: ANN001
    """An unknown device or hour is ranked as if absent: the response and a metric say so."""
    body = sample_request(tiny_world, 10)
    before = _unknown_context_counts(service_url)
    known = httpx.post(f"{service_url}/v1/rank", json=body, timeout=10).json()
    assert known["unknown_context"] == []
    none = httpx.post(f"{service_url}/v1/rank", json=body | {"context": {}}, timeout=10).json()
    assert none["unknown_context"] == []  # left out: the default, as asked
    body["context"] = {"device": "nokia", "hour": 99}
    odd = httpx.post(f"{service_url}/v1/rank", json=body, timeout=10).json()
    assert odd["unknown_context"] == ["device", "hour"]
    assert [i["score"] for i in odd["items"]] == [i["score"] for i in none["items"]]
    body["context"] = {"device": "ios", "hour": 99}
    assert httpx.post(f"{service_url}/v1/rank", json=body, timeout=10).json()[
        "unknown_context"
    ] == ["hour"]
    after = _unknown_context_counts(service_url)
    assert after.get("device", 0) - before.get("device", 0) == 1
    assert after.get("hour", 0) - before.get("hour", 0) == 2


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda b: b.pop("user_id"), "user_id"),
        (lambda b: b.update(candidates=[]), "candidates"),
        (lambda b: b.update(candidates=[{"video_id": "abc"}]), "video_id"),
        (lambda b: b.update(top_k=0), "top_k"),
        (lambda b: b.update(candidates=[{"video_id": 1}, {"video_id": 1}]), "candidates"),
        (lambda b: b["context"].update(hour="noon"), "hour"),
        (lambda b: b["context"].update(devise="ios"), "devise"),
        (lambda b: b.update(extra=1), "extra"),
    ],
)
def test_malformed_request_gets_422_naming_the_field(
    service_url: str, tiny_world, mutate, field
) -> None:  # noqa: ANN001
    body = sample_request(tiny_world, 5)
    mutate(body)
    r = httpx.post(f"{service_url}/v1/rank", json=body, timeout=10)
    assert r.status_code == 422, r.text
    assert field in r.text


def test_health_readiness_and_docs(service_url: str) -> None:
    assert httpx.get(f"{service_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{service_url}/readyz").json()
    assert ready["ready"] is True and ready["store"] == "in-process"
    assert httpx.get(f"{service_url}/docs").status_code == 200
    spec = httpx.get(f"{service_url}/openapi.json").json()
    assert "/v1/rank" in spec["paths"]


def test_auto_says_which_engine_it_chose(tiny_artifact) -> None:  # noqa: ANN001
    env = {"RANKER_ARTIFACT": str(tiny_artifact), "RANKER_BACKEND": "auto"}
    with run_service(env) as url:
        ready = httpx.get(f"{url}/readyz").json()
        metrics = httpx.get(f"{url}/metrics").text
    # auto chose an engine that passed its guard, and says so
    sel = ready["engine_selection"]
    assert ready["engine"] == sel["engine"] and ready["engine_ms"] == sel["ms"] > 0
    trials = {t["engine"]: t for t in sel["trials"]}
    assert trials[ready["engine"]]["admitted"] and "eager" in trials
    assert sel["sample_requests"] > 0 and sel["threads"] == 1
    version = ready["model_version"]
    assert (
        f'ranker_engine_info{{engine="{ready["engine"]}",selected_by="auto",version="{version}"}} 1.0'
        in metrics
    )
    assert f'ranker_engine_sample_forward_seconds{{engine="{ready["engine"]}"' in metrics


def visible_text(html: str) -> str:
    """What a browser shows of ``html`` when no script runs (none could be fetched)."""
    import re

    html = re.sub(r"(?s)<(script|style|head)\b.*?</\1>", " ", html)
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_say_what_they_need_when_offline(service_url: str, page: str) -> None:
    r = httpx.get(f"{service_url}{page}")
    assert r.status_code == 200
    text = visible_text(r.text)
    assert "cdn.jsdelivr.net" in text and "/openapi.json" in text, text
    assert "/v1/rank" in httpx.get(f"{service_url}/openapi.json").json()["paths"]


def test_invalid_json_is_a_4xx(service_url: str) -> None:
    r = httpx.post(
        f"{service_url}/v1/rank", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422
