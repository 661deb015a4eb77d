"""The Redis feature store: one MGET per request, raw values encoded with the model's encoder.

Redis holds raw feature values pushed by ``ranker push-features`` (layout:
:mod:`ranker.feature_store`), so one push serves every model trained on the same tables. A lookup
is one round trip: ``MGET P:current P:N:u:<user> P:N:v:<video>...`` with ``N`` the version this
process last saw. MGET is atomic, and a version's keys are written before the pointer moves to it
and never changed afterwards; so when the pointer read in the same MGET still says ``N``, every
record came from version ``N`` at a moment when ``N`` was current. When it says something else, a
push has switched versions: the store loads the new version's meta and reads again (a rare
second and third round trip, once per version and process).

On a Redis Cluster (``redis+cluster://`` or ``RANKER_REDIS_CLUSTER=1``) the same lookup runs,
but one MGET cannot span hash slots: the keys go out grouped per node, one round trip per node,
the nodes asked in parallel (``service/redis_cluster.py``). The pointer read in that round trip
is no longer atomic with the records, and nothing needs it to be: a version's records are
written before the pointer names it and never change, so every record *found* under ``N`` is
``N``'s. Only a record *missing* is ambiguous (an unknown entity, or version ``N`` removed by
two later pushes while the request ran); then the store reads ``{P}:current`` and
``{P}:previous`` once more, and only if ``N`` is still one of them (a removed version never
comes back) are the missing entities taken as unknown; otherwise it reads again under the new
version.

Faults never fail a request: when Redis is down, slow (the per-request timeout), empty or holds
something unreadable, every entity gets the schema defaults, as unknown ids do, and the lookup
carries the reason (the response is flagged ``degraded``). After a connection failure or timeout
the store skips Redis for ``retry_ms`` so a dead or stalled server costs each request nothing
instead of a full timeout; the first request after that tries again, so it recovers by itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import hiredis
import numpy as np
import pyarrow as pa
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from ranker.config import Source
from ranker.errors import ConfigError, RankerError, StoreError
from ranker.feature_store import (
    Keys,
    RecordLayout,
    VersionMeta,
    check_prefix,
    cluster_url,
    redact,
)
from ranker.features import Encoded, FeatureEncoder
from service.entity_cache import EntityCache
from service.redis_cluster import ClusterReader, cluster_client
from service.settings import Settings
from service.store import Lookup

if TYPE_CHECKING:
    from service.redis_live import CounterRequest

log = logging.getLogger("ranker.service.redis")

VERSIONS_KEPT = 2  # decoded version metas kept per process: current and previous (rollback)


class _SourceDecoder:
    """Turns one source's MGET values into encoded rows: frombuffer, Arrow columns, encode."""

    def __init__(self, layout: RecordLayout, encoder: FeatureEncoder, source: Source) -> None:
        self.layout, self.encoder, self.source = layout, encoder, source
        specs = encoder.of(source)
        self.wanted = list(dict.fromkeys(f.source_column for f in specs))
        self.lacking = layout.lacking(self.wanted)
        # Null columns for what the version lacks, typed as the encoder expects them.
        self.null_types: dict[str, pa.DataType] = {}
        for f in specs:
            if f.source_column in self.lacking:
                if f.kind == "numeric":
                    t = pa.float64()
                else:
                    t = pa.int64() if encoder.vocabs[f.name].is_int else pa.string()
                self.null_types.setdefault(f.source_column, t)
        self.packed = [n for n in self.wanted if n not in self.lacking and n != layout.key]
        self.dtype = layout.dtype

    def encode(self, values: list[bytes | None], ids: np.ndarray) -> tuple[Encoded, np.ndarray]:
        """``(encoded (n, ...), missing (n,) bool)``; missing entities get the defaults."""
        n = len(values)
        found = np.fromiter((v is not None for v in values), bool, n)
        out = self.encoder.defaults(self.source, n)
        k = int(found.sum())
        if k:
            buf = b"".join(values) if k == n else b"".join(filter(None, values))
            if len(buf) != k * self.dtype.itemsize:
                raise StoreError(
                    f"{self.source} records are not {self.dtype.itemsize} bytes as the version's "
                    f"meta says: corrupt or written by another layout"
                )
            records = np.frombuffer(buf, self.dtype)  # (k,) structured
            cols = self.layout.to_arrow(records, self.packed)
            if self.layout.key in self.wanted:
                cols[self.layout.key] = pa.array(ids[found], pa.int64())
            for name, t in self.null_types.items():
                cols[name] = pa.nulls(k, t)
            batch = pa.RecordBatch.from_pydict(cols)  # arrays, not chunked: no re-chunking
            enc = self.encoder.encode(batch, self.source, f"feature store {self.source}s")
            out.cat[found] = enc.cat
            out.num[found] = enc.num
        return out, ~found


