"""Live counters end to end: a model trained with [live] counters on the first days of a log,
served by the real service (uvicorn, HTTP), fed the later days' events through POST /v1/events,
gives the features and scores the offline path computes for the same rows (evaluate --log)."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from ranker.artifact import load_artifact
from ranker.config import Config, _apply_override, parse_config
from ranker.predictor import Predictor
from ranker.tables import FeatureTable
from tests.conftest import DEFAULT_CONFIG, RANKING_CONFIG, tiny_overrides
from tests.service.conftest import run_service
from training.data import BatchBuilder
from training.offline import continued_counters

LIVE: dict[str, Any] = {
    "events": [
        {"name": "click", "column": "click"},
        {"name": "like", "column": "like"},
        {"name": "watch_seconds", "column": "watch_time"},
    ],
    "counters": [
        {"name": "user", "keys": ["user"], "events": ["click", "like"], "since_last": True},
        {"name": "user_hour", "keys": ["user", "context:hour"], "events": ["click"]},
        {"name": "video", "keys": ["video"], "events": ["click", "watch_seconds"]},
        {"name": "channel", "keys": ["video:channel_id"], "events": ["click"]},
        # a multi-valued entity: each of a video's tags counts, a candidate reads their sums
        {"name": "tag", "keys": ["video:tags"], "separator": ",", "events": ["click", "like"]},
    ],
}


def tagged_videos(world: Path, out: Path) -> Path:
    """The world's videos table with a ``tags`` column as a client's table would have it: a
    comma-joined string of 0-3 tags (a named tag per category, a number from the channel, one
    repeated; some videos untagged, some null), to key the multi-valued ``tag`` counter."""
    t = pq.read_table(world / "videos.parquet")
    vid, cat = t["video_id"].to_numpy(), t["category"].to_numpy()
    chan = t["channel_id"].to_numpy()
    tags: list[str | None] = []
    for v, c, ch in zip(vid.tolist(), cat.tolist(), chan.tolist(), strict=True):
        if v % 13 == 0:
            tags.append(None if v % 2 else "")
        else:
            tags.append(f"cat{c}, {ch % 5}" + (f",cat{c}" if v % 3 == 0 else ""))
    path = out / "videos_tagged.parquet"
    pq.write_table(t.append_column("tags", pa.array(tags, pa.string())), path)
    return path


def live_config(world: Path, tmp: Path, log: Path) -> Config:
    d = tomllib.loads(DEFAULT_CONFIG.read_text())
    for o in tiny_overrides(world, tmp):
        _apply_override(d, o)
    tmp.mkdir(parents=True, exist_ok=True)
    d["data"]["log"] = str(log)
    d["data"]["videos"] = str(tagged_videos(world, tmp))
    d["training"]["epochs"] = 2
    d["live"] = LIVE
    return parse_config(d)


@pytest.fixture(scope="module")
def split_world(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The world's log cut in time: the first 70% to train on, the rest as 'later days'."""
    out = tmp_path_factory.mktemp("live_log")
    t = ds.dataset(tiny_world / "log").to_table()
    ts = t["timestamp"].to_numpy()
    cut = np.quantile(ts, 0.7)
    for name, mask in (("train", ts < cut), ("later", ts >= cut)):
        (out / name).mkdir()
        pq.write_table(t.filter(pa.array(mask)), out / name / "part-0.parquet")
    return out / "train", out / "later"


