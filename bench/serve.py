"""End-to-end serving benchmark: 500-candidate requests against the real service, per backend.

One command starts a real ``redis-server`` on a free loopback port, pushes the artifact's user and
video tables into it (``training/push.py``), starts one service per scoring backend (``ranker
serve`` with ``--workers`` processes, ``RANKER_BACKEND``, ``RANKER_THREADS``, features from Redis)
and replays the same request bodies against all of them, *interleaved* (a block of requests to
each backend in turn), at concurrency 1 and 8. The machine is shared and noisy: interleaving makes
the backends see the same noise, so compare them as ratios.

The client is lean on purpose (an httpx client adds 0.5-1.7 ms per request): one keep-alive
``http.client`` connection per client thread, held for the whole run (``Connections``), bodies
pre-encoded with orjson.

It also times the bare forward pass of each backend in this process on a 500-row batch built
the way the service builds it (same thread count), and with every row in full (no per-request
split). With more than one thread these in-process times are unreliable (the backends' thread
pools compete in one process); the service's own forward stage is the figure the end-to-end
ratio uses. It scrapes the service's stage histograms (``ranker_stage_duration_seconds`` at
``/metrics``) for a per-stage breakdown (means: a histogram's sum over its count).

    .venv/bin/python bench/serve.py --requests 300 --threads 1 --backends eager,torchscript,onnx

A backend may carry a thread count, ``name:N`` (``RANKER_THREADS=N``) or ``name:default``
(``RANKER_THREADS`` unset: the service's own default, ``service.settings.default_threads``);
plain ``name`` uses ``--threads``; a ``+inline`` suffix runs the forward pass on the event loop
(``RANKER_FORWARD_THREAD=false``) instead of the service's forward thread. ``auto`` is ``RANKER_BACKEND=auto`` (the engine the service
picks on start-up; its choice is printed). ``--busy-core`` repeats every concurrency level with
another process spinning on one core (a pure-Python busy loop pinned to the last usable CPU),
the contention a neighbour causes, and reports each backend's throughput under it as a ratio of
its quiet figure from the same run:

    .venv/bin/python bench/serve.py --backends auto,onnx:default,onnx:2 --busy-core

``--baseline DIR`` also serves another source tree (an earlier commit: ``git worktree add
/tmp/base <commit>``) with the first backend, as ``<backend>@base``, interleaved with the rest:
a before/after comparison in one run, on the same noise. Its artifact and settings are the same;
the stage breakdown is whatever that version reports.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import cpu_model  # noqa: E402

from ranker.artifact import Artifact, load_artifact  # noqa: E402
from ranker.backends import BACKENDS, build_scorer  # noqa: E402
from ranker.cpu import describe  # noqa: E402
from ranker.features import Encoded  # noqa: E402
from service.launch import free_port, serve  # noqa: E402


def _wait(check, what: str, proc: subprocess.Popen, timeout: float) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready in {timeout} s")
        time.sleep(0.1)


@contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    """A throwaway ``redis-server`` on a free loopback port (no persistence); yields its URL."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    log = open(directory / "redis.log", "wb")  # noqa: SIM115 - the server's lifetime
    proc = subprocess.Popen([*args, "--dir", str(directory)], stdout=log, stderr=log)
    try:
        import redis

        client = redis.Redis(port=port, socket_timeout=1.0)
        _wait(lambda: client.ping(), "redis-server", proc, 10.0)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def request_bodies(artifact: Artifact, n_bodies: int, candidates: int, seed: int) -> list[bytes]:
    """Distinct 500-candidate requests over real user and video ids, orjson-encoded."""
    d = artifact.config.data
    users = pq.read_table(d.users, columns=[d.user_key]).column(0).to_numpy()
    videos = pq.read_table(d.videos, columns=[d.video_key]).column(0).to_numpy()
    known = {f.name for f in artifact.encoder.of("context")}
    context = {k: v for k, v in {"device": "ios", "hour": 20}.items() if k in known}
    rng = np.random.default_rng(seed)
    return [
        orjson.dumps(
            {
                "user_id": int(rng.choice(users)),
                "context": context,
                "candidates": [
                    {"video_id": int(v)} for v in rng.choice(videos, candidates, replace=False)
                ],
            }
        )
        for _ in range(n_bodies)
    ]


