"""Point-in-time counters: features that move with time, the same definition offline and online.

A counter (``[[live.counters]]``, :class:`ranker.config.CounterSpec`) keeps, per entity (a user,
a video, an author, the user per tab), the impressions and event totals (clicks, likes, watch
seconds) seen so far. Two engines share one definition:

* :class:`PointInTime` (training and evaluation): from every row of a log, in any order, the
  totals *strictly before* each row's time. Rows at the same time are not "before" one another:
  KuaiRand logs exact duplicates at one timestamp, and counting one would leak the other's
  label. Built with one sort by ``(entity, time)`` and group-wise cumulative sums; a query is
  two ``searchsorted`` calls. Memory: per counter, per distinct ``(entity, time)`` of the log,
  one int64 key, three float64 (impressions, last impression time, the time sums are decayed
  to) and one float64 per event: ``8 * (4 + E)`` bytes, 56 MB per counter for a million rows
  and three events.
* :class:`Totals` (serving): per entity only its current totals, last impression time and
  reference time, the same ``8 * (4 + E)`` bytes per entity, updated by feedback events.

Both answer ``(impressions, sums per event, last impression time)``; :func:`encode_counts`
turns that into the model's columns (``log1p`` impressions, smoothed rates toward the training
mean, ``log1p`` seconds since the last impression), standardised with statistics fitted on the
training rows and stored in the encoder's state. Nothing here loops over rows in Python.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ranker.config import Config, CounterSpec, LiveConfig
from ranker.history import HistoryIndex, Recent
from ranker.live_events import (  # re-exported: the counters' inputs, one import for users
    Counts,
    Entity,
    Events,
    VideoAttributes,
    combine_keys,
    concat_events,
    context_columns,
    events_from_table,
    key_columns,
    log_columns,
    make_events,
    quantise,
    read_log_events,
    token_keys,
    video_attribute_columns,
)
from ranker.metrics import SESSION_GAP_S

__all__ = [
    "Counts",
    "Entity",
    "Events",
    "OfflineCounters",
    "PointInTime",
    "SessionIndex",
    "Totals",
    "VideoAttributes",
    "combine_keys",
    "concat_events",
    "context_columns",
    "decay_tau",
    "engaged",
    "event_index",
    "events_from_table",
    "fit_params",
    "history_index",
    "key_columns",
    "log_columns",
    "make_events",
    "quantise",
    "raw_features",
    "read_log_events",
    "standardise",
    "token_keys",
    "video_attribute_columns",
]


class PointInTime:
    """One counter's totals strictly before any time, for any entity, from a whole log."""

    def __init__(
        self, spec: CounterSpec, event_index: list[int], events: Events, unit_s: float = 1.0
    ) -> None:
        self.spec = spec
        self.tau = decay_tau(spec, unit_s)
        ent = events.entity(spec)
        ok = ent.ok
        key, t = ent.key[ok], ent.rows(events.times)[ok]
        imp, vals = ent.rows(events.impressions)[ok], ent.rows(events.values)[ok][:, event_index]
        order = np.lexsort((t, key))
        key, t, imp, vals = key[order], t[order], imp[order], vals[order]
        n = len(key)
        seg = np.r_[True, key[1:] != key[:-1]] if n else np.zeros(0, bool)
        seg_start = np.maximum.accumulate(np.where(seg, np.arange(n), 0)) if n else seg
        if self.tau is None:
            # Group-wise cumulative sums: the running total minus the total before the group.
            cum_imp = _group_cumsum(imp, seg_start)
            cum_vals = _group_cumsum(vals, seg_start)
        else:
            both = _decayed_cumsum(np.c_[imp, vals], t, seg, self.tau)
            cum_imp, cum_vals = both[:, 0], both[:, 1:]
        last_imp = np.maximum.accumulate(np.where(imp > 0, np.arange(n), -1)) if n else seg_start
        last_time = np.where(last_imp >= seg_start, t[np.maximum(last_imp, 0)], np.nan)
        # One entry per (entity, time): the totals after every row at that time.
        end = np.r_[(key[1:] != key[:-1]) | (t[1:] != t[:-1]), True] if n else seg
        self.keys = np.unique(key)
        self.times = np.unique(t)
        stride = len(self.times) + 1
        dense = np.searchsorted(self.keys, key[end])
        rank = np.searchsorted(self.times, t[end]) + 1
        self.stride = stride
        self.comp = dense * stride + rank  # sorted: entries are in (entity, time) order
        self.imp = cum_imp[end]
        self.vals = cum_vals[end]
        self.last_time = last_time[end]
        self.ref = t[end]  # the time the entry's totals are decayed to

    @property
    def nbytes(self) -> int:
        arrays = (self.comp, self.imp, self.vals, self.last_time, self.ref)
        return sum(a.nbytes for a in arrays)

    def at(self, events: Events, times: np.ndarray) -> Counts:
        """Totals per row of ``events`` from the log's rows strictly before ``times``, pooled
        over a multi-valued key's values."""
        ent = events.entity(self.spec)
        return ent.pool(self.before(ent.key, ent.ok, ent.rows(times)), len(events))

    def before(self, keys: np.ndarray, ok: np.ndarray, times: np.ndarray) -> Counts:
        """Totals per query (entity ``keys``) from the rows strictly before ``times``."""
        n = len(keys)
        if len(self.keys) == 0:
            return _empty(n, len(self.spec.events))
        dense = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        found = ok & (self.keys[dense] == keys)
        rank = np.searchsorted(self.times, times, side="left")  # distinct times < t
        idx = np.searchsorted(self.comp, dense * self.stride + rank, side="right") - 1
        hit = found & (idx >= 0) & (self.comp[np.maximum(idx, 0)] // self.stride == dense)
        i = np.maximum(idx, 0)
        with np.errstate(over="ignore", invalid="ignore"):  # lanes that miss are masked below
            f = 1.0 if self.tau is None else np.exp(-(times - self.ref[i]) / self.tau)
            return Counts(
                np.where(hit, self.imp[i] * f, 0.0),
                np.where(hit[:, None], self.vals[i] * np.asarray(f)[..., None], 0.0),
                np.where(hit, self.last_time[i], np.nan),
            )

    def totals(self) -> Totals:
        """Every entity's totals after the whole log: the serving state it starts from."""
        last = np.r_[self.comp[1:] // self.stride != self.comp[:-1] // self.stride, True]
        if not len(self.comp):
            last = np.zeros(0, bool)
        return Totals(
            self.spec,
            self.keys.copy(),
            self.imp[last].copy(),
            self.vals[last].copy(),
            self.last_time[last].copy(),
            self.ref[last].copy(),
            self.tau,
        )


def decay_tau(spec: CounterSpec, unit_s: float) -> float | None:
    """The decay's time constant in the log's time unit (``None``: no decay)."""
    if spec.half_life_s is None:
        return None
    return spec.half_life_s / np.log(2.0) / unit_s


def _decayed_cumsum(x: np.ndarray, t: np.ndarray, seg: np.ndarray, tau: float) -> np.ndarray:
    """Per segment, ``d_k = a_k d_(k-1) + x_k`` with ``a_k = exp(-(t_k - t_(k-1)) / tau)``: the
    exponentially decayed running sum at each row's time. The linear recurrence is an
    associative scan (Blelloch, 1990), run here as Hillis-Steele doubling: log2(n) vectorised
    passes. ``a = 0`` at a segment's start stops everything before it, exactly (a product
    with 0), and each row's result depends only on its own segment's earlier rows."""
    n = len(t)
    # within a segment times ascend; across a boundary a may be negative (and is zeroed)
    a = np.exp(-np.maximum(np.diff(t, prepend=t[:1]), 0.0) / tau) if n else np.zeros(0)
    a[seg] = 0.0
    d = np.array(x, np.float64, copy=True)
    off = 1
    while off < n:
        d[off:] = d[off:] + a[off:, None] * d[:-off]
        a[off:] = a[off:] * a[:-off]
        off *= 2
    return d


def _group_cumsum(x: np.ndarray, seg_start: np.ndarray) -> np.ndarray:
    c = np.cumsum(x, axis=0)
    before = np.concatenate([np.zeros((1, *x.shape[1:])), c[:-1]])[seg_start]
    return c - before


def _empty(n: int, e: int) -> Counts:
    return Counts(np.zeros(n), np.zeros((n, e)), np.full(n, np.nan))


class Totals:
    """One counter's current totals per entity (serving): sorted keys and parallel arrays."""

    def __init__(
        self,
        spec: CounterSpec,
        keys: np.ndarray,
        imp: np.ndarray,
        vals: np.ndarray,
        last_time: np.ndarray,
        ref: np.ndarray | None = None,
        tau: float | None = None,
    ) -> None:
        self.spec = spec
        self.keys, self.imp, self.vals, self.last_time = keys, imp, vals, last_time
        self.ref = ref if ref is not None else np.full(len(keys), np.nan)  # decayed to this time
        self.tau = tau

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.keys, self.imp, self.vals, self.last_time, self.ref))

    def read(self, events: Events, now: np.ndarray) -> Counts:
        """Totals per row of ``events`` (decayed to ``now``), pooled over a multi-valued key's
        values as :meth:`PointInTime.at` pools them."""
        ent = events.entity(self.spec)
        return ent.pool(self.current(ent.key, ent.ok, ent.rows(now)), len(events))

    def current(self, keys: np.ndarray, ok: np.ndarray, now: np.ndarray | None = None) -> Counts:
        """Totals per entity; with decay, decayed to ``now`` (the log's time unit)."""
        n = len(keys)
        if len(self.keys) == 0:
            return _empty(n, len(self.spec.events))
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        hit = ok & (self.keys[pos] == keys)
        f = np.ones(n)
        with np.errstate(over="ignore", invalid="ignore"):  # lanes that miss are masked below
            if self.tau is not None:
                assert now is not None, "a decayed counter is read at a time"
                f = np.exp(-(now - np.nan_to_num(self.ref[pos])) / self.tau)
            return Counts(
                np.where(hit, self.imp[pos] * f, 0.0),
                np.where(hit[:, None], self.vals[pos] * f[:, None], 0.0),
                np.where(hit, self.last_time[pos], np.nan),
            )

    def add(self, events: Events, event_index: list[int]) -> None:
        """Adds events: new entities are merged in, existing ones summed (``np.add.at``)."""
        ent = events.entity(self.spec)
        ok = ent.ok
        key = ent.key[ok]
        if not len(key):
            return
        new = np.setdiff1d(np.unique(key), self.keys, assume_unique=True)
        if len(new):
            at = np.searchsorted(self.keys, new)
            self.keys = np.insert(self.keys, at, new)
            self.imp = np.insert(self.imp, at, 0.0)
            self.vals = np.insert(self.vals, at, 0.0, axis=0)
            self.last_time = np.insert(self.last_time, at, np.nan)
            self.ref = np.insert(self.ref, at, np.nan)
        pos = np.searchsorted(self.keys, key)
        imp = ent.rows(events.impressions)[ok]
        ev_times = ent.rows(events.times)[ok]
        # An impression, before any decay: one far older than the reference time decays to 0
        # but is still the entity's latest impression when nothing newer was shown.
        shown = imp > 0
        vals = ent.rows(events.values)[ok][:, event_index]
        if self.tau is not None:
            # Sums decayed to a reference time per entity: move it to the newest event, decay
            # the old sums to it and add each event decayed from its own time (any order).
            times = ev_times
            u, inv = np.unique(pos, return_inverse=True)
            old = np.where(np.isnan(self.ref[u]), -np.inf, self.ref[u])
            ref = old.copy()
            np.maximum.at(ref, inv, times)
            f = np.where(np.isfinite(old), np.exp(-(ref - old) / self.tau), 0.0)
            self.imp[u] *= f
            self.vals[u] *= f[:, None]
            w = np.exp(-(ref[inv] - times) / self.tau)
            imp, vals = imp * w, vals * w[:, None]
            self.ref[u] = ref
        np.add.at(self.imp, pos, imp)
        np.add.at(self.vals, pos, vals)
        t = np.where(np.isnan(self.last_time), -np.inf, self.last_time)
        np.maximum.at(t, pos[shown], ev_times[shown])
        self.last_time = np.where(np.isfinite(t), t, np.nan)


