"""What the exposure log costs a rank request: the same service with ``RANKER_EXPOSURE_DIR`` set
and unset, the same requests, interleaved in one run.

Two services from this tree (in-process feature tables, ``eager`` engine, one thread, one
worker) answer the same 500-candidate bodies in blocks taken in turn, so both see the same noise
of a shared machine; the figures are their ratio, on/off. Two shapes: ``top_k`` 10 (10 exposure
rows per request) and every candidate returned (500 rows: the most a request can log), each at
concurrency 1 (latency: what the ``put`` on the request path costs) and 8 (throughput: the
writer thread shares the process's CPU and GIL with the event loop). The rows the log wrote and
dropped come from the service's ``/metrics``.

On a busy shared machine the HTTP ratios drown in noise, so it also measures the two costs in
this process, where they do not depend on the machine's load: the request path's part (one
``ServiceLogs.exposed`` call: a record and a ``put_nowait``), and the writer thread's CPU time
per request (building the Arrow table from a batch of records and writing it as Parquet).

    .venv/bin/python bench/exposure.py --artifact artifacts/default --requests 400

Client, connections and bodies are ``bench/serve.py``'s.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import cpu_model  # noqa: E402
from serve import Connections, _get, replay, request_bodies  # noqa: E402

from ranker.artifact import load_artifact  # noqa: E402
from service.exposure_log import Exposure, ServiceLogs, exposure_table  # noqa: E402
from service.launch import serve  # noqa: E402

_ROWS = re.compile(
    r'^ranker_exposure_(written|dropped)_rows_total\{log="exposures"\}\s+(\S+)$', re.M
)


def log_rows(port: int) -> dict[str, float]:
    """``written`` and ``dropped`` exposure rows so far, from ``/metrics``."""
    _, text = _get(port, "/metrics")
    return {kind: float(v) for kind, v in _ROWS.findall(text.decode())}


class _Nothing:
    def inc(self, amount: float = 1) -> None:
        pass


def in_process_costs(rows: int, directory: Path, n: int = 2000) -> tuple[float, float]:
    """Microseconds per request: the request path's ``exposed`` call, and the writer's CPU
    time (table and Parquet) per request, for requests that show ``rows`` videos."""
    import pyarrow.parquet as pq

    from service.exposure_log import LogCounters, Rotation

    rng = np.random.default_rng(0)
    heads = ["click", "watch_time", "like", "rating"]
    ids, scores = rng.integers(0, 10**6, rows), rng.random(rows).astype(np.float32)
    preds = {h: rng.random(rows).astype(np.float32) for h in heads}
    ctx = {"device": "ios", "hour": 20}
    nothing = LogCounters(lambda _: _Nothing(), lambda _: _Nothing(), lambda _: _Nothing())
    logs = ServiceLogs(directory, Rotation(10**9, 1 << 40, 3600.0), n + 1, 10, nothing)
    t0 = time.perf_counter()
    for i in range(n):
        logs.exposed(f"r{i}", 1.0, 7, ctx, ids, scores, preds, "m", "v", False, variant=None)
    put_us = (time.perf_counter() - t0) / n * 1e6
    logs.close()
    records = [
        Exposure(f"r{i}", 1.0, 7, ctx, ids, scores, preds, "m", "v", None, False) for i in range(n)
    ]
    c0 = time.thread_time()
    for start in range(0, n, 100):  # batches as the writer takes them off a busy queue
        table = exposure_table(records[start : start + 100])
        pq.write_table(table, directory / f"bench-{start}.parquet")
    write_us = (time.thread_time() - c0) / n * 1e6
    return put_us, write_us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=ROOT / "artifacts" / "default")
    ap.add_argument("--requests", type=int, default=400, help="per service, shape and level")
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--block", type=int, default=20, help="requests per service per turn")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    artifact = load_artifact(args.artifact)
    plain = request_bodies(artifact, 64, args.candidates, args.seed)
    shapes = {
        "top_k 10": [orjson.dumps(orjson.loads(b) | {"top_k": 10}) for b in plain],
        f"all {args.candidates}": plain,
    }
    labels = ("off", "on")
    lat: dict[tuple[str, str, int], list[float]] = {}
    wall: dict[tuple[str, str, int], float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-exposure-") as tmp, ExitStack() as stack:
        base = {
            "RANKER_ARTIFACT": str(args.artifact.resolve()),
            "RANKER_BACKEND": "eager",
            "RANKER_THREADS": "1",
            "RANKER_LOG_LEVEL": "warning",
            "RANKER_RANKING_CONFIG": str(ROOT / "configs" / "ranking.toml"),
        }
        # Files every 5 s: the measurement includes the writer writing Parquet, not only queueing.
        on = {"RANKER_EXPOSURE_DIR": str(Path(tmp) / "logs"), "RANKER_EXPOSURE_ROTATE_S": "5"}
        envs = {"off": base, "on": base | on}
        ports = {}
        for label in labels:
            running = serve(envs[label], log_path=Path(tmp) / f"{label}.log", timeout=180.0)
            ports[label] = stack.enter_context(running).port
        conns = Connections()
        stack.callback(conns.close)
        top = max(levels)
        for label in labels:  # warm-up, every connection opened
            replay(ports[label], plain[: 2 * top], top, time.monotonic() + 60, conns)
        rows_before = log_rows(ports["on"])
        for shape, bodies in shapes.items():
            for c in levels:
                sent = 0
                while sent < args.requests:
                    n = min(args.block, args.requests - sent)
                    part = [bodies[(sent + i) % len(bodies)] for i in range(n)]
                    for label in labels:
                        key = (shape, label, c)
                        t0 = time.perf_counter()
                        lat.setdefault(key, []).extend(
                            replay(ports[label], part, c, time.monotonic() + 120, conns)
                        )
                        wall[key] = wall.get(key, 0.0) + time.perf_counter() - t0
                    sent += n
        time.sleep(0.5)
        rows_after = log_rows(ports["on"])
        costs = {
            rows: in_process_costs(rows, Path(tmp) / f"in-process-{rows}")
            for rows in (10, args.candidates)
        }
    print(f"CPU: {cpu_model()}; artifact {artifact.version}; {args.requests} requests per cell")
    print("command: " + " ".join([".venv/bin/python", "bench/exposure.py", *sys.argv[1:]]))
    print()
    print("| shape | c | p50 ms off | p50 ms on | p50 on/off | p99 on/off | req/s off | req/s on "
          "| req/s on/off |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        for c in levels:
            off, on = (np.asarray(lat[(shape, x, c)]) * 1000 for x in labels)
            rate_off, rate_on = (len(lat[(shape, x, c)]) / wall[(shape, x, c)] for x in labels)
            p50 = (np.median(off), np.median(on))
            p99 = (np.percentile(off, 99), np.percentile(on, 99))
            print(
                f"| {shape} | {c} | {p50[0]:.2f} | {p50[1]:.2f} | {p50[1] / p50[0]:.3f} "
                f"| {p99[1] / p99[0]:.3f} | {rate_off:.0f} | {rate_on:.0f} "
                f"| {rate_on / rate_off:.3f} |"
            )
    written = rows_after.get("written", 0.0) - rows_before.get("written", 0.0)
    dropped = rows_after.get("dropped", 0.0) - rows_before.get("dropped", 0.0)
    print("\nin this process, microseconds per request (request path | writer thread CPU):")
    for rows, (put_us, write_us) in costs.items():
        print(f"  {rows} rows shown: exposed() {put_us:.1f} us | table + Parquet {write_us:.1f} us")
    print(f"\nexposure rows while measured: {written:.0f} written, {dropped:.0f} dropped "
          "(the rest pending in memory until its file rotates)")  # fmt: skip


if __name__ == "__main__":
    main()