class Connections:
    """Keep-alive connections per service, opened once and reused by every block of a run, as a
    load balancer or a client library holds them. Opening new ones for each block made every
    block start with a burst of connects, and let each block's connections land on the workers
    unevenly anew, which showed as tail latency that was the benchmark's own.

    A connection idle for longer than ``IDLE_S`` is replaced before use: uvicorn closes idle
    keep-alive connections after 5 s, and other backends' turns (or a whole concurrency level
    that used fewer connections) can leave one idle that long."""

    IDLE_S = 3.0

    def __init__(self) -> None:
        self._free: dict[int, list[tuple[http.client.HTTPConnection, float]]] = {}

    def take(self, port: int, n: int) -> list[http.client.HTTPConnection]:
        free = self._free.setdefault(port, [])
        now = time.monotonic()
        out = []
        while free and len(out) < n:
            conn, used = free.pop()
            if now - used > self.IDLE_S:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            out.append(conn)
        while len(out) < n:
            out.append(http.client.HTTPConnection("127.0.0.1", port, timeout=30))
        return out

    def give(self, port: int, conns: list[http.client.HTTPConnection]) -> None:
        now = time.monotonic()
        self._free[port].extend((c, now) for c in conns)

    def close(self) -> None:
        for conns in self._free.values():
            for c, _ in conns:
                c.close()


