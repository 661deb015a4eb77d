"""Overload: the real service offered twice what it sustains, with and without the in-flight bound.

1. **Sustainable rate**: closed loop at concurrency 8 (the level that keeps one worker's forward
   thread busiest, docs/performance.md) against the service with the bound on; its requests/s
   is what one worker sustains, ``X``.
2. **Open loop at ``--factor`` x X** (default 2): requests are scheduled at fixed intervals
   whatever the answers do, as independent users send them, and sent by a pool of client
   threads with one keep-alive connection each. Latency counts from the *scheduled* send time,
   so a client thread that starts late because the service is slow is charged to the service
   (no coordinated omission, Tene's "How NOT to measure latency"). The services (bound on:
   ``RANKER_MAX_IN_FLIGHT`` default; bound off: 0; optionally ``+deadline``) are driven in
   turns of ``--block-s`` seconds, repeated ``--rounds`` times, so they see the same noise.

Reported per variant: answers by status (200, 503, any other: must be none), p50 / p99 / max of
the admitted (200) requests, the mean latency of each block's first and last second (a queue
that grows shows as last >> first), and goodput (200s per second, from the first send to the
last answer: a queue that grew is drained before the clock stops).

    .venv/bin/python bench/overload.py --artifact artifacts/default

Features come from the in-process store (no Redis): the service's own CPU is what is measured.
"""

from __future__ import annotations

import argparse
import http.client
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401 - puts the repository on sys.path
from machine import cpu_model  # noqa: E402
from serve import request_bodies  # noqa: E402

from ranker.artifact import load_artifact  # noqa: E402
from ranker.cpu import describe  # noqa: E402
from service.launch import serve  # noqa: E402
from service.settings import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HEADERS = {"content-type": "application/json"}


@dataclass
class Outcome:
    statuses: dict[int, int] = field(default_factory=dict)
    ok_latency: list[float] = field(default_factory=list)  # seconds, 200s only
    ok_at: list[float] = field(default_factory=list)  # scheduled time within its block, s
    degraded: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


def closed_loop(port: int, bodies: list[bytes], concurrency: int) -> float:
    """Requests/s with ``concurrency`` clients each sending its next request on an answer."""
    lock = threading.Lock()
    done = [0]

    def client(part: list[bytes]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for body in part:
            conn.request("POST", "/v1/rank", body, HEADERS)
            r = conn.getresponse()
            r.read()
            if r.status == 200:
                with lock:
                    done[0] += 1
        conn.close()

    threads = [
        threading.Thread(target=client, args=(bodies[i::concurrency],)) for i in range(concurrency)
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0] / (time.perf_counter() - t0)


def open_loop(
    port: int, bodies: list[bytes], rate: float, seconds: float, clients: int, out: Outcome
) -> None:
    """Sends ``rate`` requests/s for ``seconds`` at fixed intervals; adds to ``out``."""
    n = int(rate * seconds)
    todo: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    for i in range(n):
        todo.put(i)
    lock = threading.Lock()
    start = time.perf_counter() + 0.05

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            i = todo.get()
            if i is None:
                break
            at = start + i / rate
            pause = at - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            try:
                conn.request("POST", "/v1/rank", bodies[i % len(bodies)], HEADERS)
                r = conn.getresponse()
                data = r.read()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                with lock:
                    out.errors.append(f"{type(e).__name__}: {e}")
                continue
            latency = time.perf_counter() - at
            with lock:
                out.statuses[r.status] = out.statuses.get(r.status, 0) + 1
                if r.status == 200:
                    out.ok_latency.append(latency)
                    out.ok_at.append(at - start)
                    out.degraded += b'"degraded":true' in data[:400]
                elif r.status != 503:
                    out.errors.append(f"{r.status}: {data[:200]!r}")
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for _ in threads:
        todo.put(None)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.seconds += time.perf_counter() - start  # until the last answer: a queue drains late


def _ms(x: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(x) * 1000, q)) if x else float("nan")