def event_index(live: LiveConfig, spec: CounterSpec) -> list[int]:
    names = [e.name for e in live.events]
    return [names.index(e) for e in spec.events]


def raw_features(
    live: LiveConfig, params: dict[str, Any], counts: list[Counts], now: np.ndarray, unit_s: float
) -> np.ndarray:
    """Unstandardised columns ``(n, width)``: per counter ``log1p`` impressions, smoothed rates,
    ``log1p`` seconds since the last impression (NaN when there is none)."""
    priors = params["priors"]
    cols: list[np.ndarray] = []
    for spec, c in zip(live.counters, counts, strict=True):
        if spec.log_impressions:
            cols.append(np.log1p(c.impressions))
        a = spec.prior_strength
        for j, e in enumerate(spec.events):
            cols.append((c.sums[:, j] + a * priors[e]) / (c.impressions + a))
        if spec.since_last:
            gap = np.maximum(now - c.last_time, 0.0) * unit_s
            cols.append(np.log1p(gap))
    return np.stack(cols, axis=1) if cols else np.zeros((len(now), 0))


def standardise(live: LiveConfig, params: dict[str, Any], raw: np.ndarray) -> np.ndarray:
    """Standardised float32 columns; NaN (no impression yet) becomes 0, the training mean."""
    mean = np.asarray(params["mean"], np.float64)
    std = np.asarray(params["std"], np.float64)
    z = (raw - mean) / std
    return np.where(np.isfinite(z), np.clip(z, -1e4, 1e4), 0.0).astype(np.float32)


