"""The log writer on its own (``service/exposure_log.py``), with real Parquet files: rotation by
in-memory bytes, the bounded memory of recent event ids, the columns built from whole arrays
over many random records (the HTTP tests in ``test_exposure_log.py`` check them against real
responses)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ranker.exposure import EXPOSURE_SCHEMA, check_schema
from service.exposure_log import Exposure, ParquetLog, RecentIds, Rotation, exposure_table


class Tally:
    def __init__(self) -> None:
        self.n = 0.0

    def inc(self, amount: float = 1) -> None:
        self.n += amount


def record(rng: np.random.Generator, i: int, k: int, heads: list[str]) -> Exposure:
    return Exposure(
        request_id=f"r{i}",
        time=float(i),
        user_id=int(rng.integers(-(2**62), 2**62)),
        context={"device": "ios", "hour": i % 24} if i % 2 else {},
        video_ids=rng.integers(-(2**62), 2**62, k),
        scores=rng.normal(size=k),
        predictions={h: rng.random(k).astype(np.float32) for h in heads},
        model_version="m",
        ranking_version=f"v{i % 3}",
        variant=None if i % 4 else "b",
        degraded=bool(i % 5 == 0),
    )


def test_columns_are_the_records_over_random_batches() -> None:
    """Random batches: empty requests, heads that change between records (a reload), extreme
    ids; every row is its record's value at its position."""
    rng = np.random.default_rng(0)
    for case in range(200):
        heads_sets = [["click", "like"], ["click", "watch_time", "like"], []]
        records = [
            record(rng, i, int(rng.integers(0, 12)), heads_sets[(case + i) % 3])
            for i in range(int(rng.integers(1, 9)))
        ]
        table = exposure_table(records)
        check_schema(table.schema, EXPOSURE_SCHEMA, "table")
        rows = table.to_pylist()
        assert len(rows) == sum(len(r.video_ids) for r in records)
        at = 0
        for r in records:
            for pos in range(len(r.video_ids)):
                row = rows[at]
                at += 1
                assert (row["request_id"], row["time"], row["user_id"]) == (
                    r.request_id,
                    r.time,
                    r.user_id,
                )
                assert row["video_id"] == int(r.video_ids[pos]) and row["position"] == pos
                assert row["score"] == float(np.float32(r.scores[pos]))
                assert dict(row["predictions"]) == {
                    h: float(v[pos]) for h, v in r.predictions.items()
                }
                assert (row["variant"], row["degraded"]) == (r.variant, r.degraded)
                assert row["ranking_version"] == r.ranking_version


def test_files_rotate_by_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    records = [record(rng, i, 50, ["click", "like"]) for i in range(10)]
    one = exposure_table(records[:1]).nbytes
    counts = [Tally(), Tally(), Tally()]
    log = ParquetLog(
        tmp_path, "exposures", exposure_table, Rotation(10**9, int(2.5 * one), 3600.0), 100,
        *counts,
    )  # fmt: skip
    for r in records:
        assert log.put(r)
        deadline = time.monotonic() + 10
        while log.queue.qsize():  # taken: the next record is a batch of its own
            assert time.monotonic() < deadline
            time.sleep(0.001)
    log.close()
    files = sorted(tmp_path.glob("*.parquet"))
    sizes = [pq.read_metadata(f).num_rows for f in files]
    assert sum(sizes) == 500 and counts[1].n == 500 and counts[0].n == 0
    assert len(files) >= 3 and all(n >= 150 for n in sizes[:-1]), sizes  # 3 records of 50
    assert not log.put(records[0]) and counts[0].n == 50  # closed: dropped and counted


def test_recent_ids_remember_the_last_limit_ids() -> None:
    ids = RecentIds(3)
    assert ids.fresh(["a", "b", "a"]).tolist() == [True, True, False]
    assert ids.fresh(["c", "d"]).tolist() == [True, True]  # a is forgotten now (b, c, d)
    assert ids.fresh(["b", "a"]).tolist() == [False, True]
    assert len(ids.seen) == len(ids.order) == 3