class _Version:
    """One pushed version as this process reads it (immutable once pushed)."""

    def __init__(
        self, meta: VersionMeta, keys: Keys, encoder: FeatureEncoder, cache_entries: int = 0
    ) -> None:
        missing = [s for s in ("user", "video") if s not in meta.layouts]
        if missing:
            raise StoreError(f"{keys.meta(meta.version)} describes no {missing} records")
        self.id = meta.version
        self.id_bytes = meta.version.encode()
        self.user_prefix = keys.entity(self.id, "user")
        self.video_prefix = keys.entity(self.id, "video")
        self.user = _SourceDecoder(meta.layouts["user"], encoder, "user")
        self.video = _SourceDecoder(meta.layouts["video"], encoder, "video")
        # Encoded entities of this version (exact: a version never changes; entity_cache.py)
        self.user_cache = EntityCache(encoder.defaults("user"), cache_entries)
        self.video_cache = EntityCache(encoder.defaults("video"), cache_entries)
        self.rows = {s: lay.rows for s, lay in meta.layouts.items()}
        lacking = [f"{d.source}.{c}" for d in (self.user, self.video) for c in d.lacking]
        # A version without some column the model reads still serves the rest; the column gets
        # its default and every response says so.
        self.problem = (
            f"feature store version {self.id} lacks column(s) {lacking}: push the tables again"
            if lacking
            else None
        )


class _Plan:
    """One lookup against one version: what the caches hold (copied now, before any await) and
    which keys the MGET must fetch; then the fetched records decoded, cached and merged."""

    def __init__(self, version: _Version, user_id: int, video_ids: np.ndarray) -> None:
        self.version = version
        self.user_ids = np.array([user_id], np.int64)
        self.video_ids = video_ids
        self.user_found, self.user_rows, self.user_missing = version.user_cache.find(self.user_ids)
        self.found, self.rows, self.missing = version.video_cache.find(video_ids)
        self.fetch_user = not self.user_found[0]
        self.fetch_videos = video_ids[~self.found]
        self.keys = [f"{version.user_prefix}{user_id}"] if self.fetch_user else []
        self.keys += [f"{version.video_prefix}{v}" for v in self.fetch_videos.tolist()]

    def complete_user(self, values: list[bytes | None]) -> tuple[Encoded, np.ndarray]:
        if not self.fetch_user:
            return self.user_rows, self.user_missing
        user, missing = self.version.user.encode(values[:1], self.user_ids)
        self.version.user_cache.add(self.user_ids, user, missing)
        return user, missing

    def complete_videos(self, values: list[bytes | None]) -> tuple[Encoded, np.ndarray]:
        fetched = values[1:] if self.fetch_user else values
        if len(self.fetch_videos) == 0:
            return self.rows, self.missing
        new, new_missing = self.version.video.encode(fetched, self.fetch_videos)
        self.version.video_cache.add(self.fetch_videos, new, new_missing)
        if not self.found.any():
            return new, new_missing
        n = len(self.video_ids)
        out = Encoded(
            np.empty((n, new.cat.shape[1]), new.cat.dtype),
            np.empty((n, new.num.shape[1]), new.num.dtype),
        )
        missing = np.empty(n, bool)
        out.cat[self.found], out.num[self.found], missing[self.found] = (
            self.rows.cat,
            self.rows.num,
            self.missing,
        )
        out.cat[~self.found], out.num[~self.found], missing[~self.found] = (
            new.cat,
            new.num,
            new_missing,
        )
        return out, missing


