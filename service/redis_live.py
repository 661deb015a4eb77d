"""Live counters in Redis: one state for every worker and replica.

With ``RANKER_REDIS_URL`` set, a model with ``[live]`` counters keeps their state in the feature
store's Redis (layout: :mod:`ranker.live_store`) instead of in each process:

* reads ride in the request's one MGET (:class:`CounterRequest` adds its keys to the feature
  store's; ``service/redis_store.py``), so they cost no round trip of their own, and a slow or
  down Redis degrades them with the features: the counters' columns get their defaults (0, the
  training mean) and the response says ``degraded``;
* ``POST /v1/events`` runs :data:`ranker.live_store.UPDATE_LUA`: per event one ``SET NX`` of its
  id (with a TTL) and, only when that succeeds, the update of every counter's record, in one
  atomic script; a retried batch, on any worker, counts once;
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
from redis.exceptions import RedisError

from ranker.config import Config
from ranker.errors import RankerError
from ranker.history import Recent
from ranker.live import (
    Counts,
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
    event_id_prefix,
    history_key,
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
    retry of the same batch counts each event once."""


class CounterRequest:
    """The counter records one request needs (unique per counter) and their decoding."""

    def __init__(self, state: RedisLiveState, ev: Events) -> None:
        self.state, self.ev = state, ev
        self.keys: list[str] = []
        self.parts: list[tuple[int, int, np.ndarray, np.ndarray]] = []
        for spec, prefix in zip(state.live.counters, state.prefixes, strict=True):
            key, ok = ev.entity(spec)
            uniq, inverse = np.unique(key[ok], return_inverse=True)
            start = len(self.keys)
            self.keys += [prefix + s for s in map(str, uniq.tolist())]
            self.parts.append((start, len(self.keys), inverse, ok))
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
        for spec, tau, (a, b, inverse, ok) in zip(
            self.state.live.counters, self.state.taus, self.parts, strict=True
        ):
            _, imp, sums, last, ref = unpack(values[a:b], spec, f"live counter {spec.name}")
            imp, sums, last, ref = imp[inverse], sums[inverse], last[inverse], ref[inverse]
            if tau is not None:  # decayed to the request's time, as Totals.current does
                f = np.exp(-(now[ok] - np.nan_to_num(ref)) / tau)
                imp, sums = imp * f, sums * f[:, None]
            c = Counts(np.zeros(n), np.zeros((n, len(spec.events))), np.full(n, np.nan))
            c.impressions[ok], c.sums[ok], c.last_time[ok] = imp, sums, last
            counts.append(c)
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
        self.ids = event_id_prefix(prefix)
        self.script = store.client.register_script(UPDATE_LUA)
        self.history_script = store.client.register_script(HISTORY_LUA)
        self.history = None  # the history lives in Redis too: history_key()

    def history_key(self, user: int) -> str:
        return history_key(self.store.keys.prefix, self.live, self.config.data.time_unit_s, user)

    def recent(self, user_id: int) -> Recent | None:
        raise NotImplementedError("a Redis history is read with the features (request())")

    def history_calls(self, batch: EventBatch, fresh: np.ndarray) -> list[tuple[list, list]]:
        """The fresh engaged events of a batch as :data:`HISTORY_LUA` calls."""
        if self.live.history is None:
            return []
        ev = self.batch_events(batch, np.flatnonzero(fresh))
        users, times, videos = engaged(self.live, ev)
        vb = video_bytes(videos)
        calls = []
        for start in range(0, len(users), EVENTS_PER_SCRIPT):
            stop = min(start + EVENTS_PER_SCRIPT, len(users))
            keys = [self.history_key(u) for u in users[start:stop].tolist()]
            args: list[Any] = [self.state_ttl_s, self.live.history.length]
            for i in range(start, stop):
                args += [repr(float(times[i])), vb[i].tobytes()]
            calls.append((keys, args))
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

    def script_calls(self, batch: EventBatch) -> list[tuple[list[str], list[Any]]]:
        """The batch as :data:`UPDATE_LUA` calls: ``(keys, args)`` per chunk of events."""
        self.check_types(batch)
        n = len(batch.ids)
        ev = self.batch_events(batch, np.arange(n))
        per_counter = []
        for spec, prefix, idx, tau in zip(
            self.live.counters, self.prefixes, self.index, self.taus, strict=True
        ):
            key, ok = ev.entity(spec)
            keys = [prefix + s for s in map(str, key.tolist())]
            per_counter.append((keys, ok.tolist(), ev.values[:, idx].tolist(), float(tau or 0)))
        times, imps = ev.times.tolist(), ev.impressions.tolist()
        calls = []
        for start in range(0, n, EVENTS_PER_SCRIPT):
            stop = min(start + EVENTS_PER_SCRIPT, n)
            keys: list[str] = []
            args: list[Any] = [self.event_id_ttl_s, self.state_ttl_s, stop - start]
            for i in range(start, stop):  # bounded: a batch holds at most MAX_EVENTS
                keys.append(self.ids + batch.ids[i])
                mine = [c for c in per_counter if c[1][i]]
                args += [repr(times[i]), repr(imps[i]), len(mine)]
                for ckeys, _, vals, tau in mine:
                    keys.append(ckeys[i])
                    args += [repr(tau), len(vals[i]), *map(repr, vals[i])]
            calls.append((keys, args))
        return calls

    async def ingest_async(self, batch: EventBatch) -> tuple[int, int]:
        """Counts the events not seen before (by id, on any worker); ``(accepted, duplicates)``."""
        calls = self.script_calls(batch)
        budget = max(self.store.timeout_s, 5.0)
        accepted = 0
        flags: list[int] = []
        try:
            async with asyncio.timeout(budget):
                for keys, args in calls:
                    flags += await self.script(keys=keys, args=args)
                    accepted = sum(flags)
                # Histories after the counters, for the events whose ids were fresh: a fault in
                # between loses those events' history entries (their ids are taken), not counts.
                for keys, args in self.history_calls(batch, np.asarray(flags, bool)):
                    await self.history_script(keys=keys, args=args)
        except TimeoutError:
            raise CountersUnavailable(
                f"live counters: Redis {self.store.where} did not take the events within "
                f"{budget:g} s; {accepted} counted so far, retry the batch (ids make it safe)"
            ) from None
        except (RedisError, OSError) as e:
            raise CountersUnavailable(
                f"live counters: Redis {self.store.where}: {type(e).__name__}: {e}; "
                f"{accepted} counted so far, retry the batch (ids make it safe)"
            ) from None
        return accepted, len(batch.ids) - accepted
