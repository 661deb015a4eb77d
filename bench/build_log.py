"""Time and memory of ``ranker build-log`` on the synthetic world's log recorded as exposures and
events (what the service would have written for it): rows per second of the join and the peak
resident memory per exposure.

    PYTHONPATH=. python bench/build_log.py --requests 50000
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_model  # noqa: E402
from ranker.exposure import EVENT_SCHEMA, EXPOSURE_SCHEMA  # noqa: E402
from training.build_log import build_log  # noqa: E402
from training.synth import WorldConfig, generate  # noqa: E402


def record(log: pa.Table, out: Path, rng: np.random.Generator) -> tuple[int, int]:
    """Writes the log as exposures (one per row) and events (one per label), vectorised."""
    n = log.num_rows
    device = pc.dictionary_encode(log.column("device").combine_chunks())
    hour = log.column("hour").to_numpy()
    dev = device.indices.to_numpy()
    names = device.dictionary.to_pylist()
    combos = [json.dumps({"device": d, "hour": h}) for d in names for h in range(24)]
    context = pa.array(combos).take(pa.array(dev * 24 + hour))
    rid = pc.cast(log.column("request_id"), pa.string())
    t = log.column("timestamp").to_numpy().astype(np.float64)
    exp = pa.table(
        {
            "request_id": rid,
            "time": t,
            "user_id": log.column("user_id"),
            "video_id": log.column("video_id"),
            "position": log.column("position").cast(pa.int32()),
            "score": pa.array(np.zeros(n, np.float32)),
            "predictions": pa.MapArray.from_arrays(
                np.arange(n + 1, dtype=np.int32),
                pa.array(["click"] * n),
                pa.array(np.zeros(n, np.float32)),
            ),
            "context": context,
            "model_version": pa.array(["m"] * n),
            "ranking_version": pa.array(["w"] * n),
            "variant": pa.nulls(n, pa.string()),
            "degraded": pa.array(np.zeros(n, bool)),
        },
        schema=EXPOSURE_SCHEMA,
    )
    (out / "exposures").mkdir()
    pq.write_table(exp, out / "exposures" / "part-0.parquet")
    rows, types, values = [], [], []
    for name, column in (("click", "click"), ("like", "like"), ("watch_seconds", "watch_time")):
        v = log.column(column).to_numpy().astype(np.float64)
        idx = np.flatnonzero(v > 0)
        rows.append(idx)
        types.append(np.full(len(idx), name, dtype=object))
        values.append(v[idx])
    r = np.concatenate(rows)
    m = len(r)
    named = rng.random(m) < 0.7
    ev = pa.table(
        {
            "event_id": pc.cast(pa.array(np.arange(m)), pa.string()),
            "request_id": pc.if_else(
                pa.array(named), rid.take(pa.array(r)), pa.nulls(m, pa.string())
            ),
            "user_id": log.column("user_id").take(pa.array(r)),
            "video_id": log.column("video_id").take(pa.array(r)),
            "type": pa.array(np.concatenate(types), pa.string()),
            "time": t[r] + rng.uniform(1, 60, m),
            "value": np.concatenate(values),
            "received": np.zeros(m),
        },
        schema=EVENT_SCHEMA,
    )
    (out / "events").mkdir()
    pq.write_table(ev, out / "events" / "part-0.parquet")
    return n, m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=50_000, help="x 20 candidates = exposures")
    a = ap.parse_args()
    print(f"# {cpu_model()}; PYTHONPATH=. python bench/build_log.py --requests {a.requests}")
    with tempfile.TemporaryDirectory(prefix="bench-build-log-") as tmp:
        d = Path(tmp)
        generate(WorldConfig(n_requests=a.requests), d / "world", progress=False)
        n, m = record(pq.read_table(d / "world" / "log"), d, np.random.default_rng(0))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        r = build_log(d / "exposures", d / "events", d / "out")
        s = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lost = sum(r.unattributed.values())
    print(
        f"{n:,} exposures, {m:,} events ({lost:,} unattributed): {s:.2f} s, "
        f"{n / s:,.0f} exposures/s; peak RSS {peak / 1024:.0f} MiB (before the join "
        f"{before / 1024:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