def replay(
    port: int, bodies: list[bytes], concurrency: int, deadline: float, conns: Connections
) -> list[float]:
    """POSTs every body once (split over ``concurrency`` keep-alive connections, one thread
    each); returns each request's latency in seconds. Stops early at ``deadline``."""
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[str] = []

    def worker(conn: http.client.HTTPConnection, part: list[bytes]) -> None:
        headers = {"content-type": "application/json"}
        mine = []
        try:
            for body in part:
                if time.monotonic() > deadline:
                    break
                t0 = time.perf_counter()
                conn.request("POST", "/v1/rank", body, headers)
                r = conn.getresponse()
                data = r.read()
                mine.append(time.perf_counter() - t0)
                if r.status != 200:
                    errors.append(f"{r.status}: {data[:200]!r}")
                    break
        except Exception as e:  # noqa: BLE001 - reported below, never lost with the thread
            errors.append(f"{type(e).__name__}: {e}")
        with lock:
            latencies.extend(mine)

    mine = conns.take(port, concurrency)
    threads = [
        threading.Thread(target=worker, args=(mine[i], bodies[i::concurrency]))
        for i in range(concurrency)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    conns.give(port, mine)
    if errors:
        raise RuntimeError(f"request failed: {errors[0]}")
    return latencies


_STAGE = re.compile(
    r'^ranker_stage_duration_seconds_(sum|count)\{[^}]*stage="([^"]+)"[^}]*\}\s+(\S+)$', re.M
)


def stage_totals(port: int) -> dict[str, tuple[float, float]]:
    """``stage -> (sum seconds, count)`` from the service's Prometheus histograms ({} if the
    service has no ``/metrics``)."""
    status, text = _get(port, "/metrics")
    if status != 200:
        return {}
    out: dict[str, list[float]] = {}
    for kind, stage, value in _STAGE.findall(text.decode()):
        out.setdefault(stage, [0.0, 0.0])[0 if kind == "sum" else 1] += float(value)
    return {k: (v[0], v[1]) for k, v in out.items()}


def forward_rows(artifact: Artifact, candidates: int, seed: int) -> Encoded:
    """A 500-row model input as the service builds it: one user and one context row broadcast
    beside 500 videos (real encoded rows of the artifact's tables)."""
    from ranker.tables import FeatureTable

    d, enc = artifact.config.data, artifact.encoder
    users = FeatureTable.from_parquet(d.users, d.user_key, enc, "user")
    videos = FeatureTable.from_parquet(d.videos, d.video_key, enc, "video")
    rng = np.random.default_rng(seed)
    v = videos.rows.take(rng.choice(len(videos), candidates, replace=False))
    u = users.rows.take(np.zeros(candidates, np.int64))
    c = enc.defaults("context", 1).take(np.zeros(candidates, np.int64))
    return Encoded.concat_columns([u, v, c])


def bare_forward(
    artifact: Artifact, backends: list[str], threads: int, rows: Encoded, calls: int
) -> dict[str, float]:
    """Median seconds of one forward pass per backend, the backends interleaved call by call:
    ``<backend>`` built as the service builds it (the request's user and context share of the
    first layers computed once), ``<backend>/plain`` without that (every row in full)."""
    import torch

    from ranker.predictor import request_split

    torch.set_num_threads(threads)
    split = request_split(artifact.model, artifact.encoder)
    scorers = {}
    for b in dict.fromkeys(b for b in backends if b in BACKENDS):  # auto has no one engine
        scorers[b] = build_scorer(artifact.model, b, threads, split)
        scorers[f"{b}/plain"] = build_scorer(artifact.model, b, threads)
    times: dict[str, list[float]] = {b: [] for b in scorers}
    for b in scorers:  # warm-up (first calls allocate, ORT/JIT specialise)
        for _ in range(5):
            scorers[b](rows.cat, rows.num)
    # Blocks of a few calls per scorer, rotating, the first call of each block untimed: with
    # several threads, the pool of the scorer that ran before keeps spinning for a moment and
    # would be charged to the next one (as it is not in a service, which runs one backend).
    block = 4
    for _ in range(max(1, calls // block)):
        for b in scorers:
            scorers[b](rows.cat, rows.num)
            for _ in range(block):
                t0 = time.perf_counter()
                scorers[b](rows.cat, rows.num)
                times[b].append(time.perf_counter() - t0)
    return {b: float(np.median(t)) for b, t in times.items()}


def _variant(label: str, threads: int) -> tuple[str, str | None]:
    """``name[:N|:default][+inline]`` -> (backend, RANKER_THREADS or None for the service's
    default); ``+inline`` is read by :func:`_inline`."""
    name, _, t = label.split("+")[0].partition(":")
    if not t:
        return name, str(threads)
    return name, None if t == "default" else str(int(t))


def _inline(label: str) -> bool:
    """``...+inline``: the forward pass on the event loop (``RANKER_FORWARD_THREAD=false``)."""
    return label.endswith("+inline")


@contextmanager
def busy_core() -> Iterator[int]:
    """A process spinning in pure Python on the last usable CPU while the block runs."""
    cpu = sorted(os.sched_getaffinity(0))[-1]
    code = f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        yield cpu
    finally:
        proc.kill()
        proc.wait()


def _pct(x: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(x) * 1000, q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=ROOT / "artifacts" / "default")
    ap.add_argument("--backends", default="eager,torchscript,onnx,onnx-int8")
    ap.add_argument("--requests", type=int, default=300, help="per backend and concurrency")
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--threads", type=int, default=1, help="RANKER_THREADS of each service")
    ap.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    ap.add_argument("--block", type=int, default=20, help="requests per backend per turn")
    ap.add_argument("--max-seconds", type=float, default=240.0, help="per concurrency level")
    ap.add_argument("--forward-calls", type=int, default=100)
    ap.add_argument("--out", type=Path, default=None, help="append the markdown table here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline", type=Path, default=None, help="another source tree to compare")
    ap.add_argument(
        "--busy-core",
        action="store_true",
        help="repeat each level with a busy-loop process on one core",
    )
    args = ap.parse_args()

    variants = args.backends.split(",")
    backends = [_variant(v, args.threads)[0] for v in variants]
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.busy_core:  # (c, busy) pairs: each level quiet, then with a core taken
        levels = [(c, busy) for c in levels for busy in (False, True)]
    else:
        levels = [(c, False) for c in levels]
    # what is served: (label, variant, source tree)
    services = [(v, v, ROOT) for v in variants]
    if args.baseline is not None:
        services.append((f"{variants[0]}@base", variants[0], args.baseline.resolve()))
    labels = [label for label, _, _ in services]
    artifact = load_artifact(args.artifact)
    from ranker.predictor import request_split

    # what each candidate costs as served (the request's user and context share once)
    flops = artifact.model.flops_per_row(request_split(artifact.model, artifact.encoder))
    bodies = request_bodies(artifact, 64, args.candidates, args.seed)
    rows = forward_rows(artifact, args.candidates, args.seed)
    forward = bare_forward(artifact, backends, args.threads, rows, args.forward_calls)

    chose: dict[str, str] = {}  # auto's choice per label, from its /readyz
    lat: dict[tuple[str, int, bool], list[float]] = {
        (b, c, busy): [] for b in labels for c, busy in levels
    }
    wall: dict[tuple[str, int], float] = {k: 0.0 for k in lat}
    stages: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp, ExitStack() as stack:
        tmpdir = Path(tmp)
        url = stack.enter_context(redis_server(tmpdir))
        from training.push import push_files

        d = artifact.config.data
        push_files(url, Path(d.users), Path(d.videos), d.user_key, d.video_key, progress=False)
        ports = {}
        for label, variant, source in services:
            b, threads = _variant(variant, args.threads)
            env = {
                "RANKER_ARTIFACT": str(args.artifact.resolve()),
                "RANKER_REDIS_URL": url,
                "RANKER_BACKEND": b,
                "RANKER_LOG_LEVEL": "warning" if b != "auto" else "info",
                "RANKER_RANKING_CONFIG": str(ROOT / "configs" / "ranking.toml"),
            }
            if _inline(variant):
                env["RANKER_FORWARD_THREAD"] = "false"
            if threads is not None:
                env["RANKER_THREADS"] = threads
            elif "RANKER_THREADS" in os.environ:
                del os.environ["RANKER_THREADS"]  # the service's default, not this shell's
            log = tmpdir / f"service-{label}.log"
            workers = ["--workers", str(args.workers)] if args.workers > 1 else []
            running = serve(env, workers, log_path=log, timeout=180.0, source=source)
            ports[label] = stack.enter_context(running).port
            if b == "auto":
                chose[label] = _auto_choice(ports[label])
        conns = Connections()
        stack.callback(conns.close)
        top = max(c for c, _ in levels)
        for b in labels:  # warm-up (and every connection opened), then the counters start
            replay(ports[b], bodies[: 2 * top], top, time.monotonic() + 60, conns)
        for c, busy in levels:
            before = {b: stage_totals(ports[b]) for b in labels}
            deadline = time.monotonic() + args.max_seconds
            sent = 0
            with busy_core() if busy else nullcontext():
                while sent < args.requests and time.monotonic() < deadline:
                    n = min(args.block, args.requests - sent)
                    for b in labels:
                        part = [bodies[(sent + i) % len(bodies)] for i in range(n)]
                        t0 = time.perf_counter()
                        lat[(b, c, busy)] += replay(ports[b], part, c, deadline, conns)
                        wall[(b, c, busy)] += time.perf_counter() - t0
                    sent += n
            for b in labels:
                after = stage_totals(ports[b])
                stages[f"{b} | {c}{' busy' if busy else ''}"] = {
                    s: (after[s][0] - before[b].get(s, (0.0, 0.0))[0])
                    / max(after[s][1] - before[b].get(s, (0.0, 0.0))[1], 1)
                    * 1000
                    for s in after
                }

    table = render(args, labels, levels, lat, wall, forward, stages, flops, chose)
    print(table)
    if args.out is not None:
        with args.out.open("a") as f:
            f.write(table + "\n")


def _auto_choice(port: int) -> str:
    """What ``auto`` chose and measured, from the service's ``/readyz``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/readyz")
    ready = orjson.loads(conn.getresponse().read())
    conn.close()
    sel = ready.get("engine_selection") or {}
    tried = ", ".join(
        f"{t['engine']} {t['ms']:.2f} ms" if t["ms"] is not None else f"{t['engine']} refused"
        for t in sel.get("trials", [])
    )
    return f"{ready.get('engine')} ({tried})"


def render(  # noqa: ANN001, PLR0913
    args, backends, levels, lat, wall, forward, stages, flops: int, chose: dict[str, str]
) -> str:
    """The results as markdown: the run's facts, the latency table, the stage breakdown."""
    cpu = cpu_model()
    load = os.getloadavg()[0]
    lines = [
        f"### {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores ({cpu}; "
        f"{describe()}), load average {load:.1f}",
        "",
        f"`{' '.join(['bench/serve.py', *sys.argv[1:]])}`; {args.candidates} candidates, "
        f"RANKER_THREADS={args.threads}, {args.workers} worker(s), features from Redis; model "
        f"{flops / 1e6:.2f} MFLOP per candidate as served, the user's and context's share of the "
        f"first layers computed once per request ({flops * args.candidates / 1e9:.2f} GFLOP "
        "per request).",
        *[f"`auto` ({label}) chose: {text}" for label, text in chose.items()],
        "",
        "| backend | c | core taken | requests | p50 ms | p90 ms | p99 ms | req/s | candidates/s "
        "| busy / quiet | bare forward ms | every row in full | service's forward stage ms "
        "(mean) | e2e p50 / forward stage |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for c, busy in levels:
        for b in backends:
            x = lat[(b, c, busy)]
            if not x:
                continue
            rps = len(x) / wall[(b, c, busy)]
            quiet = lat.get((b, c, False))
            ratio = rps / (len(quiet) / wall[(b, c, False)]) if busy and quiet else nan
            base = _variant(b.split("@")[0], args.threads)[0]  # a baseline's row: today's forward
            fwd = forward.get(base, nan) * 1000
            plain = forward.get(f"{base}/plain", nan) * 1000
            stage = stages.get(f"{b} | {c}{' busy' if busy else ''}", {}).get("forward", nan)
            lines.append(
                f"| {b} | {c} | {'yes' if busy else 'no'} | {len(x)} | {_pct(x, 50):.2f} | "
                f"{_pct(x, 90):.2f} | {_pct(x, 99):.2f} | {rps:.0f} | "
                f"{rps * args.candidates:,.0f} | {ratio:.2f} | {fwd:.2f} | {plain:.2f} | "
                f"{stage:.2f} | {_pct(x, 50) / stage:.1f} |"
            )
    names = sorted({s for v in stages.values() for s in v})
    if names:
        lines += [
            "",
            "Mean ms per stage (service's `ranker_stage_duration_seconds`; at c > 1 `decode` "
            "includes the wait for the event loop):",
            "",
            "| backend | c | " + " | ".join(names) + " |",
            "|---" * (len(names) + 2) + "|",
        ]
        for key, per in stages.items():
            cells = " | ".join(f"{per.get(s, float('nan')):.2f}" for s in names)
            lines.append(f"| {key} | {cells} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
