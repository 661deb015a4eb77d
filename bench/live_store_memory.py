"""Redis memory of live counter state (``ranker/live_store.py``): a synthetic world's log pushed
with ``push-state`` into a fresh ``redis-server``, ``MEMORY USAGE`` of every record per counter,
the same records stored as hashes instead (the layout not chosen), and an event id key.

    .venv/bin/python bench/live_store_memory.py                  # 3000 requests x 20 rows
    .venv/bin/python bench/live_store_memory.py --requests 10000

Prints bytes per entity (mean over every key of the counter), the push rate and the CPU.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from live_cost import LIVE  # noqa: E402
from machine import cpu_model  # noqa: E402

from ranker.config import _apply_override, parse_config  # noqa: E402
from ranker.live import OfflineCounters  # noqa: E402
from ranker.live_store import counter_prefix, event_id_key, pack_totals  # noqa: E402
from training.push_state import push_state  # noqa: E402
from training.synth import WorldConfig, generate  # noqa: E402


def start_redis(directory: Path) -> tuple[subprocess.Popen, redis.Redis]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("redis-server")
    assert exe, "redis-server is not installed"
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.02)
    return proc, client


def mean_usage(client: redis.Redis, pattern: str) -> tuple[int, float]:
    keys = list(client.scan_iter(match=pattern, count=10_000))
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.memory_usage(k, samples=0)
    sizes = pipe.execute()
    return len(keys), float(np.mean(sizes)) if sizes else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=3000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        n = a.requests
        generate(
            WorldConfig.small(n_requests=n, n_users=max(n // 3, 500), n_videos=max(n // 2, 500)),
            world,
            progress=False,
        )
        d = tomllib.loads((ROOT / "configs/default.toml").read_text())
        for o in (
            f'data.log="{world / "log"}"',
            f'data.users="{world / "users.parquet"}"',
            f'data.videos="{world / "videos.parquet"}"',
        ):
            _apply_override(d, o)
        d["live"] = LIVE
        cfg = parse_config(d)
        proc, client = start_redis(Path(tmp))
        try:
            t0 = time.perf_counter()
            r = push_state(client, cfg, [world / "log"], "bench", progress=False)
            print(f"push-state: {sum(r.entities.values()):,} entities in {r.seconds:.2f} s "
                  f"({r.per_second:,.0f}/s, building the state from the log included; "
                  f"{time.perf_counter() - t0:.2f} s in all)")  # fmt: skip
            print(
                "| counter | sums | entities | packed string, bytes/entity | hash, bytes/entity |"
            )
            print("|---|---|---|---|---|")
            assert cfg.live is not None
            unit = cfg.data.time_unit_s
            for tot in (c.totals() for c in OfflineCounters(cfg, [world / "log"]).counters):
                pre = counter_prefix("bench", cfg.live, tot.spec, unit)
                count, packed = mean_usage(client, pre + "*")
                # The same records as hashes (one field per value), for comparison.
                hpre = pre.replace("bench:", "hash:", 1)
                rec = pack_totals(tot)
                pipe = client.pipeline(transaction=False)
                for k, row in zip(tot.keys.tolist(), rec.tolist(), strict=True):
                    pipe.hset(f"{hpre}{k}", mapping={str(i): repr(v) for i, v in enumerate(row)})
                    pipe.expire(f"{hpre}{k}", 86400)
                pipe.execute()
                _, hashed = mean_usage(client, hpre + "*")
                print(f"| {tot.spec.name} | {len(tot.spec.events)} | {count:,} | {packed:.0f} "
                      f"| {hashed:.0f} |")  # fmt: skip
            # One id key per counter record an event updates, under the record's hash tag
            rec_key = f"{pre}4711}}"
            for i in range(10_000):
                key = event_id_key(rec_key, f"{1000000 + i}:{2000000 + i}:c")
                client.set(key, "1", nx=True, ex=86400)
            _, per_id = mean_usage(client, "bench:live-id:*")
            print(f"event id key (a 17-byte id under a record tag, with TTL): {per_id:.0f} bytes")
            print(f"redis-server {client.info('server')['redis_version']}; CPU: {cpu_model()}")
            print(f"rerun: .venv/bin/python bench/live_store_memory.py --requests {n}")
        finally:
            client.close()
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
