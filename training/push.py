"""``ranker push-features``: the users and videos tables into a new Redis feature-store version.

A push never touches the version the service reads. It writes every record under a new version
number, writes the version's meta last, then switches ``P:current`` with one atomic transaction
(keeping the old version as ``P:previous`` for rollback), and only then removes older versions.
A reader therefore sees either the old version or the new one, whole. A push that dies half way
leaves an unreferenced version that the next push removes, so rerunning is always safe; a lock
key keeps two pushes from interleaving (one's clean-up would delete the other's new version).
Layout: :mod:`ranker.feature_store` and ``docs/feature-store.md``.

The same code writes to one Redis node or to a Redis Cluster (:func:`connect` picks the client):
records go out in one pipeline per node and batch (``MSET`` on one node; one ``SET`` per key
on a cluster, where keys of different slots cannot share a command; :func:`write_many`);
the fixed keys share one hash slot, so the switch stays one ``MULTI``; clean-up scans every
master.
"""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot
from tqdm import tqdm

from ranker.config import Source
from ranker.errors import DataError, StoreError
from ranker.feature_store import Keys, RecordLayout, VersionMeta, check_prefix, cluster_url, redact

LOCK_TTL_MS = 60_000  # a crashed push blocks the next one at most this long
MSET_KEYS = 1_000  # keys per MSET command inside one pipelined batch

_REFRESH = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"  # noqa: E501
# Version numbers go up by one per push but never below the Unix time in seconds, so they stay
# unique when Redis is flushed or restored from an old snapshot: a service that cached version N's
# layout never meets a different version N.
_NEXT_VERSION = "local s = tonumber(redis.call('get', KEYS[1]) or '0'); local t = tonumber(ARGV[1]); if t > s then s = t end; s = s + 1; redis.call('set', KEYS[1], s); return s"  # noqa: E501
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"  # noqa: E501


@dataclass
class PushResult:
    version: str
    previous: str | None
    rows: dict[str, int]  # source -> entities written
    seconds: float
    removed: list[str] = field(default_factory=list)  # versions deleted after the switch
    skipped: dict[str, list[str]] = field(default_factory=dict)  # source -> unpacked columns

    @property
    def rows_per_second(self) -> float:
        return sum(self.rows.values()) / max(self.seconds, 1e-9)


Client = redis.Redis | RedisCluster


def connect(url: str, timeout_s: float = 30.0, cluster: bool | None = None) -> Client:
    """A synchronous client for the push job (``redis://``, ``rediss://``, password and db index
    come from the URL); generous timeouts: a push moves megabytes per round trip.

    A Redis Cluster client for ``redis+cluster://`` URLs, or when ``cluster`` (default: the
    environment's ``RANKER_REDIS_CLUSTER=1``, the service's setting) says so."""
    if cluster is None:
        cluster = os.environ.get("RANKER_REDIS_CLUSTER", "").lower() in ("1", "true", "yes")
    plain, is_cluster = cluster_url(url, cluster)
    kwargs = {"socket_timeout": timeout_s, "socket_connect_timeout": 5.0}
    try:
        if is_cluster:
            return RedisCluster.from_url(plain, **kwargs)
        return redis.Redis.from_url(plain, **kwargs)
    except ValueError as e:
        raise StoreError(f"invalid Redis URL {redact(url)}: {e}") from None
    except redis.RedisError as e:
        raise StoreError(f"Redis Cluster at {redact(url)}: {type(e).__name__}: {e}") from None


def is_cluster(client: Client) -> bool:
    return isinstance(client, RedisCluster)


def primaries(client: Client) -> list[redis.Redis]:
    """One plain client per master: the node itself, or every master of a cluster (SCAN and
    memory figures are per node)."""
    if is_cluster(client):
        return [client.get_redis_connection(n) for n in client.get_primaries()]
    return [client]


def write_many(client: Client, items: dict[str, bytes], ex: int | None = None) -> None:
    """Writes ``items`` in one round trip per node: on one node a pipeline of ``MSET`` chunks
    (``SET ... EX`` per key with ``ex``); on a cluster the keys grouped by the node serving
    their slot (redis-py's slot map) and one plain pipeline of ``SET``s per node, rather than
    redis-py's cluster pipeline, which routes each command through its policy machinery in
    Python. A slot that moved during the push answers MOVED and fails the push, which is safe
    to rerun."""
    if is_cluster(client):
        nodes: dict[str, tuple[redis.Redis, dict[str, bytes]]] = {}
        for k, v in items.items():
            node = client.nodes_manager.get_node_from_slot(key_slot(k.encode()))
            if node.name not in nodes:
                nodes[node.name] = (client.get_redis_connection(node), {})
            nodes[node.name][1][k] = v
        for conn, part in nodes.values():
            _pipeline(conn, part, ex, mset=False)
        return
    _pipeline(client, items, ex, mset=ex is None)


