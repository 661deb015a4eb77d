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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from ranker.config import Config, CounterSpec, LiveConfig
from ranker.errors import DataError
from ranker.history import HistoryIndex, Recent
from ranker.metrics import SESSION_GAP_S

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele et al., OOPSLA 2014): a bijection on uint64 whose output
    bits all depend on every input bit, so combined keys collide only by chance (2^-64)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def combine_keys(columns: list[np.ndarray]) -> np.ndarray:
    """One int64 entity key per row from one or more int64 key columns."""
    h = np.full(len(columns[0]), _GOLDEN, np.uint64)
    with np.errstate(over="ignore"):
        for c in columns:
            h = _mix(h ^ _mix(np.asarray(c, np.int64).view(np.uint64) + _GOLDEN))
    return h.view(np.int64)


@dataclass
class Events:
    """Rows that feed counters: impression rows of a log (``impressions`` 1, every event's value
    on the row) or feedback events (one value set, ``impressions`` 1 only for an impression).

    ``keys`` holds the raw key columns a counter can name (``user``, ``video``,
    ``video:<col>``, ``context:<feature>``), int64, with ``valid`` marking rows where a
    ``video:<col>`` attribute is known (an unknown video has no author to count for)."""

    times: np.ndarray  # (n,) float64, the log's time unit
    impressions: np.ndarray  # (n,) float64
    values: np.ndarray  # (n, E) float64, event units
    keys: dict[str, np.ndarray]  # key name -> (n,) int64
    valid: dict[str, np.ndarray]  # key name -> (n,) bool

    def __len__(self) -> int:
        return len(self.times)

    def entity(self, spec: CounterSpec) -> tuple[np.ndarray, np.ndarray]:
        """The counter's entity key per row and which rows have one."""
        ok = np.ones(len(self), bool)
        for k in spec.keys:
            ok &= self.valid[k]
        return combine_keys([self.keys[k] for k in spec.keys]), ok