def fit_params(live: LiveConfig, priors: dict[str, float], raw: np.ndarray) -> dict[str, Any]:
    """Encoder state for the counters: event priors and the columns' training statistics."""
    mean, std = [], []
    for j in range(raw.shape[1]):
        v = raw[:, j][np.isfinite(raw[:, j])]
        m = float(v.mean()) if v.size else 0.0
        s = float(v.std()) if v.size else 1.0
        mean.append(m)
        std.append(s if s > 1e-12 else 1.0)
    names = [o for c in live.counters for o in c.outputs]
    return {"priors": priors, "columns": names, "mean": mean, "std": std}


class SessionIndex:
    """Sessions of the logs' rows (a user's impressions split at gaps over ``gap``, the
    definition of :func:`ranker.metrics.sessions`), to find any row's session start."""

    def __init__(self, users: np.ndarray, times: np.ndarray, gap: float) -> None:
        order = np.lexsort((times, users))
        u, t = users[order], times[order]
        n = len(t)
        start = np.r_[True, (u[1:] != u[:-1]) | (np.diff(t) > gap)] if n else np.zeros(0, bool)
        first = np.maximum.accumulate(np.where(start, np.arange(n), 0)) if n else start
        self.users = np.unique(u)
        self.times = np.unique(t)
        self.stride = len(self.times) + 1
        dense = np.searchsorted(self.users, u)
        self.comp = dense * self.stride + np.searchsorted(self.times, t) + 1
        self.first = t[first] if n else t

    def start(self, users: np.ndarray, times: np.ndarray) -> np.ndarray:
        """The start time of the session of the user's last row at or before each time (the
        time itself when the user has none)."""
        if len(self.users) == 0:
            return np.asarray(times, np.float64)
        dense = np.minimum(np.searchsorted(self.users, users), len(self.users) - 1)
        found = self.users[dense] == users
        rank = np.searchsorted(self.times, times, side="right")  # times <= t
        idx = np.searchsorted(self.comp, dense * self.stride + rank, side="right") - 1
        i = np.maximum(idx, 0)
        hit = found & (idx >= 0) & (self.comp[i] // self.stride == dense)
        return np.where(hit, self.first[i], times)


class OfflineCounters:
    """Every counter's :class:`PointInTime` over a set of logs: training and evaluation rows get
    the values the service would have had, continuing from the training log through the rows."""

    def __init__(self, config: Config, logs: Iterable[Path]) -> None:
        assert config.live is not None
        self.config = config
        self.live = config.live
        self.attrs = VideoAttributes.from_parquet(
            Path(config.data.videos), config.data.video_key, video_attribute_columns(self.live)
        )
        events = read_log_events(config, logs, self.attrs)
        gap = SESSION_GAP_S / config.data.time_unit_s
        self.sessions = SessionIndex(events.keys["user"], events.times, gap)
        self.frozen = False
        """True: every row reads the state at the start of its session (a user's impressions
        split at gaps over 30 minutes), as if the session were one request: the fair input to
        GAUC within sessions, where a row's label otherwise enters its neighbours' features."""
        self.counters = [
            PointInTime(c, event_index(self.live, c), events, config.data.time_unit_s)
            for c in self.live.counters
        ]
        self.history: HistoryIndex | None = None
        if self.live.history is not None:
            self.history = history_index(self.live, events)

    @property
    def nbytes(self) -> int:
        h = self.history.nbytes if self.history is not None else 0
        return sum(c.nbytes for c in self.counters) + h

    def fit(self, train: Events) -> dict[str, Any]:
        """Encoder state from the training rows: each event's mean per impression (the prior
        rates shrink toward) and every column's mean and standard deviation."""
        priors = {
            e.name: float(train.values[:, j].mean()) if len(train) else 0.0
            for j, e in enumerate(self.live.events)
        }
        counts = [c.at(train, train.times) for c in self.counters]
        unit = self.config.data.time_unit_s
        raw = raw_features(self.live, {"priors": priors}, counts, train.times, unit)
        return fit_params(self.live, priors, raw)

    def encode(
        self, table: pa.RecordBatch | pa.Table, params: dict[str, Any], origin: str
    ) -> np.ndarray:
        """Standardised counter columns ``(n, width)`` for the log rows in ``table``."""
        ev = events_from_table(self.config, table, self.attrs, origin)
        at = self._at(ev)
        counts = [c.at(ev, at) for c in self.counters]
        raw = raw_features(self.live, params, counts, at, self.config.data.time_unit_s)
        return standardise(self.live, params, raw)

    def _at(self, ev: Events) -> np.ndarray:
        return self.sessions.start(ev.keys["user"], ev.times) if self.frozen else ev.times

    def recent(self, table: pa.RecordBatch | pa.Table, origin: str) -> Recent:
        """The history (``[live.history]``) of the log rows in ``table``: each user's last
        engaged videos strictly before the row (before its session with ``frozen``)."""
        assert self.history is not None
        ev = events_from_table(self.config, table, self.attrs, origin)
        return self.history.before(ev.keys["user"], self._at(ev))


def engaged(live: LiveConfig, events: Events) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(users, times, videos)`` of the events that enter histories: the history's engaged
    event with a value above 0 (a log row whose column is positive, or such a feedback event)."""
    assert live.history is not None
    j = [e.name for e in live.events].index(live.history.engaged)
    m = events.values[:, j] > 0
    return events.keys["user"][m], events.times[m], events.keys["video"][m]


def history_index(live: LiveConfig, events: Events) -> HistoryIndex:
    """The history's index over every engaged event of some logs."""
    assert live.history is not None
    return HistoryIndex(live.history.length, *engaged(live, events))
