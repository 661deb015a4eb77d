"""Counter events: the rows that feed point-in-time counters and the entity keys they count for.

Both engines of :mod:`ranker.live` read the same :class:`Events`: impression rows of a log
(:func:`events_from_table`) or feedback events (``service/live_state.py``), with each counter's
entity key per row from :meth:`Events.entity`. Keys are int64: ids as they are, a joint key
(the user per tab) hashed by :func:`combine_keys`, a string key value by :func:`token_keys`. A
videos-table column can be multi-valued (tags): an event then counts for each of its video's
values (:class:`Entity` carries ``(row, value)`` pairs) and a row reads the pooled sums.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from ranker.config import Config, CounterSpec, LiveConfig
from ranker.errors import DataError

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
    ``video:<col>`` attribute is known (an unknown video has no author to count for). A
    multi-valued ``video:<col>`` (tags) is in ``multi`` instead, as ``(row, value)`` pairs, one
    per value of each row's video; its ``keys`` column is 0 and ``valid`` says the video has
    at least one value."""

    times: np.ndarray  # (n,) float64, the log's time unit
    impressions: np.ndarray  # (n,) float64
    values: np.ndarray  # (n, E) float64, event units
    keys: dict[str, np.ndarray]  # key name -> (n,) int64
    valid: dict[str, np.ndarray]  # key name -> (n,) bool
    multi: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.times)

    def first(self) -> Events:
        """The first row alone: what a per-request counter reads (every candidate of one
        request shares the user, the context and the time)."""
        return Events(
            self.times[:1],
            self.impressions[:1],
            self.values[:1],
            {k: v[:1] for k, v in self.keys.items()},
            {k: v[:1] for k, v in self.valid.items()},
            {k: (r[r == 0], v[r == 0]) for k, (r, v) in self.multi.items()},
        )

    def entity(self, spec: CounterSpec) -> Entity:
        """The counter's entity key per row (per row and value for a multi-valued key)."""
        split = [k for k in spec.keys if k in self.multi]
        if not split:
            ok = np.ones(len(self), bool)
            for k in spec.keys:
                ok &= self.valid[k]
            return Entity(combine_keys([self.keys[k] for k in spec.keys]), ok, None)
        if len(split) > 1:
            raise DataError(f"live counter {spec.name!r}: keys on two multi-valued columns {split}")
        row, values = self.multi[split[0]]
        ok = np.ones(len(row), bool)
        for k in spec.keys:
            if k != split[0]:
                ok &= self.valid[k][row]
        cols = [values if k == split[0] else self.keys[k][row] for k in spec.keys]
        return Entity(combine_keys(cols), ok, row)


@dataclass
class Entity:
    """A counter's entity keys for some rows: one per row, or for a multi-valued key one per
    ``(row, value)`` pair, ``row`` naming the pair's row."""

    key: np.ndarray  # (m,) int64
    ok: np.ndarray  # (m,) bool: the entity is known (a video's author, a context value)
    row: np.ndarray | None  # (m,) int64, or None: m = n, pair i is row i

    def rows(self, x: np.ndarray) -> np.ndarray:
        """A per-row array per pair."""
        return x if self.row is None else x[self.row]

    def pool(self, c: Counts, n: int) -> Counts:
        """Per-pair counts as per-row counts: impressions and sums added over a row's values,
        the latest last impression (a row without values: nothing counted)."""
        if self.row is None:
            return c
        sums = np.stack(
            [np.bincount(self.row, c.sums[:, j], minlength=n) for j in range(c.sums.shape[1])],
            axis=1,
        ) if c.sums.shape[1] else np.zeros((n, 0))  # fmt: skip
        last = np.full(n, np.nan)
        np.fmax.at(last, self.row, c.last_time)
        return Counts(np.bincount(self.row, c.impressions, minlength=n), sums, last)