def _pipeline(client: redis.Redis, items: dict[str, bytes], ex: int | None, mset: bool) -> None:
    pipe = client.pipeline(transaction=False)
    if mset:
        keys = list(items)
        for k0 in range(0, len(keys), MSET_KEYS):
            pipe.mset({k: items[k] for k in keys[k0 : k0 + MSET_KEYS]})
    else:
        for k, v in items.items():
            pipe.set(k, v, ex=ex)
    pipe.execute()


class _Lock:
    """``{P}:lock`` with a random token: refreshed every batch, released only by its holder."""

    def __init__(self, client: Client, key: str) -> None:
        self.client, self.key, self.token = client, key, os.urandom(8).hex()

    def __enter__(self) -> _Lock:
        if not self.client.set(self.key, self.token, nx=True, px=LOCK_TTL_MS):
            ttl = self.client.pttl(self.key)
            raise StoreError(
                f"another push holds {self.key} (for {max(ttl, 0) / 1000:.0f} s more unless it "
                f"refreshes it); wait for it, or delete the key if no push is running"
            )
        return self

    def refresh(self) -> None:
        if not self.client.eval(_REFRESH, 1, self.key, self.token, LOCK_TTL_MS):
            raise StoreError(f"lost {self.key} (expired or taken over); push aborted")

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(redis.RedisError):  # unreleased, it expires by itself
            self.client.eval(_RELEASE, 1, self.key, self.token)


def _decode(v: bytes | None) -> str | None:
    return v.decode() if v is not None else None


def _write_batch(client: Client, prefix: str, ids: np.ndarray, records: np.ndarray) -> int:
    """One batch of records in one pipeline (one round trip per node); returns its rows."""
    size = records.dtype.itemsize
    buf = records.tobytes()
    keys = [prefix + s for s in map(str, ids.tolist())]
    write_many(client, {k: buf[j * size : (j + 1) * size] for j, k in enumerate(keys)})
    return len(keys)


def _write_source(
    client: Client,
    lock: _Lock,
    prefix: str,
    ids: np.ndarray,
    records: np.ndarray,
    batch_size: int,
    bar: tqdm,
    writers: int = 1,
) -> None:
    """Writes one source's records in batches, ``writers`` batches in flight at once (threads:
    the work is packing in redis-py and waiting on sockets); the lock is refreshed after every
    batch that completes."""
    spans = [(a, min(a + batch_size, len(ids))) for a in range(0, len(ids), batch_size)]
    with ThreadPoolExecutor(max(1, writers)) as pool:
        done = pool.map(
            lambda s: _write_batch(client, prefix, ids[s[0] : s[1]], records[s[0] : s[1]]), spans
        )
        for n in done:
            lock.refresh()
            bar.update(n)


def _unlink(node: redis.Redis, keys: list[bytes], cluster: bool) -> None:
    """UNLINKs keys a node holds: one multi-key UNLINK on a single node; on a cluster node,
    where a multi-key command must stay in one slot, one UNLINK per key in one pipeline."""
    if not cluster:
        node.unlink(*keys)
        return
    pipe = node.pipeline(transaction=False)
    for k in keys:
        pipe.unlink(k)
    pipe.execute()


def remove_versions(client: Client, keys: Keys, keep: set[str]) -> list[str]:
    """Deletes every registered version not in ``keep`` (records, meta, registry entry), and
    unregistered leftovers of a crashed push too; returns the versions removed. On a cluster
    every master is scanned (a SCAN walks one node's keys)."""
    registered = {v.decode() for v in client.zrange(keys.versions, 0, -1)}
    doomed: set[str] = set()
    batch: list[bytes] = []
    cluster = is_cluster(client)
    for node in primaries(client):
        for key in node.scan_iter(match=keys.scan_pattern(), count=10_000):
            v = keys.version_of(key.decode(errors="replace"))
            if v is not None and v not in keep:
                doomed.add(v)
                batch.append(key)
                if len(batch) >= 10_000:
                    _unlink(node, batch, cluster)
                    batch.clear()
        if batch:
            _unlink(node, batch, cluster)
            batch.clear()
    doomed |= registered - keep
    if doomed:
        client.zrem(keys.versions, *doomed)
    return sorted(doomed, key=int)