def first_last(out: Outcome, block_s: float) -> tuple[float, float]:
    """Mean latency (ms) of 200s scheduled in the first and in the last second of a block."""
    at = np.asarray(out.ok_at)
    lat = np.asarray(out.ok_latency) * 1000
    if len(at) == 0:
        return float("nan"), float("nan")
    first, last = lat[at < 1.0], lat[at >= block_s - 1.0]
    return (
        float(first.mean()) if len(first) else float("nan"),
        float(last.mean()) if len(last) else float("nan"),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=ROOT / "artifacts" / "default")
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--factor", type=float, default=2.0, help="offered / sustainable rate")
    ap.add_argument("--block-s", type=float, default=5.0, help="seconds per variant per turn")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", type=int, default=96, help="open-loop client threads")
    ap.add_argument("--calibrate", type=int, default=200, help="closed-loop requests")
    ap.add_argument("--threads", type=int, default=1, help="RANKER_THREADS")
    ap.add_argument("--backend", default="eager")
    ap.add_argument("--max-in-flight", type=int, default=None, help="default: the service's")
    ap.add_argument("--deadline-ms", type=float, default=None, help="also a +deadline variant")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    artifact = load_artifact(a.artifact)
    bodies = request_bodies(artifact, 64, a.candidates, a.seed)
    bound = a.max_in_flight if a.max_in_flight is not None else Settings().max_in_flight
    base = {
        "RANKER_ARTIFACT": str(a.artifact),
        "RANKER_THREADS": str(a.threads),
        "RANKER_BACKEND": a.backend,
        "RANKER_LOG_LEVEL": "warning",
    }
    variants = {
        f"bound {bound}": {"RANKER_MAX_IN_FLIGHT": str(bound)},
        "no bound": {"RANKER_MAX_IN_FLIGHT": "0"},
    }
    if a.deadline_ms is not None:
        deadline = {"RANKER_DEADLINE_MS": str(a.deadline_ms)}
        variants[f"bound {bound} + deadline {a.deadline_ms:g} ms"] = {
            "RANKER_MAX_IN_FLIGHT": str(bound),
        } | deadline

    print(f"# CPU: {cpu_model()}; {describe()}")
    print(f"# {' '.join(sys.argv)}")
    print(
        f"# {a.backend}, {a.threads} thread(s), one worker, {a.candidates} candidates, in-process"
    )
    services = {}
    from contextlib import ExitStack

    with ExitStack() as stack:
        for name, env in variants.items():
            services[name] = stack.enter_context(serve(base | env)).port
        first = next(iter(services.values()))
        for port in services.values():  # warm-up: first requests allocate buffers
            closed_loop(port, bodies[:16], 4)
        rate = closed_loop(first, (bodies * 10)[: a.calibrate], 8)
        offered = a.factor * rate
        print(f"# sustainable (closed loop, c=8): {rate:.1f} requests/s")
        print(f"# offered (open loop): {offered:.1f} requests/s for {a.block_s:g} s per turn\n")
        outcomes = {name: Outcome() for name in services}
        blocks = {name: [] for name in services}
        for _ in range(a.rounds):
            for name, port in services.items():
                one = Outcome()
                open_loop(port, bodies, offered, a.block_s, a.clients, one)
                blocks[name].append(first_last(one, a.block_s))
                o = outcomes[name]
                for s, c in one.statuses.items():
                    o.statuses[s] = o.statuses.get(s, 0) + c
                o.ok_latency += one.ok_latency
                o.degraded += one.degraded
                o.errors += one.errors
                o.seconds += one.seconds
                time.sleep(1.0)  # let a queue left behind drain before the next turn
    print(
        "| variant | sent | 200 | 503 | other | p50 ms (200) | p99 ms (200) | max ms (200) "
        "| first s / last s mean ms | goodput /s | degraded |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for name, o in outcomes.items():
        ok = o.statuses.get(200, 0)
        shed = o.statuses.get(503, 0)
        failed = len([e for e in o.errors if not e[:3].isdigit()])  # no answer at all
        other = sum(c for s, c in o.statuses.items() if s not in (200, 503)) + failed
        fl = " ; ".join(f"{f:.0f} / {lst:.0f}" for f, lst in blocks[name])
        print(
            f"| {name} | {sum(o.statuses.values()) + failed} | {ok} | {shed} | {other} "
            f"| {_ms(o.ok_latency, 50):.1f} | {_ms(o.ok_latency, 99):.1f} "
            f"| {_ms(o.ok_latency, 100):.1f} | {fl} | {ok / o.seconds:.1f} | {o.degraded} |"
        )
    for name, o in outcomes.items():
        if o.errors:
            print(f"# {name}: {len(o.errors)} errors, first: {o.errors[0]}")


if __name__ == "__main__":
    main()
