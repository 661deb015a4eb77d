"""Feature store: push throughput and lookup latency (one user + 500 videos) on a real Redis.

Starts its own ``redis-server`` on a free loopback port (no persistence, a temporary directory),
pushes the default world's users and videos tables with the push job (``--scale N`` pushes the
tables N times over with fresh ids, for throughput on a bigger table), then times lookups of one
random user and ``--candidates`` random videos, ``--iterations`` times after a warm-up:

- ``MGET only``: the store's one round trip (command packed by hiredis, reply parsed by hiredis);
- ``MGET, redis-py packing``: the same through ``redis.asyncio.Redis.mget``, for comparison;
- ``RedisStore.lookup``: what a request pays: MGET + ``np.frombuffer`` + Arrow + the encoder;
- ``InProcessStore.lookup``: the in-process tables' gather, the no-Redis default.

    .venv/bin/python bench/feature_store.py                      # ~1 min on 2 cores
    .venv/bin/python bench/feature_store.py --iterations 300     # a quick look
    .venv/bin/python bench/feature_store.py --cluster            # one node vs a Redis Cluster

``--cluster`` runs the comparison instead, in one run: a single ``redis-server`` and a Redis
Cluster of 3 masters + 3 replicas (``tests/conftest.py``'s launcher), each pushed the scaled
tables with 1 and ``--writers`` parallel writers (rows/s), then ``RedisStore.lookup`` of one
user + ``--candidates`` videos with the entity cache off (every record read from Redis on every
lookup, the worst case) at concurrency 1 and 8 (one event loop, as one service worker), plus
``MEMORY USAGE`` of the records (capacity plan: ``docs/capacity.md``).

The encoder is the artifact's (``--artifact``, default ``artifacts/default``) or, without one,
fitted on the tables (the timings do not depend on its vocabularies' contents).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ranker.config import load_config  # noqa: E402
from ranker.features import EncoderFitter, FeatureEncoder  # noqa: E402
from ranker.tables import FeatureTable  # noqa: E402

WORLD = ["--n-users", "10000", "--n-videos", "5000", "--n-requests", "25000", "--seed", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(directory: Path) -> tuple[subprocess.Popen, int]:
    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed: apt-get install redis-server")
    port = free_port()
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [*args, "--dir", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return proc, port
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("redis-server did not start") from None
            time.sleep(0.02)


def world(path: Path) -> Path:
    """The default world, generated with ``make demo``'s settings when missing."""
    if not (path / "users.parquet").is_file():
        print(f"{path} is missing: generating it (as make demo does)", flush=True)
        cmd = [sys.executable, "-m", "ranker", "generate", "--out", str(path), "--quiet", *WORLD]
        subprocess.run(cmd, cwd=ROOT, check=True)
    return path


def scaled(table: pa.Table, key: str, scale: int) -> pa.Table:
    """The table ``scale`` times over, each copy with its ids shifted past the previous ones."""
    if scale == 1:
        return table
    span = int(pc.max(table[key]).as_py()) + 1
    parts = []
    for i in range(scale):
        t = table.set_column(table.schema.get_field_index(key), key, pc.add(table[key], i * span))
        parts.append(t)
    return pa.concat_tables(parts)


def encoder_for(artifact: Path, config_path: Path, users: pa.Table, videos: pa.Table):  # noqa: ANN201
    """``(encoder, config)``: the artifact's, or one fitted on the tables."""
    from ranker.artifact import load_artifact
    from ranker.errors import ArtifactError

    try:
        a = load_artifact(artifact)
        return a.encoder, a.config, f"artifact {a.path}"
    except ArtifactError:
        config = load_config(config_path)
        fitter = EncoderFitter(config.features)
        fitter.update(users, "user")
        fitter.update(videos, "video")
        return fitter.finish(), config, "an encoder fitted on the tables (no artifact)"


async def timed(fn: Callable[[int], Awaitable[object]], n: int, warmup: int) -> np.ndarray:
    for i in range(warmup):
        await fn(i)
    out = np.empty(n)
    for i in range(n):
        t = time.perf_counter()
        await fn(i)
        out[i] = time.perf_counter() - t
    return out * 1e6  # microseconds