class RedisStore:
    """A :class:`service.store.FeatureStore` reading raw features from Redis (asyncio, pooled)."""

    name = "redis"

    def __init__(
        self,
        client: Redis | RedisCluster,
        encoder: FeatureEncoder,
        prefix: str,
        timeout_s: float,
        retry_s: float,
        where: str,
        cache_entries: int = 0,
    ) -> None:
        self.client = client
        self.cluster = isinstance(client, RedisCluster)
        self._cluster = ClusterReader(client) if isinstance(client, RedisCluster) else None
        self.cache_entries = cache_entries
        self.encoder = encoder
        self.keys = Keys(check_prefix(prefix))
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.where = where  # the URL without its password, for messages
        self._version: _Version | None = None
        self._versions: dict[str, _Version] = {}
        self._down_until = 0.0
        self._down_reason: str | None = None
        self.lookups = 0
        self.degraded_lookups = 0

    @classmethod
    def from_settings(cls, settings: Settings, encoder: FeatureEncoder) -> RedisStore:
        """A store on ``settings.redis_url``; connects lazily, so a Redis that is down at start-up
        only degrades responses until it is back."""
        assert settings.redis_url is not None
        url = settings.redis_url.get_secret_value()
        plain, cluster = cluster_url(url, settings.redis_cluster)
        timeout_s = settings.redis_timeout_ms / 1000
        where = f"{redact(url)}{' (cluster)' if cluster else ''} {settings.redis_prefix}"
        if cluster:
            return cls(
                cluster_client(plain, settings.redis_pool_size, timeout_s),
                encoder,
                settings.redis_prefix,
                timeout_s,
                settings.redis_retry_ms / 1000,
                where,
                settings.feature_cache_entries,
            )
        try:
            pool = BlockingConnectionPool.from_url(
                plain,
                max_connections=settings.redis_pool_size,
                timeout=timeout_s,  # waiting for a free connection counts against the timeout too
                socket_timeout=max(timeout_s, 1.0),  # the per-request timeout is the real bound
                socket_connect_timeout=max(timeout_s, 1.0),
                retry=Retry(NoBackoff(), 1),  # once, at once: a connection the server dropped
            )
        except ValueError as e:
            raise ConfigError(f"redis_url: invalid Redis URL {redact(url)}: {e}") from None
        return cls(
            Redis.from_pool(pool),
            encoder,
            settings.redis_prefix,
            timeout_s,
            settings.redis_retry_ms / 1000,
            where,
            settings.feature_cache_entries,
        )

    async def lookup(
        self, user_id: int, video_ids: np.ndarray, counters: CounterRequest | None = None
    ) -> Lookup:
        """The user's and videos' features; with ``counters``, their live counter records ride
        in the same MGET (``service/redis_live.py``) and fill ``Lookup.live``."""
        self.lookups += 1
        now = time.monotonic()
        if now < self._down_until:
            return self._fallback(len(video_ids), f"{self._down_reason} (not retried for now)")
        n = len(video_ids)
        try:
            async with asyncio.timeout(self.timeout_s):
                plan, values, counted = await self._fetch(user_id, video_ids, counters)
        except TimeoutError:
            return self._down(n, f"Redis did not answer within {self._ms} ms")
        except (RedisConnectionError, OSError) as e:
            return self._down(n, f"Redis unreachable: {type(e).__name__}: {e}")
        except (RedisError, RedisClusterException) as e:  # the latter: no node for a slot
            return self._down(n, f"Redis error: {type(e).__name__}: {e}")
        except StoreError as e:  # the server answered: no cool-down, the next request retries
            return self._fallback(n, str(e))
        try:
            user, user_missing = plan.complete_user(values)
            videos, videos_missing = plan.complete_videos(values)
            live, user_has_state = counters.decode(counted) if counters else (None, False)
        except (RankerError, pa.ArrowException, ValueError, TypeError) as e:
            # Records the encoder cannot read (a layout or type this model does not expect):
            # a store fault like any other, answered with the defaults.
            return self._fallback(n, f"version {plan.version.id}: {type(e).__name__}: {e}")
        if self._down_reason is not None:
            log.warning("feature store %s: answering again", self.where)
            self._down_reason, self._down_until = None, 0.0
        if plan.version.problem is not None:
            self.degraded_lookups += 1
        return Lookup(
            user,
            videos,
            bool(user_missing[0]),
            videos_missing,
            plan.version.problem,
            live,
            user_has_state,
        )

    async def _fetch(
        self, user_id: int, video_ids: np.ndarray, counters: CounterRequest | None = None
    ) -> tuple[_Plan, list, list]:
        """One MGET of the pointer, every record this process has not cached for the version
        and the request's counter records; more only when the version changed. Returns the
        plan, the feature records and the counter records."""
        extra = counters.keys if counters is not None else []
        version = self._version
        if version is None:
            version = await self._load(await self.client.get(self.keys.current))
        for _ in range(3):
            plan = _Plan(version, user_id, video_ids)
            values = await self.read([self.keys.current, *plan.keys, *extra])
            if values[0] == version.id_bytes:
                split = 1 + len(plan.keys)
                records = values[1:split]
                if self.cluster and None in records and not await self._still_held(version):
                    version = await self._load(await self.client.get(self.keys.current))
                    continue
                self._version = version
                return plan, records, values[split:]
            version = await self._load(values[0])
        raise StoreError("the current feature version changed three times during one request")

    async def read(self, keys: list[str]) -> list[bytes | None]:
        """The values of ``keys`` in one round trip: one MGET on a single node (atomic); on a
        cluster one round trip per node, the nodes in parallel (``service/redis_cluster.py``)."""
        if self._cluster is not None:
            return await self._cluster.read(keys)
        return await self._mget(keys)

    async def _still_held(self, version: _Version) -> bool:
        """Whether ``version`` is still current or previous, hence not removed (the clean-up
        removes only versions that are neither, and such a version never becomes either
        again): its records missing from a read just made are unknown entities."""
        current, previous = await self.client.mget(self.keys.current, self.keys.previous)
        return version.id_bytes in (current, previous)

    async def _mget(self, keys: list[str]) -> list[bytes | None]:
        """MGET on a pooled connection, the command packed by hiredis in C: redis-py's asyncio
        client packs in Python, about 1.3 ms for 500 keys, as long as the round trip itself.
        A connection the server dropped (a Redis restart) is retried once on a fresh one."""
        packed = hiredis.pack_command(("MGET", *keys))
        pool = self.client.connection_pool
        conn = await pool.get_connection()
        try:
            try:
                await conn.send_packed_command(packed, check_health=False)
                return await conn.read_response()
            except RedisConnectionError:
                await conn.disconnect()
                await conn.send_packed_command(packed, check_health=False)
                return await conn.read_response()
        finally:
            await pool.release(conn)

    async def _load(self, current: bytes | None) -> _Version:
        """The version ``current`` names, from this process's cache or its meta key."""
        if current is None:
            raise StoreError(f"no feature version has been pushed ({self.keys.current} is unset)")
        vid = current.decode()
        cached = self._versions.get(vid)
        if cached is not None:
            return cached
        key = self.keys.meta(vid)
        raw = await self.client.get(key)
        if raw is None:
            raise StoreError(f"{key} is missing (the version was removed or never finished)")
        meta = VersionMeta.from_json(raw, key)
        version = _Version(meta, self.keys, self.encoder, self.cache_entries)
        self._versions = {vid: version, **dict(list(self._versions.items())[: VERSIONS_KEPT - 1])}
        log.info("feature store %s: reading version %s", self.where, vid)
        return version

    @property
    def _ms(self) -> str:
        return f"{self.timeout_s * 1000:g}"

    def _down(self, n: int, reason: str) -> Lookup:
        """A connection failure or timeout: defaults now, and no tries for ``retry_s``."""
        if self._down_reason is None:
            log.warning("feature store %s: %s; serving defaults", self.where, reason)
        self._down_until = time.monotonic() + self.retry_s
        self._down_reason = reason
        return self._fallback(n, reason)

    def _fallback(self, n: int, reason: str) -> Lookup:
        self.degraded_lookups += 1
        return Lookup(
            self.encoder.defaults("user"),
            self.encoder.defaults("video", n),
            True,
            np.ones(n, bool),
            f"feature store: {reason}; all features are the defaults",
        )

    async def ready(self) -> tuple[bool, str | None]:
        """Probes Redis (the current version's pointer and meta) and says what it serves; a
        success also ends a cool-down at once."""
        try:
            async with asyncio.timeout(max(self.timeout_s, 1.0)):
                version = await self._load(await self.client.get(self.keys.current))
        except TimeoutError:
            return False, f"{self.where}: no answer within {max(self.timeout_s, 1.0):g} s"
        except (RedisError, RedisClusterException, OSError) as e:
            return False, f"{self.where}: unreachable: {type(e).__name__}: {e}"
        except StoreError as e:
            return False, f"{self.where}: {e}"
        self._version = version
        self._down_until = 0.0
        rows = ", ".join(f"{n:,} {s}s" for s, n in version.rows.items())
        detail = f"{self.where}: version {version.id} ({rows})"
        if version.problem is not None:
            return False, f"{detail}; {version.problem}"
        return True, detail

    async def close(self) -> None:
        if self.cluster:
            await self.client.aclose()
        else:
            await self.client.aclose(close_connection_pool=True)
