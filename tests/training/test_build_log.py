"""``ranker build-log``: exposures and events written as the service writes them (the layouts of
``ranker/exposure.py``), joined back into the trainer's log.

The round trip: the synthetic world's own log is split into what a service would have recorded
(one exposure per shown row, one event per click / like / watch / rating) and joined back; the
result must be the world's log again, label for label."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ranker.exposure import EVENT_SCHEMA, EXPOSURE_SCHEMA
from training.build_log import BuildLogConfig, LabelRule, build_log

ROOT = Path(__file__).resolve().parents[2]


def _write_parts(table: pa.Table, folder: Path, parts: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    step = -(-table.num_rows // parts)
    for i in range(parts):
        pq.write_table(table.slice(i * step, step), folder / f"part-{i:05d}.parquet")


def exposures_from_log(log: pa.Table) -> pa.Table:
    """The exposure rows a service would have written for the log's impressions."""
    n = log.num_rows
    rid = log.column("request_id").to_numpy()
    ctx = [
        json.dumps({"device": d, "hour": h})
        for d, h in zip(
            log.column("device").to_pylist(), log.column("hour").to_pylist(), strict=True
        )
    ]
    user = log.column("user_id").to_numpy()
    variant = np.where(user % 2 == 0, "control", "treatment")
    return pa.Table.from_pydict(
        {
            "request_id": pa.array([f"req-{r}" for r in rid], pa.string()),
            "time": pa.array(log.column("timestamp").to_numpy().astype(np.float64)),
            "user_id": pa.array(user),
            "video_id": log.column("video_id"),
            "position": log.column("position").cast(pa.int32()),
            "score": pa.array(-np.asarray(log.column("position").to_numpy(), np.float32)),
            "predictions": pa.array([[("click", 0.5)]] * n, pa.map_(pa.string(), pa.float32())),
            "context": pa.array(ctx, pa.string()),
            "model_version": pa.array(["m1"] * n),
            "ranking_version": pa.array(["w1"] * n),
            "variant": pa.array(variant.tolist(), pa.string()),
            "degraded": pa.array(np.zeros(n, bool)),
        },
        schema=EXPOSURE_SCHEMA,
    )


def events_from_log(log: pa.Table, rng: np.random.Generator) -> pa.Table:
    """One event per logged label, half naming their request id, half not, 0.1-0.9 s late."""
    rid = log.column("request_id").to_numpy()
    user = log.column("user_id").to_numpy()
    video = log.column("video_id").to_numpy()
    t = log.column("timestamp").to_numpy().astype(np.float64)
    click = log.column("click").to_numpy().astype(bool)
    like = log.column("like").to_numpy().astype(bool)
    watch = log.column("watch_time").to_numpy()
    rating = log.column("rating").to_numpy(zero_copy_only=False)
    rows, types, values = [], [], []
    for name, mask, value in (
        ("impression", np.ones(len(rid), bool), np.ones(len(rid))),
        ("click", click, np.ones(len(rid))),
        ("like", like, np.ones(len(rid))),
        ("watch_seconds", watch > 0, watch),
        ("rating", ~np.isnan(rating), rating),
    ):
        idx = np.flatnonzero(mask)
        rows.append(idx)
        types += [name] * len(idx)
        values.append(value[idx])
    r = np.concatenate(rows)
    n = len(r)
    named = rng.random(n) < 0.5
    return pa.Table.from_pydict(
        {
            "event_id": pa.array([f"e{i}" for i in range(n)]),
            "request_id": pa.array(
                [f"req-{x}" if k else None for x, k in zip(rid[r], named, strict=True)],
                pa.string(),
            ),
            "user_id": pa.array(user[r]),
            "video_id": pa.array(video[r]),
            "type": pa.array(types),
            "time": pa.array(t[r] + rng.uniform(0.1, 0.9, n)),
            "value": pa.array(np.concatenate(values)),
            "received": pa.array(np.full(n, 1.8e9)),
        },
        schema=EVENT_SCHEMA,
    )


@pytest.fixture(scope="module")
def world_log(tiny_world: Path) -> pa.Table:
    return pq.read_table(tiny_world / "log")