async def lookups(
    url: str,
    encoder: FeatureEncoder,
    config,  # noqa: ANN001
    users: pa.Table,
    videos: pa.Table,
    args: argparse.Namespace,
) -> tuple[dict[str, np.ndarray], str]:
    from service.redis_store import RedisStore
    from service.settings import Settings
    from service.store import InProcessStore

    rng = np.random.default_rng(0)
    user_ids = rng.choice(users["user_id"].to_numpy(), args.iterations + args.warmup)
    all_videos = videos["video_id"].to_numpy()
    video_ids = [
        rng.choice(all_videos, args.candidates, replace=False).astype(np.int64)
        for _ in range(args.iterations + args.warmup)
    ]
    # The service's default timeout; no retry pause, so every lookup really asks Redis.
    store = RedisStore.from_settings(Settings(redis_url=url, redis_retry_ms=0), encoder)
    ok, detail = await store.ready()
    assert ok, detail
    version = store._version
    assert version is not None
    d = config.data
    in_process = InProcessStore(
        FeatureTable.build(users, d.user_key, encoder, "user", "users"),
        FeatureTable.build(videos, d.video_key, encoder, "video", "videos"),
    )

    def keys(i: int) -> list[str]:
        k = [store.keys.current, f"{version.user_prefix}{user_ids[i]}"]
        return k + [version.video_prefix + s for s in map(str, video_ids[i].tolist())]

    degraded: list[int] = []

    async def lookup(i: int) -> None:
        r = await store.lookup(int(user_ids[i]), video_ids[i])
        if r.degraded is not None:
            assert "did not answer" in r.degraded, r.degraded
            degraded.append(i)

    n_all = args.iterations + args.warmup
    fetched = [await store._mget(keys(i)) for i in range(n_all)]
    ids1 = [np.array([u], np.int64) for u in user_ids]

    async def decode(i: int) -> None:
        version.user.encode(fetched[i % n_all][1:2], ids1[i])
        version.video.encode(fetched[i % n_all][2:], video_ids[i])

    async def in_proc(i: int) -> None:
        await in_process.lookup(int(user_ids[i]), video_ids[i])

    n, w = args.iterations, args.warmup
    results = {
        "MGET only (hiredis packing, one round trip)": await timed(
            lambda i: store._mget(keys(i)), n, w
        ),
        "MGET, redis-py packing": await timed(lambda i: store.client.mget(keys(i)), n, w),
        "decode + encode only (frombuffer, Arrow, encoder; no I/O)": await timed(decode, n, w),
        "RedisStore.lookup (MGET + decode + encode)": await timed(lookup, n, w),
        "InProcessStore.lookup (no Redis)": await timed(in_proc, n, w),
    }
    await store.close()
    timed_out = sum(i >= w for i in degraded)  # warm-up iterations come first
    return results, f"{timed_out} of {n} lookups hit the {store._ms} ms default timeout"


async def concurrent_lookups(
    url: str,
    encoder: FeatureEncoder,
    user_ids: np.ndarray,
    video_ids: list[np.ndarray],
    concurrency: int,
    warmup: int,
) -> tuple[np.ndarray, float, int]:
    """``(per-lookup microseconds, lookups/s, degraded lookups)`` of ``RedisStore.lookup`` with
    the entity cache off, ``concurrency`` lookups in flight on one event loop. The timeout is
    2 s, not the service's 50 ms: on a shared machine the 50 ms fires on busy moments and the
    row would time the defaults instead of Redis."""
    from service.redis_store import RedisStore
    from service.settings import Settings

    settings = Settings(
        redis_url=url, redis_retry_ms=0, redis_timeout_ms=2000, feature_cache_entries=0
    )
    store = RedisStore.from_settings(settings, encoder)
    ok, detail = await store.ready()
    assert ok, detail
    for i in range(warmup):
        await store.lookup(int(user_ids[i]), video_ids[i])
    n = len(user_ids) - warmup
    times = np.empty(n)
    degraded = 0

    async def worker(w: int) -> None:
        nonlocal degraded
        for i in range(w, n, concurrency):
            t = time.perf_counter()
            r = await store.lookup(int(user_ids[warmup + i]), video_ids[warmup + i])
            times[i] = time.perf_counter() - t
            degraded += r.degraded is not None

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - t0
    await store.close()
    return times * 1e6, n / wall, degraded


async def cluster_reads(url: str, keys: list[list[str]], warmup: int) -> dict[str, np.ndarray]:
    """The cluster read alone (no decoding), the store's per-node read against redis-py's
    ``mget_nonatomic`` on the same keys, alternating lookup by lookup; microseconds."""
    from service.redis_cluster import ClusterReader, cluster_client

    client = cluster_client(url, 16, 2.0)
    reader = ClusterReader(client)
    ways = {
        "per node, hiredis (the store's)": reader.per_node,
        "redis-py mget_nonatomic": client.mget_nonatomic,
    }
    out = {name: np.empty(len(keys) - warmup) for name in ways}
    for i, k in enumerate(keys):
        for name, read in ways.items():
            t = time.perf_counter()
            values = await read(k)
            if i >= warmup:
                out[name][i - warmup] = (time.perf_counter() - t) * 1e6
            assert values[0] is not None
    await client.aclose()
    return out


