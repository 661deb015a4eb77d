"""The measured inputs of the capacity plan (``docs/capacity.md``): Redis memory per record at
production id widths, on a plain node and on a cluster-mode node, the wire bytes a lookup moves
per key, the request body of 500 candidates, and one Redis node's GET throughput.

Starts two throwaway ``redis-server`` (one plain, one ``--cluster-enabled yes`` owning every
slot) on free loopback ports, writes records laid out exactly as the push and the live state
write them (``ranker/feature_store.py``, ``ranker/live_store.py``), with 9-digit user ids and
8-digit video ids (100M users, 10M videos), and reads ``MEMORY USAGE`` of each (mean of 1,000):

    .venv/bin/python bench/capacity.py

Then times ``redis-benchmark`` GETs of 41-byte values against the plain node (pipelined 16
deep, 50 clients), the ceiling of one Redis core on this machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hiredis
import numpy as np
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from feature_store import free_port  # noqa: E402
from machine import cpu_model  # noqa: E402

from ranker.feature_store import Keys  # noqa: E402
from ranker.live_store import event_id_key, record_keys  # noqa: E402

VERSION = "1765000000"  # a version number of today's width (>= the Unix time)
USER_BYTES, VIDEO_BYTES = 29, 41  # the default world's packed records (docs/feature-store.md)
COUNTER_BYTES = 8 * (3 + 2)  # a counter with two event sums (ranker/live_store.py)
HISTORY = (50, 200)  # list lengths measured for a per-user history of video ids


def start(directory: Path, cluster: bool) -> tuple[subprocess.Popen, redis.Redis, int]:
    directory.mkdir(parents=True)
    port = free_port()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    args += ["--appendonly", "no", "--dir", str(directory)]
    if cluster:
        args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port)
    for _ in range(500):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.02)
    if cluster:  # one node owning every slot: cluster-mode key accounting, plain commands
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
            time.sleep(0.05)
    return proc, client, port


def mean_usage(client: redis.Redis, keys: list[str]) -> float:
    return float(np.mean([client.memory_usage(k, samples=0) for k in keys]))


def measure(client: redis.Redis, rng: np.random.Generator) -> dict[str, float]:
    keys = Keys("ranker:fs")
    users = rng.integers(100_000_000, 999_999_999, 1000)
    videos = rng.integers(10_000_000, 99_999_999, 1000)
    out: dict[str, float] = {}
    pipe = client.pipeline(transaction=False)
    ukeys = [f"{keys.entity(VERSION, 'user')}{u}" for u in users.tolist()]
    vkeys = [f"{keys.entity(VERSION, 'video')}{v}" for v in videos.tolist()]
    for k in ukeys:
        pipe.set(k, os.urandom(USER_BYTES))
    for k in vkeys:
        pipe.set(k, os.urandom(VIDEO_BYTES))
    counter = "ranker:fs:live:{video.0123abcd:"
    ckeys = record_keys(counter, videos.tolist())
    for k in ckeys:
        pipe.set(k, os.urandom(COUNTER_BYTES), ex=30 * 86400)
    ikeys = [
        event_id_key(k, f"r{i}:v{v}:c") for i, (k, v) in enumerate(zip(ckeys, videos, strict=True))
    ]
    for k in ikeys:
        pipe.set(k, "1", nx=True, ex=86400)
    hkeys = {n: [f"ranker:fs:hist:{{u:{u}}}:{n}" for u in users[:200].tolist()] for n in HISTORY}
    for n, hk in hkeys.items():
        for k in hk:
            pipe.rpush(k, *rng.integers(10_000_000, 99_999_999, n).tolist())
    pipe.execute()
    out["user record (29 B value)"] = mean_usage(client, ukeys)
    out["video record (41 B value)"] = mean_usage(client, vkeys)
    out["live counter record (40 B value, TTL)"] = mean_usage(client, ckeys)
    out["event id key under a record's tag (TTL)"] = mean_usage(client, ikeys)
    for n, hk in hkeys.items():
        out[f"history list of {n} video ids"] = mean_usage(client, hk)
    return out


def wire_bytes(rng: np.random.Generator) -> dict[str, float]:
    """Bytes on the wire per key of a lookup: the GET as packed, its reply, and the request body
    of 500 candidates as the API takes it."""
    keys = Keys("ranker:fs")
    video = f"{keys.entity(VERSION, 'video')}{rng.integers(10_000_000, 99_999_999)}"
    get = len(hiredis.pack_command(("GET", video)))
    reply = len(f"${VIDEO_BYTES}\r\n") + VIDEO_BYTES + 2
    counter = record_keys("ranker:fs:live:{video.0123abcd:", [12345678])[0]
    cget = len(hiredis.pack_command(("GET", counter)))
    creply = len(f"${COUNTER_BYTES}\r\n") + COUNTER_BYTES + 2
    body = {
        "user_id": 123456789,
        "context": {"device": "ios", "hour": 20},
        "candidates": [{"video_id": int(v)} for v in rng.integers(10_000_000, 99_999_999, 500)],
    }
    return {
        "GET of a video record, sent": get,
        "its reply": reply,
        "GET of a counter record, sent": cget,
        "its reply ": creply,
        "POST /v1/rank body, 500 candidates (JSON)": len(json.dumps(body)),
    }


def get_throughput(port: int) -> str:
    exe = shutil.which("redis-benchmark")
    if exe is None:
        return "redis-benchmark not installed"
    cmd = [exe, "-p", str(port), "-t", "get", "-n", "2000000", "-P", "16", "-c", "50", "-d"]
    out = subprocess.run([*cmd, "41", "-q"], capture_output=True, text=True, check=False)
    m = re.search(r"GET: ([\d.]+) requests per second", out.stdout.replace("\r", "\n"))
    return f"{float(m.group(1)):,.0f} GETs/s" if m else out.stdout[-300:]


def main() -> None:
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-capacity-"))
    procs = []
    try:
        p1, plain, port = start(tmp / "plain", cluster=False)
        procs.append(p1)
        p2, clustered, _ = start(tmp / "cluster", cluster=True)
        procs.append(p2)
        mem = {"plain": measure(plain, np.random.default_rng(1))}
        mem["cluster"] = measure(clustered, np.random.default_rng(1))
        version = plain.info("server")["redis_version"]
        wire = wire_bytes(rng)
        gets = get_throughput(port)
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nCPU: {cpu_model()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"redis-server {version}; MEMORY USAGE, mean of 1,000 keys (200 for lists), bytes\n")
    print("| key | plain node | cluster-mode node |")
    print("|---|---:|---:|")
    for what in mem["plain"]:
        print(f"| {what} | {mem['plain'][what]:.0f} | {mem['cluster'][what]:.0f} |")
    print("\nWire bytes per key of a lookup, and the request body\n")
    for what, n in wire.items():
        print(f"- {what.strip()}: {n:,} bytes")
    print(f"\nOne Redis node, GET of 41-byte values, pipelined 16 deep, 50 clients: {gets}")
    print("\nRerun: .venv/bin/python bench/capacity.py")


if __name__ == "__main__":
    main()