def push_tables(
    client: Client,
    tables: dict[Source, tuple[pa.Table, str]],
    prefix: str,
    batch_size: int = 5_000,
    progress: bool = True,
    origins: dict[Source, str] | None = None,
    writers: int = 1,
) -> PushResult:
    """Pushes ``source -> (table, key column)`` as a new version and makes it current.

    Every table is packed before the first write, so bad data fails without touching Redis.
    ``writers`` batches are written at once (useful on a cluster: more nodes to fill).
    """
    if batch_size <= 0:
        raise DataError(f"batch size must be positive, got {batch_size}")
    if writers <= 0:
        raise DataError(f"writers must be positive, got {writers}")
    keys = Keys(check_prefix(prefix))
    origins = origins or {}
    packed = {
        s: RecordLayout.pack(t, key, s, origins.get(s, f"{s} table"))
        for s, (t, key) in tables.items()
    }
    t0 = time.perf_counter()
    with _Lock(client, keys.lock) as lock:
        version = str(client.eval(_NEXT_VERSION, 1, keys.seq, int(time.time())))
        client.zadd(keys.versions, {version: time.time()})
        total = sum(len(ids) for _, ids, _ in packed.values())
        with tqdm(total=total, unit="rows", disable=not progress, desc=f"version {version}") as bar:
            for s, (_, ids, records) in packed.items():
                prefix_s = keys.entity(version, s)
                _write_source(client, lock, prefix_s, ids, records, batch_size, bar, writers)
        meta = VersionMeta(
            version, datetime.now(UTC).isoformat(), {s: lay for s, (lay, _, _) in packed.items()}
        )
        client.set(keys.meta(version), meta.to_json())
        # The switch: both keys in one MULTI/EXEC, so readers never see a new current with an
        # old previous (the lock keeps other pushes out between the GET and the EXEC).
        previous = _decode(client.get(keys.current))
        pipe = client.pipeline(transaction=True)
        pipe.set(keys.current, version)
        if previous is not None:
            pipe.set(keys.previous, previous)
        pipe.execute()
        removed = remove_versions(client, keys, {version} | ({previous} if previous else set()))
    return PushResult(
        version,
        previous,
        {s: len(ids) for s, (_, ids, _) in packed.items()},
        time.perf_counter() - t0,
        removed,
        {s: lay.skipped for s, (lay, _, _) in packed.items() if lay.skipped},
    )


def push_files(
    url: str,
    users: Path,
    videos: Path,
    user_key: str = "user_id",
    video_key: str = "video_id",
    prefix: str = "ranker:fs",
    batch_size: int = 5_000,
    progress: bool = True,
    writers: int = 1,
) -> PushResult:
    """Reads the two Parquet tables and pushes them (what ``ranker push-features`` runs)."""
    tables: dict[Source, tuple[pa.Table, str]] = {}
    for source, path, key in (("user", users, user_key), ("video", videos, video_key)):
        try:
            tables[source] = (pq.read_table(path), key)
        except (FileNotFoundError, OSError, pa.ArrowInvalid) as e:
            raise DataError(f"cannot read {source} table {path}: {e}") from None
    client = connect(url)
    try:
        return push_tables(
            client,
            tables,
            prefix,
            batch_size,
            progress,
            origins={"user": str(users), "video": str(videos)},
            writers=writers,
        )
    except redis.RedisError as e:
        raise StoreError(f"Redis at {redact(url)}: {type(e).__name__}: {e}") from None
    finally:
        client.close()


def rollback(url: str, prefix: str = "ranker:fs") -> tuple[str, str]:
    """Makes the previous version current again (and the current one previous); returns
    ``(current, previous)`` after the swap. Running it twice undoes it."""
    keys = Keys(check_prefix(prefix))
    client = connect(url)
    try:
        with _Lock(client, keys.lock):
            current, previous = map(_decode, client.mget(keys.current, keys.previous))
            if current is None or previous is None:
                raise StoreError(f"nothing to roll back to: {keys.previous} is not set")
            if not client.exists(keys.meta(previous)):
                raise StoreError(f"version {previous} is gone ({keys.meta(previous)} is missing)")
            pipe = client.pipeline(transaction=True)
            pipe.set(keys.current, previous)
            pipe.set(keys.previous, current)
            pipe.execute()
            return previous, current
    except redis.RedisError as e:
        raise StoreError(f"Redis at {redact(url)}: {type(e).__name__}: {e}") from None
    finally:
        client.close()
