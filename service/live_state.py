"""Live counters at serving: state built from the training log at start-up, kept current by
``POST /v1/events``, read on every ranking request.

The state is :class:`ranker.live.Totals` per counter (per entity: impressions, event sums, last
impression time, reference time; ``8 * (4 + E)`` bytes per entity) plus the ids of recent events for
idempotence (``live.max_event_ids``, oldest forgotten first). It lives in the process: with
``--workers`` > 1 each worker keeps its own, so events must reach every worker (or run one).
The encoding is :mod:`ranker.live`'s, the offline path's, so the same events give the same
features; ``tests/service/test_live.py`` checks it over HTTP.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ranker.config import Config
from ranker.errors import RequestError
from ranker.history import HistoryState, Recent
from ranker.live import (
    Counts,
    Events,
    OfflineCounters,
    Totals,
    VideoAttributes,
    engaged,
    event_index,
    make_events,
    raw_features,
    standardise,
)
from ranker.live_events import _NULL

ContextValue = str | int | float | None


@dataclass
class EventBatch:
    """Decoded feedback events as columns (``service.schemas.EventsRequest`` after checks)."""

    ids: list[str]
    users: np.ndarray  # (n,) int64
    videos: np.ndarray  # (n,) int64
    types: list[str]
    times: np.ndarray  # (n,) float64, the log's time unit
    values: np.ndarray  # (n,) float64
    contexts: list[dict[str, ContextValue]]


class LiveState:
    """Every counter's current totals, the videos' key attributes and the recent event ids."""

    def __init__(self, config: Config, params: dict[str, Any], logs: list[Path]) -> None:
        offline = OfflineCounters(config, logs)
        self._setup(config, params, offline.attrs)
        self.totals: list[Totals] = [c.totals() for c in offline.counters]
        self.history: HistoryState | None = None
        """``[live.history]``: every user's last engaged videos (raw ids: the serving model's
        vocabulary encodes them per request, so a reload to a new vocabulary keeps them)."""
        if offline.history is not None:
            self.history = HistoryState.from_index(offline.history)

    def _setup(self, config: Config, params: dict[str, Any], attrs: VideoAttributes) -> None:
        """What encoding requests and decoding events needs, wherever the totals live."""
        assert config.live is not None
        self.config = config
        self.live = config.live
        self.params = params
        self.attrs = attrs
        self.index = [event_index(self.live, c) for c in self.live.counters]
        self.names = [e.name for e in self.live.events]
        self.context_keys = [
            k for c in self.live.counters for k in c.keys if k.startswith("context:")
        ]
        self.context_keys = list(dict.fromkeys(self.context_keys))
        self.seen: set[str] = set()
        self.order: deque[str] = deque()
        self.events = 0

    @property
    def nbytes(self) -> int:
        h = self.history.nbytes if self.history is not None else 0
        return sum(t.nbytes for t in self.totals) + h

    def describe(self) -> str:
        sizes = [f"{c.name} {len(t)}" for c, t in zip(self.live.counters, self.totals, strict=True)]
        if self.history is not None:
            sizes.append(f"history {len(self.history)}")
        return f"live state ({', '.join(sizes)} entities, {self.nbytes / 1e6:.1f} MB)"

    def recent(self, user_id: int) -> Recent | None:
        """The user's history as it stands (``None``: the model has none)."""
        if self.history is None:
            return None
        return self.history.current(np.asarray([user_id], np.int64))

    def _context_column(self, key: str, contexts: list[dict[str, ContextValue]]) -> np.ndarray:
        """A ``context:<feature>`` key's int64 value per row; missing or non-integer is null
        (no counter), as a null in the log is."""
        name = key.split(":", 1)[1]
        default = next((f.serving_default for f in self.config.features if f.name == name), None)
        out = np.full(len(contexts), _NULL, np.int64)
        for i, ctx in enumerate(contexts):  # one per event or one per request: not per row
            v = ctx.get(name, default)
            if isinstance(v, int | float) and not isinstance(v, bool) and float(v).is_integer():
                out[i] = int(v)
        return out

    def features(
        self,
        user_id: int,
        video_ids: np.ndarray,
        context: dict[str, ContextValue],
        now: float | None,
    ) -> tuple[np.ndarray, bool]:
        """Standardised counter columns ``(n, width)`` for one request's candidates, and
        whether the user had any impression in the state."""
        ev = self.request_events(user_id, video_ids, context, now)
        one = ev.first()  # per-request counters: read once, not once per candidate
        counts = [
            tot.read(one, one.times).repeat(len(ev)) if tot.spec.per_request
            else tot.read(ev, ev.times)
            for tot in self.totals
        ]  # fmt: skip
        return self.encode(counts, ev.times)

    def request_events(
        self,
        user_id: int,
        video_ids: np.ndarray,
        context: dict[str, ContextValue],
        now: float | None,
    ) -> Events:
        """One request's candidates as (empty) events: their entity keys and the request time."""
        n = len(video_ids)
        t = float(now) if now is not None else time.time() / self.config.data.time_unit_s
        ctx = {k: np.repeat(self._context_column(k, [context]), n) for k in self.context_keys}
        return make_events(
            self.live,
            np.full(n, t),
            np.full(n, user_id, np.int64),
            np.asarray(video_ids, np.int64),
            ctx,
            np.zeros(n),
            np.zeros((n, len(self.names))),
            self.attrs,
        )

    def encode(self, counts: list[Counts], times: np.ndarray) -> tuple[np.ndarray, bool]:
        """Standardised columns from every counter's counts, and whether the user had any
        impression (a ``user``-keyed counter with impressions)."""
        raw = raw_features(self.live, self.params, counts, times, self.config.data.time_unit_s)
        user_seen = any(
            c.keys == ["user"] and len(cnt.impressions) and cnt.impressions[0] > 0
            for c, cnt in zip(self.live.counters, counts, strict=True)
        )
        return standardise(self.live, self.params, raw), user_seen

    def ingest(self, batch: EventBatch) -> tuple[int, int]:
        """Adds the events not seen before (by id); returns ``(accepted, duplicates)``."""
        accepted = int(self.ingest_fresh(batch).sum())
        return accepted, len(batch.ids) - accepted

    def ingest_fresh(self, batch: EventBatch) -> np.ndarray:
        """Adds the events not seen before (by id); returns which were (``(n,)`` bool), so the
        event log keeps exactly the accepted ones."""
        self.check_types(batch)
        fresh = []
        batch_ids: set[str] = set()
        for i, eid in enumerate(batch.ids):
            if eid not in self.seen and eid not in batch_ids:
                fresh.append(i)
                batch_ids.add(eid)
        keep = np.asarray(fresh, np.int64)
        if len(keep):
            ev = self.batch_events(batch, keep)
            for tot, idx in zip(self.totals, self.index, strict=True):
                tot.add(ev, idx)
            if self.history is not None:
                self.history.add(*engaged(self.live, ev))
            self._remember([batch.ids[i] for i in fresh])
            self.events += len(keep)
        mask = np.zeros(len(batch.ids), bool)
        mask[keep] = True
        return mask

    def check_types(self, batch: EventBatch) -> None:
        for i, typ in enumerate(batch.types):
            if typ != "impression" and typ not in self.names:
                raise RequestError(
                    f"events.{i}.type: unknown event type {typ!r}; "
                    f"known: {['impression', *self.names]}"
                )

    def batch_events(self, batch: EventBatch, keep: np.ndarray) -> Events:
        """The ``keep`` rows of a batch as counter events (values in their event's column)."""
        types = [batch.types[i] for i in keep.tolist()]
        imp = np.asarray([t == "impression" for t in types], np.float64)
        values = np.zeros((len(keep), len(self.names)))
        col = np.asarray([self.names.index(t) if t in self.names else -1 for t in types])
        rows = np.flatnonzero(col >= 0)
        values[rows, col[rows]] = batch.values[keep][rows]
        contexts = [batch.contexts[i] for i in keep.tolist()]
        ctx = {k: self._context_column(k, contexts) for k in self.context_keys}
        return make_events(
            self.live,
            batch.times[keep],
            batch.users[keep],
            batch.videos[keep],
            ctx,
            imp,
            values,
            self.attrs,
        )

    def _remember(self, ids: list[str]) -> None:
        self.seen.update(ids)
        self.order.extend(ids)
        while len(self.order) > self.live.max_event_ids:
            self.seen.discard(self.order.popleft())