@pytest.fixture(scope="module")
def live_artifact(
    tiny_world: Path, split_world: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    from training.loop import train

    cfg = live_config(tiny_world, tmp_path_factory.mktemp("live_train"), split_world[0])
    result = train(cfg, progress=False, export=True)
    assert result.artifact is not None
    return result.artifact


@pytest.fixture(scope="module")
def live_url(live_artifact: Path) -> Iterator[str]:
    with run_service(
        {"RANKER_ARTIFACT": str(live_artifact), "RANKER_RANKING_CONFIG": str(RANKING_CONFIG)}
    ) as url:
        yield url


def events_of(rows: pa.Table) -> list[dict[str, Any]]:
    """A log's rows as the feedback events a client would send: an impression, then a click, a
    like and the watch seconds where they happened, all at the impression's time."""
    out: list[dict[str, Any]] = []
    for r in rows.to_pylist():
        base = {
            "user_id": r["user_id"],
            "video_id": r["video_id"],
            "time": r["timestamp"],
            "context": {"hour": r["hour"], "device": r["device"]},
        }
        key = f"{r['request_id']}:{r['video_id']}"
        out.append(base | {"event_id": f"{key}:i", "type": "impression"})
        if r["click"]:
            out.append(base | {"event_id": f"{key}:c", "type": "click"})
        if r["like"]:
            out.append(base | {"event_id": f"{key}:l", "type": "like"})
        if r["watch_time"] > 0:
            out.append(
                base | {"event_id": f"{key}:w", "type": "watch_seconds", "value": r["watch_time"]}
            )
    return out


def post_events(client: httpx.Client, events: list[dict[str, Any]]) -> tuple[int, int]:
    accepted = duplicates = 0
    for s in range(0, len(events), 5000):
        r = client.post("/v1/events", json={"events": events[s : s + 5000]})
        assert r.status_code == 200, r.text
        accepted += r.json()["accepted"]
        duplicates += r.json()["duplicates"]
    return accepted, duplicates


def offline_predictions(artifact_path: Path, later: Path, rows: pa.Table) -> dict[str, np.ndarray]:
    """The offline path on the same rows: evaluate --log later's counters (training log then
    the later log, strictly before each row) and encoding, the eager model."""
    a = load_artifact(artifact_path)
    cfg = Config.model_validate(
        a.config.model_dump() | {"data": a.config.data.model_dump() | {"log": later}}
    )
    d = cfg.data
    users = FeatureTable.from_parquet(d.users, d.user_key, a.encoder, "user")
    videos = FeatureTable.from_parquet(d.videos, d.video_key, a.encoder, "video")
    counters = continued_counters(a.config, cfg)
    builder = BatchBuilder(cfg, a.encoder, users, videos, serving=True, counters=counters)
    enc, _, _ = builder.features(rows.to_batches()[0] if rows.num_rows else rows, "rows")
    return Predictor(a.model, cfg.tasks).predict(enc)


def served_equals_offline(
    url: str, artifact: Path, later_log: Path, points: list[tuple[int, int]]
) -> tuple[int, list[dict]]:
    """Feeds the service the later log's events up to each point (``(n, d)``: ``n / d`` of the way
    through its distinct times, in order), ranks the rows at that time and asserts every head's prediction equals
    the offline path's (``evaluate --log``'s state replay). Returns the rows checked and the
    responses."""
    later = ds.dataset(later_log).to_table()
    times = np.unique(later["timestamp"].to_numpy())
    checked, answers = 0, []
    with httpx.Client(base_url=url, timeout=60) as client:
        sent = 0
        for t_star in times[[min(len(times) * n // d, len(times) - 1) for n, d in points]]:
            ts = later["timestamp"]
            new = later.filter(pc.and_(pc.greater_equal(ts, sent), pc.less(ts, t_star)))
            post_events(client, events_of(new))
            sent = int(t_star)
            target = later.filter(pc.equal(ts, t_star))
            req = target.to_pylist()
            body = {
                "user_id": req[0]["user_id"],
                "context": {"hour": req[0]["hour"], "device": req[0]["device"]},
                "candidates": [{"video_id": r["video_id"]} for r in req],
                "time": int(t_star),
            }
            r = client.post("/v1/rank", json=body)
            assert r.status_code == 200, r.text
            answers.append(r.json())
            got = {it["video_id"]: it["predictions"] for it in r.json()["items"]}
            want = offline_predictions(artifact, later_log, target)
            for i, row in enumerate(req):
                for task, p in want.items():
                    assert got[row["video_id"]][task] == pytest.approx(p[i], rel=1e-5, abs=1e-6)
            checked += len(req)
    return checked, answers


def test_service_after_the_same_events_scores_as_the_offline_path(
    live_url: str, live_artifact: Path, split_world: tuple[Path, Path]
) -> None:
    # Three points in the later days: the state must follow the events as they come.
    checked, _ = served_equals_offline(
        live_url, live_artifact, split_world[1], [(1, 4), (1, 2), (1, 1)]
    )
    assert checked >= 3


def test_events_are_idempotent_and_change_the_scores(
    live_url: str, split_world: tuple[Path, Path]
) -> None:
    later = ds.dataset(split_world[1]).to_table()
    row = later.slice(0, 1).to_pylist()[0]
    body = {
        "user_id": row["user_id"],
        "context": {"hour": row["hour"]},
        "candidates": [{"video_id": row["video_id"]}],
        "time": 4e9,  # after every event of the log
    }
    ev = {
        "user_id": row["user_id"],
        "video_id": row["video_id"],
        "time": 3.9e9,
        "context": {"hour": row["hour"]},
    }
    batch = [ev | {"event_id": f"x{i}", "type": "impression"} for i in range(20)] + [
        ev | {"event_id": f"y{i}", "type": "click"} for i in range(20)
    ]
    with httpx.Client(base_url=live_url, timeout=60) as client:
        before = client.post("/v1/rank", json=body).json()
        assert client.post("/v1/events", json={"events": batch}).json() == {
            "accepted": 40,
            "duplicates": 0,
        }
        after = client.post("/v1/rank", json=body).json()
        assert after["items"][0]["score"] != before["items"][0]["score"]
        assert after["user_has_state"] is True
        # The same batch again (a retry) changes nothing.
        again = client.post("/v1/events", json={"events": batch}).json()
        assert again == {"accepted": 0, "duplicates": 40}
        assert client.post("/v1/rank", json=body).json()["items"] == after["items"]


@pytest.mark.parametrize(
    ("event", "loc"),
    [
        ({"type": "purchase"}, ["body", "events", 0, "type"]),
        ({"time": "soon"}, ["body", "events", 0, "time"]),
        ({"user_id": "7"}, ["body", "events", 0, "user_id"]),
        ({"event_id": ""}, ["body", "events", 0, "event_id"]),
        ({"value": -1}, ["body", "events", 0, "value"]),
        ({"colour": "red"}, ["body", "events", 0, "colour"]),
    ],
)
def test_a_bad_event_is_a_422_naming_its_field(
    live_url: str, event: dict[str, Any], loc: list[Any]
) -> None:
    good = {"event_id": "e1", "user_id": 1, "video_id": 2, "type": "click", "time": 1.0}
    r = httpx.post(f"{live_url}/v1/events", json={"events": [good | event]}, timeout=30)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == loc


def test_event_batches_are_bounded(live_url: str) -> None:
    ev = {"user_id": 1, "video_id": 2, "type": "click", "time": 1.0}
    big = [ev | {"event_id": str(i)} for i in range(10_001)]
    r = httpx.post(f"{live_url}/v1/events", json={"events": big}, timeout=30)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "events"]
    r = httpx.post(f"{live_url}/v1/events", json={"events": []}, timeout=30)
    assert r.status_code == 422


def test_a_model_without_live_counters_refuses_events(service_url: str) -> None:
    ev = {"event_id": "a", "user_id": 1, "video_id": 2, "type": "click", "time": 1.0}
    r = httpx.post(f"{service_url}/v1/events", json={"events": [ev]}, timeout=30)
    assert r.status_code == 404
    assert "live" in r.json()["detail"]


def test_evaluate_on_later_days_continues_the_state_and_reports_session_gauc(
    live_artifact: Path, split_world: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from training.offline import evaluate_artifact

    m = evaluate_artifact(live_artifact, log=str(split_world[1]), split="all", progress=False)
    later_rows = ds.dataset(split_world[1]).count_rows()
    assert m["rows"] == later_rows
    # The world has request ids: "within sessions" means within requests there.
    assert m["heads"]["click"]["gauc_session"] is not None
    assert m["heads"]["click"]["gauc_session_groups"] > 0
    assert "not a fair comparison" in capsys.readouterr().out
    # Groups are requests here, whose rows share one state: no frozen-state figure is needed.
    assert "gauc_session_frozen" not in m["heads"]["click"]


@pytest.mark.parametrize(
    ("body", "status"),
    [(b"[" * 5000 + b"]" * 5000, 422), (b'{"events": "\\ud800"}', 422), (b"\xff\xfe\x00", 400)],
)
def test_hostile_event_bodies_are_4xx(live_url: str, body: bytes, status: int) -> None:
    r = httpx.post(
        f"{live_url}/v1/events",
        content=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == status, r.text


def test_accepted_events_go_to_the_event_log_and_refused_ones_do_not(
    live_artifact: Path, tmp_path: Path
) -> None:
    """In-process live counters decide what is fresh: the event log holds exactly the events
    they accepted, once; a body refused for an unknown type (422) logs nothing."""
    from ranker.exposure import EVENT_SCHEMA
    from tests.service.test_exposure_log import read_log

    base = {"user_id": 1, "video_id": 2, "time": 10.0}
    events = [
        base | {"event_id": f"l{i}", "type": ["impression", "click"][i % 2]} for i in range(6)
    ]
    env = {
        "RANKER_ARTIFACT": str(live_artifact),
        "RANKER_RANKING_CONFIG": str(RANKING_CONFIG),
        "RANKER_EXPOSURE_DIR": str(tmp_path),
    }
    with run_service(env) as url:
        r = httpx.post(f"{url}/v1/events", json={"events": [*events[:4], events[0]]}, timeout=30)
        assert r.json() == {"accepted": 4, "duplicates": 1}
        r = httpx.post(f"{url}/v1/events", json={"events": events}, timeout=30)
        assert r.json() == {"accepted": 2, "duplicates": 4}
        unknown = [base | {"event_id": "u", "type": "teleport"}]
        r = httpx.post(f"{url}/v1/events", json={"events": unknown}, timeout=30)
        assert r.status_code == 422
    logged = read_log(tmp_path / "events", EVENT_SCHEMA)["event_id"].to_pylist()
    assert sorted(logged) == [f"l{i}" for i in range(6)]