@pytest.fixture(scope="module")
def recorded(world_log: pa.Table, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("recorded")
    _write_parts(exposures_from_log(world_log), d / "exposures", 3)
    events = events_from_log(world_log, np.random.default_rng(0))
    events = events.take(np.random.default_rng(1).permutation(events.num_rows))  # any order
    _write_parts(events, d / "events", 2)
    return d


def test_round_trip_gives_the_worlds_log_back(
    world_log: pa.Table, recorded: Path, tmp_path: Path
) -> None:
    r = build_log(recorded / "exposures", recorded / "events", tmp_path / "out")
    out = pq.read_table(tmp_path / "out")
    assert out.num_rows == world_log.num_rows == r.exposures
    assert r.unattributed == {} and r.unmapped == {} and r.duplicate_events == 0
    assert r.impression_events == world_log.num_rows
    assert r.attributed["click"] == pc.sum(world_log.column("click")).as_py()
    key = ["request_id", "position"]
    a = world_log.sort_by([(k, "ascending") for k in key])
    b = out.sort_by([(k, "ascending") for k in key])
    # Request ids are dense in time order; the world's are too, so they agree exactly.
    for c in ("request_id", "user_id", "video_id", "position", "device", "hour", "click", "like"):
        assert b.column(c).to_pylist() == a.column(c).to_pylist(), c
    assert b.schema.field("hour").type == pa.int64()
    assert b.schema.field("click").type == pa.int64()
    np.testing.assert_allclose(b.column("watch_time").to_numpy(), a.column("watch_time"))
    np.testing.assert_array_equal(
        b.column("rating").to_numpy(zero_copy_only=False),
        a.column("rating").to_numpy(zero_copy_only=False),
    )
    np.testing.assert_array_equal(b.column("timestamp").to_numpy(), a.column("timestamp"))
    assert set(b.column("variant").to_pylist()) == {"control", "treatment"}
    assert b.column("long_view").to_pylist() == [0] * b.num_rows
    summary = json.loads((tmp_path / "out" / "_build-log.json").read_text())
    assert summary["exposures"] == world_log.num_rows


def _one_request() -> tuple[pa.Table, list[dict]]:
    exp = pa.Table.from_pylist(
        [
            {
                "request_id": rid,
                "time": t,
                "user_id": 7,
                "video_id": v,
                "position": p,
                "score": 1.0,
                "predictions": [],
                "context": "{}",
                "model_version": "m",
                "ranking_version": "w",
                "variant": None,
                "degraded": False,
            }
            for rid, t, vids in (("a", 100.0, (1, 2)), ("b", 200.0, (1, 3)))
            for p, v in enumerate(vids)
        ],
        schema=EXPOSURE_SCHEMA,
    )
    return exp, []


def _events(rows: list[tuple]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "event_id": eid,
                "request_id": rid,
                "user_id": u,
                "video_id": v,
                "type": typ,
                "time": t,
                "value": val,
                "received": 0.0,
            }
            for eid, rid, u, v, typ, t, val in rows
        ],
        schema=EVENT_SCHEMA,
    )