class VideoAttributes:
    """Raw videos-table columns that counters key on (``video:author_id``), by video id: one
    int64 per video, or for a multi-valued column (tags) ``(offsets, values)``, video ``i``'s
    values being ``values[offsets[i]:offsets[i + 1]]``."""

    def __init__(
        self,
        ids: np.ndarray,
        columns: dict[str, np.ndarray],
        multi: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> None:
        order = np.argsort(ids, kind="stable")
        self.ids = ids[order]
        self.columns = {k: v[order] for k, v in columns.items()}
        self.multi: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for k, (off, vals) in (multi or {}).items():
            row, src = _expand(np.asarray(off, np.int64), order, np.ones(len(order), bool))
            self.multi[k] = (np.r_[0, np.cumsum(np.bincount(row, minlength=len(order)))], vals[src])

    @classmethod
    def from_parquet(cls, path: Path, key: str, columns: dict[str, str | None]) -> VideoAttributes:
        """The ``columns`` (name -> separator, ``None``: one value per video unless a list)."""
        if not columns:
            return cls(np.zeros(0, np.int64), {})
        try:
            t = pq.read_table(path, columns=[key, *columns])
        except (OSError, pa.ArrowInvalid, KeyError) as e:
            raise DataError(
                f"videos table {path}: cannot read columns {[key, *columns]}: {e}"
            ) from None
        single: dict[str, np.ndarray] = {}
        multi: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for c, sep in columns.items():
            col, what = t.column(c).combine_chunks(), f"videos table {path} column {c!r}"
            if sep is not None and _is_string(col.type):
                col = pc.split_pattern(col, sep)
            if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                multi[c] = _multi_column(col, what)
            else:
                single[c] = _key_column(col, what)
        ids = _int_column(t.column(key), f"videos table {path} column {key!r}")
        return cls(ids, single, multi)

    def _find(self, video_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.minimum(np.searchsorted(self.ids, video_ids), len(self.ids) - 1)
        return pos, self.ids[pos] == video_ids

    def lookup(self, column: str, video_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The column's value per video and whether the video (and its value) is known."""
        if len(self.ids) == 0:
            return np.zeros(len(video_ids), np.int64), np.zeros(len(video_ids), bool)
        pos, found = self._find(video_ids)
        vals = self.columns[column][pos]
        return np.where(found, vals, 0), found & (vals != _NULL)

    def lookup_multi(self, column: str, video_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(row, value)`` pairs: every value of each video (``row`` indexes ``video_ids``)."""
        if len(self.ids) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        off, vals = self.multi[column]
        pos, found = self._find(video_ids)
        row, src = _expand(off, pos, found)
        return row, vals[src]


def _expand(offsets: np.ndarray, pos: np.ndarray, found: np.ndarray) -> tuple[np.ndarray, ...]:
    """For CSR ``offsets`` and query positions: per value, its query row and its index into the
    values array (queries not ``found`` have none)."""
    lengths = np.where(found, offsets[pos + 1] - offsets[pos], 0)
    row = np.repeat(np.arange(len(pos)), lengths)
    start = np.repeat(offsets[pos] - (np.cumsum(lengths) - lengths), lengths)
    return row, start + np.arange(len(row))


_NULL = np.iinfo(np.int64).min


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _int_column(col: pa.ChunkedArray | pa.Array, what: str) -> np.ndarray:
    """An integer key column as int64, nulls as a sentinel no real id takes."""
    if not (pa.types.is_integer(col.type) or pa.types.is_boolean(col.type)):
        raise DataError(f"{what}: counter keys must be integers, got type {col.type}")
    return np.asarray(pc.cast(col, pa.int64()).fill_null(_NULL), np.int64)


def _key_column(col: pa.Array, what: str) -> np.ndarray:
    """A key column of integers or strings as int64 (strings: :func:`token_keys`), nulls and
    empty strings as the null sentinel."""
    if not _is_string(col.type):
        return _int_column(col, what)
    enc = pc.dictionary_encode(pc.utf8_trim_whitespace(col))
    codes = np.asarray(enc.indices.fill_null(-1), np.int64)
    table = np.r_[token_keys(enc.dictionary.to_pylist()), _NULL]  # per distinct value only
    return table[codes]


_DECIMAL = re.compile(r"-?[0-9]+")


def token_keys(tokens: list[str]) -> np.ndarray:
    """String key values as int64: a decimal integer as itself (``"17"`` keys as ``17`` does in
    an integer column), anything else by an 8-byte BLAKE2b digest (stable across processes,
    unlike ``hash()``); the empty string as the null sentinel."""
    out = np.empty(len(tokens), np.int64)
    for i, s in enumerate(tokens):
        if not s:
            out[i] = _NULL
        elif _DECIMAL.fullmatch(s) and -(2**63) < int(s) < 2**63:
            out[i] = int(s)
        else:
            digest = hashlib.blake2b(s.encode(), digest_size=8).digest()
            out[i] = int.from_bytes(digest, "little", signed=True)
    return out


def _multi_column(col: pa.Array, what: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column as CSR ``(offsets, values)``: per row its distinct non-null values."""
    inner = col.type.value_type
    if not (pa.types.is_integer(inner) or _is_string(inner)):
        raise DataError(f"{what}: counter keys must be integers or strings, got type {col.type}")
    n = len(col)
    parent = np.asarray(pc.list_parent_indices(col), np.int64)
    vals = _key_column(pc.list_flatten(col), what)
    keep = vals != _NULL
    parent, vals = parent[keep], vals[keep]
    order = np.lexsort((vals, parent))
    parent, vals = parent[order], vals[order]
    first = np.r_[True, (parent[1:] != parent[:-1]) | (vals[1:] != vals[:-1])]
    parent, vals = parent[first], vals[first]
    return np.r_[0, np.cumsum(np.bincount(parent, minlength=n))].astype(np.int64), vals


def key_columns(live: LiveConfig) -> list[str]:
    return list(dict.fromkeys(k for c in live.counters for k in c.keys))


def video_attribute_columns(live: LiveConfig) -> dict[str, str | None]:
    """Videos-table columns the counters key on, each with its separator (config validation
    gives a column one)."""
    out: dict[str, str | None] = {}
    for c in live.counters:
        for k in (k for k in c.keys if k.startswith("video:")):
            out[k.split(":", 1)[1]] = c.separator if k == c.multi_key else None
    return out


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
    multi: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for k in key_columns(live):
        column = k.partition(":")[2]
        if k.startswith("video:") and column in attrs.multi:
            multi[k] = attrs.lookup_multi(column, videos)
            keys[k] = np.zeros(n, np.int64)
            valid[k] = np.bincount(multi[k][0], minlength=n) > 0
        elif k.startswith("video:"):
            keys[k], valid[k] = attrs.lookup(column, videos)
        elif k.startswith("context:"):
            keys[k] = context[k]
            valid[k] = context[k] != _NULL
    return Events(times, impressions.astype(np.float64), quantise(values), keys, valid, multi)


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
    start = np.cumsum([0] + [len(p) for p in parts])
    return Events(
        np.concatenate([p.times for p in parts]),
        np.concatenate([p.impressions for p in parts]),
        np.concatenate([p.values for p in parts]),
        {k: np.concatenate([p.keys[k] for p in parts]) for k in parts[0].keys},
        {k: np.concatenate([p.valid[k] for p in parts]) for k in parts[0].valid},
        {
            k: (
                np.concatenate([p.multi[k][0] + s for p, s in zip(parts, start, strict=False)]),
                np.concatenate([p.multi[k][1] for p in parts]),
            )
            for k in parts[0].multi
        },
    )


@dataclass
class Counts:
    """What a counter knows about some entities at some times."""

    impressions: np.ndarray  # (n,) float64
    sums: np.ndarray  # (n, E_c) float64, the counter's events only
    last_time: np.ndarray  # (n,) float64, NaN before the first impression

    def repeat(self, n: int) -> Counts:
        """One row's counts as ``n`` rows (a per-request counter, read once per request)."""
        return Counts(
            np.repeat(self.impressions, n),
            np.repeat(self.sums, n, axis=0),
            np.repeat(self.last_time, n),
        )
