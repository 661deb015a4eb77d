"""Live counters in Redis: one state for every worker and replica.

With ``RANKER_REDIS_URL`` set, a model with ``[live]`` counters keeps their state in the feature
store's Redis (layout: :mod:`ranker.live_store`) instead of in each process:

* reads ride in the request's one MGET (:class:`CounterRequest` adds its keys to the feature
  store's; ``service/redis_store.py``), so they cost no round trip of their own, and a slow or
  down Redis degrades them with the features: the counters' columns get their defaults (0, the
  training mean) and the response says ``degraded``;
* ``POST /v1/events`` runs :data:`ranker.live_store.UPDATE_LUA` once per counter record the
  batch touches: per event one ``SET NX`` of its id under the record's hash tag (with a TTL)
  and, only when that succeeds, the record's update, atomically; a retried batch, on any
  worker, counts once in every record. The calls go out in one pipeline (redis-py's cluster
  pipeline: one round trip per node, nodes in parallel), since every call touches one slot;
* ``ranker push-state`` fills the state from a log (``training/push_state.py``), what the
  in-process state builds from the training log at start-up.

The encoding (request entity keys, decay, smoothed rates, standardisation) is
:class:`service.live_state.LiveState`'s, so the features equal the in-process ones
(``tests/service/test_live_redis.py``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from ranker.config import Config
from ranker.errors import RankerError
from ranker.history import Recent
from ranker.live import (
    Counts,
    Entity,
    Events,
    VideoAttributes,
    decay_tau,
    engaged,
    video_attribute_columns,
)
from ranker.live_store import (
    EVENT_ID_TTL_S,
    HISTORY_LUA,
    STATE_TTL_S,
    UPDATE_LUA,
    counter_prefix,
    event_id_key,
    history_key,
    record_keys,
    unpack,
    unpack_history,
    video_bytes,
)
from service.live_state import ContextValue, EventBatch, LiveState

if TYPE_CHECKING:
    from service.redis_store import RedisStore

EVENTS_PER_SCRIPT = 500  # events per atomic script call: bounds how long one call holds Redis


class CountersUnavailable(RankerError):
    """Redis did not take the events (down, slow, an error): nothing or part was counted, and a
    retry of the same batch counts each event once. ``fresh``: which events were counted."""

    def __init__(self, message: str, fresh: np.ndarray | None = None) -> None:
        super().__init__(message)
        self.fresh = fresh


class CounterRequest:
    """The counter records one request needs (unique per counter) and their decoding."""

    def __init__(self, state: RedisLiveState, ev: Events) -> None:
        self.state, self.ev = state, ev
        self.keys: list[str] = []
        self.parts: list[tuple[int, int, np.ndarray, Entity, Events]] = []
        one = ev.first()  # per-request counters: one entity for every candidate, as in-process
        for spec, prefix in zip(state.live.counters, state.prefixes, strict=True):
            rows = one if spec.per_request else ev
            ent = rows.entity(spec)
            uniq, inverse = np.unique(ent.key[ent.ok], return_inverse=True)
            start = len(self.keys)
            self.keys += record_keys(prefix, uniq.tolist())
            self.parts.append((start, len(self.keys), inverse, ent, rows))
        self.user = int(ev.keys["user"][0]) if len(ev) else None
        self.recent: Recent | None = None  # the user's history, once decoded
        if state.live.history is not None and self.user is not None:
            self.keys.append(state.history_key(self.user))  # last: decode() reads it there

    def decode(self, values: list[bytes | None]) -> tuple[np.ndarray, bool]:
        """Standardised counter columns for the candidates, and whether the user has state."""
        n, now = len(self.ev), self.ev.times
        if self.state.live.history is not None and self.user is not None:
            self.recent = unpack_history(values[-1], self.state.live.history.length, "history")
        counts = []
        for spec, tau, (a, b, inverse, ent, rows) in zip(
            self.state.live.counters, self.state.taus, self.parts, strict=True
        ):
            _, imp, sums, last, ref = unpack(values[a:b], spec, f"live counter {spec.name}")
            imp, sums, last, ref = imp[inverse], sums[inverse], last[inverse], ref[inverse]
            ok, at = ent.ok, ent.rows(rows.times)
            if tau is not None:  # decayed to the request's time, as Totals.current does
                with np.errstate(over="ignore", invalid="ignore"):  # a state newer than `at`
                    f = np.exp(-(at[ok] - np.nan_to_num(ref)) / tau)
                    imp, sums = imp * f, sums * f[:, None]
            m = len(ok)
            c = Counts(np.zeros(m), np.zeros((m, len(spec.events))), np.full(m, np.nan))
            c.impressions[ok], c.sums[ok], c.last_time[ok] = imp, sums, last
            pooled = ent.pool(c, len(rows))
            counts.append(pooled.repeat(n) if spec.per_request else pooled)
        return self.state.encode(counts, now)


class RedisLiveState(LiveState):
    """:class:`LiveState` whose totals and event ids live in Redis (the feature store's)."""

    remote = True

    def __init__(
        self,
        config: Config,
        params: dict[str, Any],
        store: RedisStore,
        state_ttl_s: int = STATE_TTL_S,
        event_id_ttl_s: int = EVENT_ID_TTL_S,
    ) -> None:
        assert config.live is not None
        d = config.data
        attrs = VideoAttributes.from_parquet(
            Path(d.videos), d.video_key, video_attribute_columns(config.live)
        )
        self._setup(config, params, attrs)
        self.totals = []
        self.store = store
        self.state_ttl_s, self.event_id_ttl_s = state_ttl_s, event_id_ttl_s
        prefix, unit = store.keys.prefix, d.time_unit_s
        self.prefixes = [counter_prefix(prefix, config.live, c, unit) for c in config.live.counters]
        self.taus = [decay_tau(c, unit) for c in config.live.counters]
        # An event that updates no record still has its id remembered (under its own tag)
        self.ids = f"{prefix}:live-id:"
        self.shas: dict[str, str] = {}  # script source -> its SHA1, once loaded
        self.history = None  # the history lives in Redis too: history_key()

    def history_key(self, user: int) -> str:
        return history_key(self.store.keys.prefix, self.live, self.config.data.time_unit_s, user)

    def recent(self, user_id: int) -> Recent | None:
        raise NotImplementedError("a Redis history is read with the features (request())")

    def history_calls(
        self, batch: EventBatch, fresh: np.ndarray
    ) -> list[tuple[list[str], list[Any], list[int]]]:
        """The fresh engaged events of a batch as :data:`HISTORY_LUA` calls, one user's events
        per call (one key, so one slot on a cluster)."""
        if self.live.history is None:
            return []
        ev = self.batch_events(batch, np.flatnonzero(fresh))
        users, times, videos = engaged(self.live, ev)
        vb = video_bytes(videos)
        order = np.argsort(users, kind="stable")
        bounds = np.flatnonzero(np.diff(users[order])) + 1
        calls: list[tuple[list[str], list[Any], list[int]]] = []
        for group in np.split(order, bounds) if len(order) else []:
            for a in range(0, len(group), EVENTS_PER_SCRIPT):
                part = group[a : a + EVENTS_PER_SCRIPT].tolist()
                key = self.history_key(int(users[part[0]]))
                args: list[Any] = [self.state_ttl_s, self.live.history.length]
                for i in part:
                    args += [repr(float(times[i])), vb[i].tobytes()]
                calls.append(([key] * len(part), args, []))
        return calls

    @property
    def nbytes(self) -> int:
        return 0

    def describe(self) -> str:
        names = ", ".join(c.name for c in self.live.counters)
        return f"live counters ({names}) in Redis {self.store.where}"

    def request(
        self,
        user_id: int,
        video_ids: np.ndarray,
        context: dict[str, ContextValue],
        now: float | None,
    ) -> CounterRequest:
        return CounterRequest(self, self.request_events(user_id, video_ids, context, now))

    def features(
        self,
        user_id: int,
        video_ids: np.ndarray,
        context: dict[str, ContextValue],
        now: float | None,
    ) -> tuple[np.ndarray, bool]:
        raise NotImplementedError("Redis counters are read with the features (request())")

    def ingest(self, batch: EventBatch) -> tuple[int, int]:
        raise NotImplementedError("Redis counters are written with ingest_async()")

    def script_calls(self, batch: EventBatch) -> list[tuple[list[str], list[Any], list[int]]]:
        """The batch as :data:`UPDATE_LUA` calls, one per counter record (chunks of at most
        ``EVENTS_PER_SCRIPT`` events), every key of a call in the record's slot: ``(keys,
        args, the batch positions of its events)``. An event no counter takes is one call of
        its own that only remembers its id."""
        self.check_types(batch)
        n = len(batch.ids)
        ev = self.batch_events(batch, np.arange(n))
        times, imps = ev.times.tolist(), ev.impressions.tolist()
        # record key -> [(event position, args of its update)], in event order
        per_record: dict[str, list[tuple[int, list[Any]]]] = {}
        touched = np.zeros(n, bool)
        for spec, prefix, idx, tau in zip(
            self.live.counters, self.prefixes, self.index, self.taus, strict=True
        ):
            ent = ev.entity(spec)
            rows = ent.rows(np.arange(n))[ent.ok]  # an event per value of a multi-valued key
            touched[rows] = True
            rkeys = record_keys(prefix, ent.key[ent.ok].tolist())
            vals = ev.values[rows][:, idx].tolist()
            for i, rk, v in zip(rows.tolist(), rkeys, vals, strict=True):
                entry = [repr(times[i]), repr(imps[i]), 1, repr(float(tau or 0)), len(v)]
                per_record.setdefault(rk, []).append((i, entry + [repr(x) for x in v]))
        calls: list[tuple[list[str], list[Any], list[int]]] = []
        for rk, entries in per_record.items():
            for a in range(0, len(entries), EVENTS_PER_SCRIPT):
                chunk = entries[a : a + EVENTS_PER_SCRIPT]
                keys, args = [], [self.event_id_ttl_s, self.state_ttl_s, len(chunk)]
                for i, entry in chunk:
                    keys += [event_id_key(rk, batch.ids[i]), rk]
                    args += entry
                calls.append((keys, args, [i for i, _ in chunk]))
        for i in np.flatnonzero(~touched).tolist():
            calls.append(
                (
                    [f"{self.ids}{{{batch.ids[i]}}}"],
                    [self.event_id_ttl_s, self.state_ttl_s, 1, 0, 0, 0],
                    [i],
                )
            )
        return calls

    async def _run(
        self, calls: list[tuple[list[str], list[Any], list[int]]], script: str = UPDATE_LUA
    ) -> list[Any]:
        """Every call of ``script`` in one pipeline (per node on a cluster, nodes in parallel),
        by EVALSHA; calls a node answers NOSCRIPT (a fresh or failed-over master) are sent again
        after loading the script there. Safe: a repeated call counts nothing twice."""
        client = self.store.client
        if script not in self.shas:
            self.shas[script] = await client.script_load(script)
        sha = self.shas[script]
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            pipe = client.pipeline(transaction=False)
            for c in todo:
                keys, args, _ = calls[c]
                pipe.evalsha(sha, len(keys), *keys, *args)
            out = await pipe.execute(raise_on_error=False)
            missing = []
            for c, r in zip(todo, out, strict=True):
                if isinstance(r, NoScriptError) and attempt == 0:
                    missing.append(c)
                elif isinstance(r, Exception):
                    raise r
                else:
                    results[c] = r
            if not missing:
                break
            await client.script_load(script)
            todo = missing
        return results

    async def ingest_async(self, batch: EventBatch) -> tuple[int, int]:
        """Counts the events not seen before (by id, on any worker); ``(accepted, duplicates)``:
        an event is accepted when some record counted it now."""
        accepted = int((await self.ingest_fresh_async(batch)).sum())
        return accepted, len(batch.ids) - accepted

    async def ingest_fresh_async(self, batch: EventBatch) -> np.ndarray:
        """Counts the events not seen before (by id, on any worker); which were (``(n,)``
        bool). The calls go in one pipeline, so on a failure it is not known which of them a
        node ran: :class:`CountersUnavailable` then carries no event as counted (the event log
        keeps none of the batch; a retry counts only what was not counted, by id)."""
        calls = self.script_calls(batch)
        budget = max(self.store.timeout_s, 5.0)
        fresh = np.zeros(len(batch.ids), bool)
        try:
            async with asyncio.timeout(budget):
                results = await self._run(calls)
                for (_, _, events), r in zip(calls, results, strict=True):
                    fresh[events] |= np.asarray(r, bool)
                # Histories after the counters, for the events whose ids were fresh: a fault in
                # between loses those events' history entries (their ids are taken), not counts.
                history = self.history_calls(batch, fresh)
                if history:
                    await self._run(history, HISTORY_LUA)
        except TimeoutError:
            raise CountersUnavailable(
                f"live counters: Redis {self.store.where} did not take the events within "
                f"{budget:g} s; retry the batch (ids make it safe)",
                fresh,
            ) from None
        except (RedisError, RedisClusterException, OSError) as e:
            raise CountersUnavailable(
                f"live counters: Redis {self.store.where}: {type(e).__name__}: {e}; "
                f"retry the batch (ids make it safe)",
                fresh,
            ) from None
        return fresh