def record_memory(client, keys: list[str]) -> float:  # noqa: ANN001 - redis.Redis / RedisCluster
    """Mean ``MEMORY USAGE`` (bytes, key and Redis's per-key overhead included) of ``keys``."""
    return float(np.mean([client.memory_usage(k, samples=0) for k in keys]))


def cluster_comparison(args: argparse.Namespace, users: pa.Table, videos: pa.Table) -> None:
    """Single node vs Redis Cluster, same run: push rows/s with 1 and N writers, lookups at
    concurrency 1 and 8, record memory."""
    sys.path.insert(0, str(ROOT / "bench"))
    from machine import cpu_model

    from ranker.feature_store import Keys, cluster_url
    from tests.conftest import RedisClusterNodes
    from training.push import connect, push_tables

    encoder, _, enc_from = encoder_for(Path(args.artifact), Path(args.config), users, videos)
    big = {
        "user": (scaled(users, "user_id", args.scale), "user_id"),
        "video": (scaled(videos, "video_id", args.scale), "video_id"),
    }
    rows = sum(t.num_rows for t, _ in big.values())
    rng = np.random.default_rng(0)
    total = args.iterations + args.warmup
    user_ids = rng.choice(big["user"][0]["user_id"].to_numpy(), total)
    all_videos = big["video"][0]["video_id"].to_numpy()
    video_ids = [
        rng.choice(all_videos, args.candidates, replace=False).astype(np.int64)
        for _ in range(total)
    ]
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    (tmp / "single").mkdir()
    proc, port = start_redis(tmp / "single")
    cluster = RedisClusterNodes(tmp / "cluster")
    push_rows: dict[tuple[str, int], float] = {}
    lookup_rows: dict[tuple[str, int], tuple[np.ndarray, float, int]] = {}
    memory: dict[str, float] = {}
    reads: dict[str, np.ndarray] = {}
    try:
        cluster.start()
        urls = {"single node": f"redis://127.0.0.1:{port}/0", "cluster 3+3": cluster.url()}
        for name, url in urls.items():
            client = connect(url)
            for writers in (1, args.writers):
                r = [
                    push_tables(client, big, "ranker:fs", progress=False, writers=writers)
                    for _ in range(args.pushes)
                ]
                push_rows[name, writers] = float(np.median([x.rows_per_second for x in r]))
            version = client.get(Keys("ranker:fs").current).decode()
            k = Keys("ranker:fs")
            sample = rng.choice(len(user_ids), 1000)
            memory[f"{name}: user record"] = record_memory(
                client, [f"{k.entity(version, 'user')}{user_ids[i]}" for i in sample]
            )
            memory[f"{name}: video record"] = record_memory(
                client, [f"{k.entity(version, 'video')}{all_videos[i]}" for i in sample]
            )
            client.close()
            for c in (1, 8):
                lookup_rows[name, c] = asyncio.run(
                    concurrent_lookups(url, encoder, user_ids, video_ids, c, args.warmup)
                )
            if name.startswith("cluster"):
                vk, uk = k.entity(version, "video"), k.entity(version, "user")
                keys = [
                    [k.current, f"{uk}{user_ids[i]}", *(f"{vk}{v}" for v in video_ids[i].tolist())]
                    for i in range(total)
                ]
                reads = asyncio.run(cluster_reads(cluster_url(url)[0], keys, args.warmup))
    finally:
        cluster.stop()
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)

    load = os.getloadavg()[0]
    print(
        f"\nSingle redis-server vs Redis Cluster (3 masters + 3 replicas), all on loopback; "
        f"CPU: {cpu_model()}, {os.cpu_count()} CPUs, load average {load:.1f} when done; "
        f"encoder: {enc_from}\n"
    )
    print(f"Push of {rows:,} rows (whole job), median of {args.pushes}, rows/s\n")
    print("| deployment | 1 writer | " + f"{args.writers} writers |")
    print("|---|---:|---:|")
    for name in urls:
        print(f"| {name} | {push_rows[name, 1]:,.0f} | {push_rows[name, args.writers]:,.0f} |")
    print(
        f"\nRedisStore.lookup, 1 user + {args.candidates} videos, entity cache off, "
        f"{args.iterations} lookups after {args.warmup} warm-up, microseconds\n"
    )
    print("| deployment | concurrency | p50 | p99 | min | lookups/s | degraded |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (name, c), (t, rate, bad) in lookup_rows.items():
        p50, p99 = np.percentile(t, 50), np.percentile(t, 99)
        print(f"| {name} | {c} | {p50:,.0f} | {p99:,.0f} | {t.min():,.0f} | {rate:,.0f} | {bad} |")
    print(
        f"\nThe cluster read alone (pointer + user + {args.candidates} videos, no decoding), "
        "the two ways alternating, microseconds\n"
    )
    print("| read | p50 | p99 | min |")
    print("|---|---:|---:|---:|")
    for what, t in reads.items():
        p50, p99 = np.percentile(t, 50), np.percentile(t, 99)
        print(f"| {what} | {p50:,.0f} | {p99:,.0f} | {t.min():,.0f} |")
    print("\nMEMORY USAGE, mean of 1,000 records (key, value and Redis's per-key overhead)\n")
    for what, b in memory.items():
        print(f"- {what}: {b:.0f} bytes")
    print(
        f"\nRerun: .venv/bin/python bench/feature_store.py --cluster --iterations "
        f"{args.iterations} --candidates {args.candidates} --scale {args.scale} "
        f"--writers {args.writers} --pushes {args.pushes}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", default="data/default")
    p.add_argument("--artifact", default="artifacts/default")
    p.add_argument("--config", default="configs/default.toml")
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--candidates", type=int, default=500)
    p.add_argument("--scale", type=int, default=10, help="push the tables this many times over")
    p.add_argument("--pushes", type=int, default=3, help="pushes timed (the median is shown)")
    p.add_argument("--cluster", action="store_true", help="single node vs Redis Cluster instead")
    p.add_argument("--writers", type=int, default=4, help="parallel writers (--cluster)")
    args = p.parse_args()
    os.chdir(ROOT)
    if args.cluster:
        wdir = world(Path(args.world))
        users = pq.read_table(wdir / "users.parquet")
        videos = pq.read_table(wdir / "videos.parquet")
        cluster_comparison(args, users, videos)
        return

    from training.push import push_tables

    wdir = world(Path(args.world))
    users = pq.read_table(wdir / "users.parquet")
    videos = pq.read_table(wdir / "videos.parquet")
    encoder, config, enc_from = encoder_for(Path(args.artifact), Path(args.config), users, videos)
    tmp = Path(tempfile.mkdtemp(prefix="bench-redis-"))
    proc, port = start_redis(tmp)
    try:
        import redis

        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis(port=port)
        big = {
            "user": (scaled(users, "user_id", args.scale), "user_id"),
            "video": (scaled(videos, "video_id", args.scale), "video_id"),
        }
        rows = sum(t.num_rows for t, _ in big.values())
        pushes = [push_tables(client, big, "bench:big", progress=False) for _ in range(args.pushes)]
        push_rate = float(np.median([r.rows_per_second for r in pushes]))
        memory = client.info("memory")["used_memory"]
        client.flushdb()
        tables = {"user": (users, "user_id"), "video": (videos, "video_id")}
        push_tables(client, tables, "ranker:fs", progress=False)
        timings, timeouts = asyncio.run(lookups(url, encoder, config, users, videos, args))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)

    load = os.getloadavg()[0]
    print(
        f"\nFeature store on redis-server (loopback), {os.cpu_count()} CPUs, load average "
        f"{load:.1f} when done; encoder: {enc_from}\n"
    )
    print(
        f"Push: {rows:,} rows ({args.scale}x the world's {users.num_rows:,} users and "
        f"{videos.num_rows:,} videos), median of {args.pushes} pushes: {push_rate:,.0f} rows/s "
        f"(whole job: pack, write, switch, clean-up); Redis memory with {min(args.pushes, 2)} "
        f"version(s) held: "
        f"{memory / 2**20:.0f} MiB, about {memory / (min(args.pushes, 2) * rows):.0f} bytes per "
        f"entity.\n"
    )
    print(
        f"Lookup: 1 user + {args.candidates} videos, {args.iterations} iterations after "
        f"{args.warmup} warm-up, microseconds\n"
    )
    print("| path | p50 | p99 | min |")
    print("|---|---:|---:|---:|")
    for name, t in timings.items():
        p50, p99 = np.percentile(t, 50), np.percentile(t, 99)
        print(f"| {name} | {p50:,.0f} | {p99:,.0f} | {t.min():,.0f} |")
    print(f"\n(min: the closest to an idle machine when the load average is high; {timeouts})")
    print(
        f"\nRerun: .venv/bin/python bench/feature_store.py --iterations {args.iterations} "
        f"--candidates {args.candidates} --scale {args.scale}"
    )


if __name__ == "__main__":
    main()