def test_attribution_rules_and_what_is_lost(tmp_path: Path) -> None:
    exp, _ = _one_request()
    pq.write_table(exp, tmp_path / "exp.parquet")
    ev = _events(
        [
            ("1", "a", 7, 1, "click", 150.0, 1.0),  # named: request a, video 1
            ("2", None, 7, 1, "watch_seconds", 250.0, 30.0),  # latest exposure of 1: request b
            ("3", None, 7, 1, "watch_seconds", 150.0, 5.0),  # before b: request a
            ("4", None, 7, 2, "rating", 150.0, 2.0),
            ("5", None, 7, 2, "rating", 160.0, 4.0),  # the latest rating wins
            ("6", "zzz", 7, 1, "click", 150.0, 1.0),  # unknown request id
            ("7", "a", 7, 3, "click", 150.0, 1.0),  # video 3 was not in request a
            ("8", None, 7, 3, "click", 150.0, 1.0),  # video 3 first shown at 200
            ("9", "b", 7, 3, "like", 200.0 + 86400.5, 1.0),  # past the window
            ("10", None, 8, 1, "click", 150.0, 1.0),  # another user: never shown
            ("11", "b", 7, 3, "share", 210.0, 1.0),  # no label rule
            ("1", "a", 7, 2, "click", 150.0, 1.0),  # a duplicate id: dropped
            ("12", "b", 7, 3, "like", 199.0, 1.0),  # before its exposure
        ]
    )
    pq.write_table(ev, tmp_path / "ev.parquet")
    r = build_log(tmp_path / "exp.parquet", tmp_path / "ev.parquet", tmp_path / "out")
    out = pq.read_table(tmp_path / "out").to_pylist()
    got = {(o["request_uid"], o["video_id"]): o for o in out}
    assert [o["request_uid"] for o in out] == ["a", "a", "b", "b"]
    assert [o["request_id"] for o in out] == [0, 0, 1, 1]
    assert got["a", 1]["click"] == 1 and got["a", 2]["click"] == 0
    assert got["a", 1]["watch_time"] == 5.0 and got["b", 1]["watch_time"] == 30.0
    assert got["a", 2]["rating"] == 4.0 and got["a", 1]["rating"] is None
    assert got["b", 3]["like"] == 0
    assert r.duplicate_events == 1
    assert r.unmapped == {"share": 1}
    assert r.attributed == {"click": 1, "rating": 2, "watch_seconds": 2}
    assert r.unattributed == {
        "no earlier exposure of the video to the user": 2,
        "outside the attribution window": 2,
        "unknown request_id": 1,
        "video not shown in that request": 1,
    }
    # A longer window takes the late like; a narrower one loses the 100 s old watch event.
    r = build_log(
        tmp_path / "exp.parquet",
        tmp_path / "ev.parquet",
        tmp_path / "out",
        BuildLogConfig(window=1e6),
    )
    assert r.attributed["like"] == 1
    r = build_log(
        tmp_path / "exp.parquet",
        tmp_path / "ev.parquet",
        tmp_path / "out",
        BuildLogConfig(window=10),
    )
    assert r.attributed.get("watch_seconds", 0) == 0
    # An override adds a label.
    rules = {"share": LabelRule(column="shared", how="flag")}
    build_log(
        tmp_path / "exp.parquet",
        tmp_path / "ev.parquet",
        tmp_path / "out",
        BuildLogConfig(labels=rules),
    )
    out = pq.read_table(tmp_path / "out")
    assert out.column("shared").to_pylist() == [0, 0, 0, 1]
    assert "click" not in out.column_names


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "ranker", *args], capture_output=True, text=True, env=env, cwd=ROOT
    )


def test_cli_joins_and_reports(recorded: Path, tmp_path: Path) -> None:
    p = _cli(
        "build-log",
        "--exposures",
        str(recorded / "exposures"),
        "--events",
        str(recorded / "events"),
        "--out",
        str(tmp_path / "out"),
        "--label",
        "impression=seen",
    )
    assert p.returncode == 0, p.stderr
    assert "wrote" in p.stdout and "12,000 impressions of 600 requests" in p.stdout
    assert pq.read_table(tmp_path / "out").column("seen").to_pylist() == [1] * 12_000


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda t: t.drop_columns(["position"]), "missing column 'position'"),
        (
            lambda t: t.set_column(
                t.schema.get_field_index("user_id"),
                "user_id",
                t.column("user_id").cast(pa.string()),
            ),
            "column 'user_id' has type string",
        ),
    ],
)
def test_bad_exposure_file_is_one_line(recorded: Path, tmp_path: Path, damage, needle) -> None:  # noqa: ANN001
    bad = tmp_path / "exp"
    bad.mkdir()
    t = pq.read_table(recorded / "exposures" / "part-00001.parquet")
    pq.write_table(pq.read_table(recorded / "exposures" / "part-00000.parquet"), bad / "a.parquet")
    pq.write_table(damage(t), bad / "b.parquet")
    p = _cli(
        "build-log",
        "--exposures",
        str(bad),
        "--events",
        str(recorded / "events"),
        "--out",
        str(tmp_path / "out"),
    )
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: ") and str(bad / "b.parquet") in lines[0]
    assert needle in lines[0]


def test_bad_context_and_label_spec(recorded: Path, tmp_path: Path) -> None:
    exp, _ = _one_request()
    exp = exp.set_column(
        exp.schema.get_field_index("context"), "context", pa.array(["[1]", "{}", "{}", "{}"])
    )
    pq.write_table(exp, tmp_path / "exp.parquet")
    p = _cli(
        "build-log",
        "--exposures",
        str(tmp_path / "exp.parquet"),
        "--events",
        str(recorded / "events"),
        "--out",
        str(tmp_path / "out"),
    )
    assert p.returncode == 2 and "column 'context'" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    p = _cli(
        "build-log",
        "--exposures",
        str(recorded / "exposures"),
        "--events",
        str(recorded / "events"),
        "--out",
        str(tmp_path / "out"),
        "--label",
        "click=click:maximum",
    )
    assert p.returncode == 2 and "flag, sum or value" in p.stderr