class VideoAttributes:
    """Raw videos-table columns that counters key on (``video:author_id``), by video id."""

    def __init__(self, ids: np.ndarray, columns: dict[str, np.ndarray]) -> None:
        order = np.argsort(ids, kind="stable")
        self.ids = ids[order]
        self.columns = {k: v[order] for k, v in columns.items()}

    @classmethod
    def from_parquet(cls, path: Path, key: str, columns: list[str]) -> VideoAttributes:
        if not columns:
            return cls(np.zeros(0, np.int64), {})
        try:
            t = pq.read_table(path, columns=[key, *columns])
        except (OSError, pa.ArrowInvalid, KeyError) as e:
            raise DataError(
                f"videos table {path}: cannot read columns {[key, *columns]}: {e}"
            ) from None
        cols = {c: _int_column(t.column(c), f"videos table {path} column {c!r}") for c in columns}
        ids = _int_column(t.column(key), f"videos table {path} column {key!r}")
        return cls(ids, cols)

    def lookup(self, column: str, video_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The column's value per video and whether the video (and its value) is known."""
        if len(self.ids) == 0:
            return np.zeros(len(video_ids), np.int64), np.zeros(len(video_ids), bool)
        pos = np.minimum(np.searchsorted(self.ids, video_ids), len(self.ids) - 1)
        found = self.ids[pos] == video_ids
        vals = self.columns[column][pos]
        return np.where(found, vals, 0), found & (vals != _NULL)


_NULL = np.iinfo(np.int64).min


def _int_column(col: pa.ChunkedArray | pa.Array, what: str) -> np.ndarray:
    """An integer key column as int64, nulls as a sentinel no real id takes."""
    if not (pa.types.is_integer(col.type) or pa.types.is_boolean(col.type)):
        raise DataError(f"{what}: counter keys must be integers, got type {col.type}")
    return np.asarray(pc.cast(col, pa.int64()).fill_null(_NULL), np.int64)


def key_columns(live: LiveConfig) -> list[str]:
    return list(dict.fromkeys(k for c in live.counters for k in c.keys))


def video_attribute_columns(live: LiveConfig) -> list[str]:
    return [k.split(":", 1)[1] for k in key_columns(live) if k.startswith("video:")]


def context_columns(config: Config) -> dict[str, str]:
    """``context:<feature>`` key -> the log column of that feature."""
    assert config.live is not None
    by_name = {f.name: f.source_column for f in config.features if f.source == "context"}
    return {
        k: by_name[k.split(":", 1)[1]] for k in key_columns(config.live) if k.startswith("context:")
    }


def log_columns(config: Config) -> list[str]:
    """Log columns the counters read (besides the split's time column)."""
    assert config.live is not None
    d = config.data
    cols = [d.user_key, d.video_key, d.event_time, *context_columns(config).values()]
    cols += [e.column for e in config.live.events]
    return list(dict.fromkeys(cols))


def events_from_table(
    config: Config, table: pa.Table | pa.RecordBatch, attrs: VideoAttributes, origin: str
) -> Events:
    """Impression rows of a log as counter events: each row is one impression plus its values."""
    assert config.live is not None
    d = config.data
    n = table.num_rows
    users = _int_column(table.column(d.user_key), f"{origin} column {d.user_key!r}")
    videos = _int_column(table.column(d.video_key), f"{origin} column {d.video_key!r}")
    t = pc.cast(table.column(d.event_time), pa.float64())
    if t.null_count:
        raise DataError(f"{origin}: time column {d.event_time!r} has {t.null_count} nulls")
    values = np.zeros((n, len(config.live.events)), np.float64)
    for j, e in enumerate(config.live.events):
        v = pc.cast(table.column(e.column), pa.float64()).to_numpy(zero_copy_only=False)
        values[:, j] = np.nan_to_num(np.asarray(v, np.float64)) * e.scale
    ctx = {
        k: _int_column(table.column(c), f"{origin} column {c!r}")
        for k, c in context_columns(config).items()
    }
    return make_events(
        config.live, np.asarray(t.to_numpy(zero_copy_only=False), np.float64), users, videos,
        ctx, np.ones(n), values, attrs,
    )  # fmt: skip


def make_events(
    live: LiveConfig,
    times: np.ndarray,
    users: np.ndarray,
    videos: np.ndarray,
    context: dict[str, np.ndarray],
    impressions: np.ndarray,
    values: np.ndarray,
    attrs: VideoAttributes,
) -> Events:
    """Events from id columns; ``context`` maps ``context:<feature>`` keys to int64 columns."""
    n = len(times)
    keys: dict[str, np.ndarray] = {"user": users, "video": videos}
    valid: dict[str, np.ndarray] = {"user": np.ones(n, bool), "video": np.ones(n, bool)}
    for k in key_columns(live):
        if k.startswith("video:"):
            keys[k], valid[k] = attrs.lookup(k.split(":", 1)[1], videos)
        elif k.startswith("context:"):
            keys[k] = context[k]
            valid[k] = context[k] != _NULL
    return Events(times, impressions.astype(np.float64), quantise(values), keys, valid)


QUANTUM = 2.0**-16
"""Event values are rounded to multiples of this (15 microseconds of watch time): every partial
sum below 2^37 is then exact in float64, so totals do not depend on the order rows are added in
(one cumulative sum over the sorted log offline, ``np.add.at`` per event batch online) and a
row's features cannot move, even in the last bit, when later or other entities' rows change."""


def quantise(values: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(values, np.float64) / QUANTUM) * QUANTUM


def read_log_events(config: Config, paths: Iterable[Path], attrs: VideoAttributes) -> Events:
    """Every row of the given logs (each a Parquet file or directory) as events, any order."""
    parts = []
    for p in dict.fromkeys(Path(p).resolve() for p in paths):
        try:
            t = ds.dataset(p, format="parquet").to_table(columns=log_columns(config))
        except (OSError, pa.ArrowInvalid, pa.ArrowKeyError) as e:
            raise DataError(f"impression log {p}: cannot read the counters' columns: {e}") from None
        parts.append(events_from_table(config, t, attrs, str(p)))
    return concat_events(parts)


def concat_events(parts: list[Events]) -> Events:
    return Events(
        np.concatenate([p.times for p in parts]),
        np.concatenate([p.impressions for p in parts]),
        np.concatenate([p.values for p in parts]),
        {k: np.concatenate([p.keys[k] for p in parts]) for k in parts[0].keys},
        {k: np.concatenate([p.valid[k] for p in parts]) for k in parts[0].valid},
    )


@dataclass
class Counts:
    """What a counter knows about some entities at some times."""

    impressions: np.ndarray  # (n,) float64
    sums: np.ndarray  # (n, E_c) float64, the counter's events only
    last_time: np.ndarray  # (n,) float64, NaN before the first impression


class PointInTime:
    """One counter's totals strictly before any time, for any entity, from a whole log."""

    def __init__(
        self, spec: CounterSpec, event_index: list[int], events: Events, unit_s: float = 1.0
    ) -> None:
        self.spec = spec
        self.tau = decay_tau(spec, unit_s)
        key, ok = events.entity(spec)
        key, t = key[ok], events.times[ok]
        imp, vals = events.impressions[ok], events.values[ok][:, event_index]
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

    def before(self, keys: np.ndarray, ok: np.ndarray, times: np.ndarray) -> Counts:
        """Totals per query row from the rows strictly before ``times`` of entity ``keys``."""
        n = len(keys)
        if len(self.keys) == 0:
            return _empty(n, len(self.spec.events))
        dense = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        found = ok & (self.keys[dense] == keys)
        rank = np.searchsorted(self.times, times, side="left")  # distinct times < t
        idx = np.searchsorted(self.comp, dense * self.stride + rank, side="right") - 1
        hit = found & (idx >= 0) & (self.comp[np.maximum(idx, 0)] // self.stride == dense)
        i = np.maximum(idx, 0)
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
    a = np.exp(-np.diff(t, prepend=t[:1]) / tau) if n else np.zeros(0)
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

    def current(self, keys: np.ndarray, ok: np.ndarray, now: np.ndarray | None = None) -> Counts:
        """Totals per entity; with decay, decayed to ``now`` (the log's time unit)."""
        n = len(keys)
        if len(self.keys) == 0:
            return _empty(n, len(self.spec.events))
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        hit = ok & (self.keys[pos] == keys)
        f = np.ones(n)
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
        key, ok = events.entity(self.spec)
        key = key[ok]
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
        imp = events.impressions[ok]
        # An impression, before any decay: one far older than the reference time decays to 0
        # but is still the entity's latest impression when nothing newer was shown.
        shown = imp > 0
        vals = events.values[ok][:, event_index]
        if self.tau is not None:
            # Sums decayed to a reference time per entity: move it to the newest event, decay
            # the old sums to it and add each event decayed from its own time (any order).
            times = events.times[ok]
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
        np.maximum.at(t, pos[shown], events.times[ok][shown])
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
        counts = [c.before(*train.entity(c.spec), train.times) for c in self.counters]
        unit = self.config.data.time_unit_s
        raw = raw_features(self.live, {"priors": priors}, counts, train.times, unit)
        return fit_params(self.live, priors, raw)

    def encode(
        self, table: pa.RecordBatch | pa.Table, params: dict[str, Any], origin: str
    ) -> np.ndarray:
        """Standardised counter columns ``(n, width)`` for the log rows in ``table``."""
        ev = events_from_table(self.config, table, self.attrs, origin)
        at = self._at(ev)
        counts = [c.before(*ev.entity(c.spec), at) for c in self.counters]
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
