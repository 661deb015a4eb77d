"""What metrics and request logs cost per request (issue 12), two ways.

1. End to end: two services on the same artifact, one as ``ranker serve`` runs it (metrics,
   a JSON log line per request to a file) and one without observability (the middleware,
   ``/metrics`` and ``note_ranked`` patched out), both single-threaded; requests of
   ``--candidates`` candidates alternate between them over keep-alive connections, so both see
   the same machine noise. Prints p50 / mean per service and the difference.
2. In process: the middleware's after-response work alone (``_finish``: every counter and
   histogram, the five whole-vector histograms, the log line formatted and written to a file),
   timed over ``--iterations`` on a real ranked result, in single-process and in multiprocess
   mode (mmap files), and beside it what a per-value ``Histogram.observe`` loop would cost.

    .venv/bin/python bench/observability.py                  # ~1 min on 2 cores
    .venv/bin/python bench/observability.py --requests 200   # the figure in docs/observability.md

Uses ``artifacts/default`` (``make demo`` writes it) unless ``--artifact`` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.launch import free_port, wait_until_ready  # noqa: E402


def serve_bare(port: int) -> None:
    """The service without observability: what the same code costs with the module removed."""
    import uvicorn

    import service.app as app_module
    from service.logs import logging_config
    from service.settings import Settings

    app_module.install_observability = lambda app: None  # type: ignore[assignment]
    app_module.note_ranked = lambda *a: None  # type: ignore[assignment]
    settings = Settings()
    uvicorn.run(
        app_module.create_app(settings),
        host="127.0.0.1",
        port=port,
        log_level=settings.log_level,
        log_config=logging_config(settings.log_level),
        access_log=False,
    )


def request_body(artifact: Path, n: int) -> bytes:
    import pyarrow.parquet as pq

    from ranker.artifact import load_artifact

    d = load_artifact(artifact).config.data
    videos = pq.read_table(d.videos, columns=[d.video_key]).column(0).to_numpy()[:n]
    user = int(pq.read_table(d.users, columns=[d.user_key]).column(0)[0].as_py())
    return json.dumps(
        {
            "user_id": user,
            "context": {"device": "ios", "hour": 20},
            "candidates": [{"video_id": int(v)} for v in videos],
        }
    ).encode()


def end_to_end(artifact: Path, requests: int, candidates: int, warmup: int) -> dict:
    body = request_body(artifact, candidates)
    tmp = Path(tempfile.mkdtemp(prefix="bench-obs-"))
    env = os.environ | {
        "RANKER_ARTIFACT": str(artifact),
        "RANKER_THREADS": "1",
        "RANKER_LOG_LEVEL": "info",
    }
    ports = {"with": free_port(), "without": free_port()}
    cmds = {
        "with": [sys.executable, "-m", "ranker", "serve", "--port", str(ports["with"])],
        "without": [sys.executable, __file__, "--serve-bare", str(ports["without"])],
    }
    procs = {}
    for name, cmd in cmds.items():
        with open(tmp / f"{name}.log", "w") as out:
            procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=out)
    try:
        for name, proc in procs.items():
            wait_until_ready(f"http://127.0.0.1:{ports[name]}", proc, 120.0, tmp / f"{name}.log")
        conns = {n: http.client.HTTPConnection("127.0.0.1", p) for n, p in ports.items()}
        times: dict[str, list[float]] = {n: [] for n in conns}
        headers = {"content-type": "application/json"}
        for i in range(warmup + requests):
            order = list(conns) if i % 2 == 0 else list(reversed(conns))
            for name in order:
                t = time.perf_counter()
                conns[name].request("POST", "/v1/rank", body, headers)
                r = conns[name].getresponse()
                r.read()
                dt = time.perf_counter() - t
                assert r.status == 200, r.status
                if i >= warmup:
                    times[name].append(dt * 1000)
        lines = (tmp / "with.log").read_text().count('"logger":"ranker.access"')
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=30)
    out = {
        n: {"p50_ms": statistics.median(t), "mean_ms": statistics.fmean(t)}
        for n, t in times.items()
    }
    paired = [a - b for a, b in zip(times["with"], times["without"], strict=True)]
    out["difference_p50_ms"] = out["with"]["p50_ms"] - out["without"]["p50_ms"]
    out["paired_difference_median_ms"] = statistics.median(paired)
    out["request_log_lines"] = lines
    return out


def in_process(artifact: Path, candidates: int, iterations: int) -> dict:
    """Times ObservabilityMiddleware._finish on a real ranked result (run in a fresh process,
    so the multiprocess choice is made before prometheus-client is imported)."""
    import logging

    import numpy as np
    from prometheus_client import Histogram

    from service.engine import ServingModel, load_formula, rank
    from service.logs import JsonFormatter
    from service.observability import Observability, ObservabilityMiddleware, _Exchange
    from service.settings import Settings

    settings = Settings(artifact=artifact, threads=1)
    model = ServingModel.load(settings)
    formula = load_formula(settings.ranking_config, model.artifact.config.task_names)
    d = model.artifact.config.data
    import pyarrow.parquet as pq

    ids = pq.read_table(d.videos, columns=[d.video_key]).column(0).to_numpy()[:candidates]
    ranked = asyncio.run(rank(model, formula, 1, {"device": "ios"}, ids.astype(np.int64), 10))
    obs = Observability(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    mw = ObservabilityMiddleware(lambda *a: None, obs)  # type: ignore[arg-type]
    handler = logging.FileHandler(tempfile.mktemp(suffix=".log"))
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("ranker.access")
    access.addHandler(handler)
    access.propagate = False
    scope = {"type": "http", "method": "POST", "path": "/v1/rank", "headers": [], "app": None}

    def once() -> None:
        ex = _Exchange("0123456789abcdef", time.perf_counter() - 0.01, status=200)
        ex.ranked, ex.model, ex.formula = ranked, model, formula
        ex.ranked_at = ex.responded = time.perf_counter()
        mw._finish(scope, ex)

    def best_of(fn: Callable[[], None], calls: int, blocks: int = 7) -> float:
        """Microseconds per call: the best of ``blocks`` block means (the shared machine's
        noise only ever adds)."""
        per_block = max(calls // blocks, 1)
        best = float("inf")
        for _ in range(blocks):
            t = time.perf_counter()
            for _ in range(per_block):
                fn()
            best = min(best, (time.perf_counter() - t) / per_block * 1e6)
        return best

    out = {}
    for label, level in (("metrics + log line", logging.INFO), ("metrics only", logging.ERROR)):
        access.setLevel(level)
        for _ in range(50):
            once()
        out[label + " us"] = best_of(once, iterations)
    hist = Histogram("bench_per_value", "per-value observe", buckets=(0.1, 0.5, 1.0), registry=None)
    values = np.concatenate([ranked.all_scores, *ranked.all_predictions.values()]).tolist()

    def per_value() -> None:
        for v in values:
            hist.observe(v)

    out[f"per-value observe of {len(values)} values (not used) us"] = best_of(per_value, 70)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--artifact", default="artifacts/default")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--candidates", type=int, default=500)
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    artifact = Path(a.artifact)
    if a.serve_bare:
        serve_bare(a.serve_bare)
        return
    if a.in_process:
        print(json.dumps(in_process(artifact, a.candidates, a.iterations)))
        return
    print(f"end to end, {a.requests} requests of {a.candidates} candidates each, alternating:")
    e2e = end_to_end(artifact, a.requests, a.candidates, a.warmup)
    for name in ("with", "without"):
        print(f"  {name:<8} p50 {e2e[name]['p50_ms']:.2f} ms, mean {e2e[name]['mean_ms']:.2f} ms")
    print(
        f"  difference of the p50s {e2e['difference_p50_ms'] * 1000:+.0f} us, median of the "
        f"paired differences {e2e['paired_difference_median_ms'] * 1000:+.0f} us "
        f"({e2e['request_log_lines']} request log lines written)"
    )
    for mode in ("single-process", "multiprocess"):
        env = dict(os.environ)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if mode == "multiprocess":
            env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="bench-obs-mp-")
        cmd = [sys.executable, __file__, "--in-process", "--artifact", str(artifact)]
        cmd += ["--candidates", str(a.candidates), "--iterations", str(a.iterations)]
        res = json.loads(subprocess.run(cmd, env=env, capture_output=True, check=True).stdout)
        print(f"in process ({mode}), per request:")
        for k, v in res.items():
            print(f"  {k}: {v:.1f}")


if __name__ == "__main__":
    main()
