"""The feature encoder both training and serving use: vocabularies and normalisation statistics.

Categorical values map to ``1..V`` and everything unseen, rare or null to ``0`` (the unknown
bucket); numerics are optionally ``log1p``-ed, standardised, and null becomes ``0`` (the mean).
A multi-valued categorical (a ``separator``-joined column such as KuaiRand's ``tag = "3,17,5"``)
encodes into ``max_values`` columns: the codes of its known values in order, duplicates dropped,
padded with ``0``; the model mean-pools their embeddings, skipping the padding.
The state is plain JSON inside the artifact, so the service encodes exactly as the trainer did.

Encoding works on whole Arrow columns at once: integer vocabularies use ``numpy.searchsorted``,
string vocabularies Arrow's hash lookup, multi-valued columns Arrow's list kernels
(``split_pattern``, ``list_flatten``, ``list_parent_indices``) and one numpy scatter; no per-row
Python anywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ranker.config import SOURCES, FeatureSpec, Source
from ranker.errors import DataError

FORMAT = 2
"""2: multi-valued features encode into ``max_values`` columns (1 encoded only the first value;
a format-1 state without multi-valued features encodes identically and still loads)."""


@dataclass
class Vocabulary:
    """Sorted known values of one categorical feature; index ``i`` encodes as ``i + 1``."""

    values: np.ndarray  # int64 or object (str), sorted

    @property
    def is_int(self) -> bool:
        return self.values.dtype.kind in "iu"

    def lookup(self, column: pa.Array | pa.ChunkedArray | np.ndarray) -> np.ndarray:
        """Codes ``(n,)`` int64: ``1..V`` for known values, ``0`` for unknown or null."""
        if len(self.values) == 0:
            return np.zeros(len(column), dtype=np.int64)
        if isinstance(column, np.ndarray) and column.dtype.kind == "i" and self.is_int:
            # no nulls in a numpy integer array: no Arrow round trip (the service's history
            # ids, 20 per request, spent 0.25 ms of it in the conversion)
            return self._search(column.astype(np.int64, copy=False), None)
        if isinstance(column, np.ndarray):
            column = pa.array(column)
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if self.is_int and pa.types.is_integer(column.type):
            valid = ~np.asarray(column.is_null(), dtype=bool)
            return self._search(np.asarray(column.fill_null(0), dtype=np.int64), valid)
        value_set = pa.array(self.values.tolist())
        if not self.is_int:
            column = column.cast(pa.string())
        elif not pa.types.is_integer(column.type):
            column = pc.cast(column, pa.int64(), safe=False)
        idx = pc.index_in(column, value_set=value_set)
        return np.asarray(pc.add(idx, 1).fill_null(0), dtype=np.int64)

    def _search(self, ids: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
        """Codes of int64 ``ids`` in the sorted integer values (``valid``: False -> 0)."""
        pos = np.minimum(np.searchsorted(self.values, ids), len(self.values) - 1)
        hit = self.values[pos] == ids
        return np.where(hit if valid is None else hit & valid, pos + 1, 0).astype(np.int64)

    def to_json(self) -> dict[str, Any]:
        return {"type": "int" if self.is_int else "str", "values": self.values.tolist()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Vocabulary:
        dtype = np.int64 if d["type"] == "int" else object
        return cls(np.asarray(d["values"], dtype=dtype))


@dataclass
class NumericStats:
    mean: float
    std: float

    def apply(self, column: pa.Array | pa.ChunkedArray | np.ndarray, transform: str) -> np.ndarray:
        """Standardised values ``(n,)`` float32; null and non-finite become 0 (the mean)."""
        if not isinstance(column, np.ndarray):
            column = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
        x = np.asarray(column, dtype=np.float64)
        if transform == "log1p":
            x = np.log1p(np.maximum(x, 0.0))
        # Clipped: a finite but absurd input (1e300) must not become float32 infinity and poison
        # every head; 1e4 standard deviations is far beyond any real value.
        z = np.clip((x - self.mean) / self.std, -1e4, 1e4)
        return np.where(np.isfinite(z), z, 0.0).astype(np.float32)


@dataclass
class Encoded:
    """Encoded features of ``n`` rows for one source (or all sources concatenated)."""

    cat: np.ndarray  # (n, C) int64
    num: np.ndarray  # (n, N) float32

    def take(self, rows: np.ndarray) -> Encoded:
        return Encoded(self.cat[rows], self.num[rows])

    def __len__(self) -> int:
        return self.cat.shape[0]

    @staticmethod
    def concat_columns(parts: list[Encoded]) -> Encoded:
        """Side by side: ``(n, C1+C2+...)``; rows must match (the model's input order)."""
        return Encoded(
            np.concatenate([p.cat for p in parts], axis=1),
            np.concatenate([p.num for p in parts], axis=1),
        )


def _column(table: pa.Table | pa.RecordBatch, spec: FeatureSpec, origin: str) -> pa.Array:
    name = spec.source_column
    if name not in table.schema.names:
        raise DataError(
            f"{origin}: column {name!r} (feature {spec.name!r}, source {spec.source}) is missing; "
            f"columns are {table.schema.names}"
        )
    col = table.column(name)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if spec.kind == "numeric" and not (
        pa.types.is_integer(col.type)
        or pa.types.is_floating(col.type)
        or pa.types.is_boolean(col.type)
    ):
        raise DataError(f"{origin}: numeric feature column {name!r} has type {col.type}")
    return col


def _split_multi(col: pa.Array, sep: str) -> tuple[pa.Array, np.ndarray]:
    """Values of a multi-valued string column (``"3, 17,5"``), flattened and whitespace-trimmed,
    empty ones dropped, and the row each came from: ``(values (m,), rows (m,) int64)``; rows are
    non-decreasing and values keep their order within a row. A null row has no values."""
    lists = pc.split_pattern(col.cast(pa.string()), pattern=sep)
    values = pc.utf8_trim_whitespace(pc.list_flatten(lists))
    rows = np.asarray(pc.list_parent_indices(lists), dtype=np.int64)
    keep = np.asarray(pc.not_equal(values, "").fill_null(False), dtype=bool)
    return values.filter(pa.array(keep)), rows[keep]


def pack_multi(codes: np.ndarray, rows: np.ndarray, n: int, width: int) -> np.ndarray:
    """Packs value codes into a padded ``(n, width)`` int64 matrix.

    Args:
        codes: ``(m,)`` codes of every value, ``0`` for unknown ones (they are dropped, so a
            rare value never takes the slot of a known one).
        rows: ``(m,)`` row of each value, non-decreasing.
        n: rows in the output.
        width: slots per row; values after the first ``width`` known distinct ones are cut.

    Returns:
        ``(n, width)``: per row its known codes in order of appearance, each once, then zeros.
    """
    keep = codes > 0
    codes, rows = codes[keep], rows[keep]
    m = len(codes)
    if m:
        # Drop repeats of a code within a row, keeping its first occurrence (order preserved).
        order = np.lexsort((np.arange(m), codes, rows))
        dup_sorted = np.r_[
            False, (rows[order][1:] == rows[order][:-1]) & (codes[order][1:] == codes[order][:-1])
        ]
        dup = np.empty(m, bool)
        dup[order] = dup_sorted
        codes, rows = codes[~dup], rows[~dup]
        m = len(codes)
    idx = np.arange(m)
    first = np.r_[True, rows[1:] != rows[:-1]] if m else np.zeros(0, bool)
    slot = idx - np.maximum.accumulate(np.where(first, idx, 0))  # position within its row
    fit = slot < width
    out = np.zeros((n, width), np.int64)
    out[rows[fit], slot[fit]] = codes[fit]
    return out


@dataclass
class FeatureEncoder:
    """Vocabularies and statistics for every feature, in the model's input order.

    The order is: user features, video features, context features; within each source the
    config's order; categoricals go to ``cat`` columns, numerics to ``num`` columns.
    """

    features: list[FeatureSpec]
    vocabs: dict[str, Vocabulary] = field(default_factory=dict)
    stats: dict[str, NumericStats] = field(default_factory=dict)
    live: dict[str, Any] = field(default_factory=dict)
    """Point-in-time counters' state (``ranker/live.py``): event priors and column statistics;
    their columns follow every ``num`` column of the features."""

    def of(self, source: Source, kind: str | None = None) -> list[FeatureSpec]:
        return [f for f in self.features if f.source == source and (kind is None or f.kind == kind)]

    @property
    def ordered(self) -> list[FeatureSpec]:
        return [f for s in SOURCES for f in self.of(s)]

    @property
    def categorical(self) -> list[FeatureSpec]:
        return [f for f in self.ordered if f.kind == "categorical"]

    @property
    def numeric(self) -> list[FeatureSpec]:
        return [f for f in self.ordered if f.kind == "numeric"]

    @property
    def cardinalities(self) -> list[int]:
        """Embedding rows per categorical feature, in feature order (unknown bucket included)."""
        return [len(self.vocabs[f.name].values) + 1 for f in self.categorical]

    @property
    def cat_widths(self) -> list[int]:
        """``cat`` columns per categorical feature, in feature order: 1, or ``max_values`` for a
        multi-valued one (whose columns the model mean-pools)."""
        return [f.width for f in self.categorical]

    def encode(self, table: pa.Table | pa.RecordBatch, source: Source, origin: str = "") -> Encoded:
        """Encodes one source's columns of ``table``: ``cat (n, C_s)``, ``num (n, N_s)``."""
        n = table.num_rows
        cats = [
            self._encode_cat(_column(table, f, origin), f) for f in self.of(source, "categorical")
        ]
        nums = [
            self.stats[f.name].apply(_column(table, f, origin), f.transform)
            for f in self.of(source, "numeric")
        ]
        return Encoded(
            np.concatenate(cats, axis=1) if cats else np.zeros((n, 0), np.int64),
            np.stack(nums, axis=1) if nums else np.zeros((n, 0), np.float32),
        )

    def defaults(self, source: Source, n: int = 1) -> Encoded:
        """The encoding of a row whose features are all unknown: what a missing entity gets."""
        return Encoded(
            np.zeros((n, sum(f.width for f in self.of(source, "categorical"))), np.int64),
            np.zeros((n, len(self.of(source, "numeric"))), np.float32),
        )

    def _encode_cat(self, col: pa.Array, spec: FeatureSpec) -> np.ndarray:
        """Codes ``(n, width)`` of one categorical column."""
        vocab = self.vocabs[spec.name]
        if spec.separator is None:
            return vocab.lookup(col)[:, None]
        values, rows = _split_multi(col, spec.separator)
        return pack_multi(vocab.lookup(values), rows, len(col), spec.width)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "features": [f.model_dump(mode="json") for f in self.features],
            "vocabs": {k: v.to_json() for k, v in self.vocabs.items()},
            "stats": {k: {"mean": s.mean, "std": s.std} for k, s in self.stats.items()},
        } | ({"live": self.live} if self.live else {})

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FeatureEncoder:
        if d.get("format") not in (1, FORMAT):
            raise DataError(f"encoder state format {d.get('format')} is not {FORMAT}")
        features = [FeatureSpec.model_validate(f) for f in d["features"]]
        multi = [f.name for f in features if f.separator is not None]
        if d["format"] == 1 and multi:
            raise DataError(
                f"encoder state format 1 encoded multi-valued feature(s) {multi} by their first "
                f"value only; this code pools up to max_values values: retrain or re-export"
            )
        return cls(
            features=features,
            vocabs={k: Vocabulary.from_json(v) for k, v in d["vocabs"].items()},
            stats={k: NumericStats(**v) for k, v in d["stats"].items()},
            live=d.get("live", {}),
        )


class _Counts:
    """Value counts merged across batches with numpy (no per-value Python)."""

    def __init__(self) -> None:
        self.keys: list[np.ndarray] = []
        self.counts: list[np.ndarray] = []
        self.pending = 0

    def add(self, col: pa.Array, weights: np.ndarray | None = None) -> None:
        """Counts the non-null values of ``col``; with ``weights`` each row counts that much."""
        if weights is None:
            vc = pc.value_counts(col.drop_null())
            keys = vc.field("values").to_numpy(zero_copy_only=False)
            counts = vc.field("counts").to_numpy().astype(np.int64)
        else:
            valid = ~np.asarray(col.is_null(), dtype=bool)
            keys = col.filter(pa.array(valid)).to_numpy(zero_copy_only=False)
            counts = np.asarray(weights, dtype=np.int64)[valid]
        if keys.dtype.kind not in "iu":
            keys = keys.astype(object)
        self.keys.append(keys)
        self.counts.append(counts)
        self.pending += len(keys)
        if self.pending > 2_000_000:
            self._reduce()

    def _reduce(self) -> None:
        """Merges the chunks into one sorted, unique key array with summed counts."""
        if not self.keys:
            return
        keys = np.concatenate(self.keys)
        uniq, inv = np.unique(keys, return_inverse=True)
        counts = np.bincount(inv.ravel(), weights=np.concatenate(self.counts)).astype(np.int64)
        self.keys, self.counts, self.pending = [uniq], [counts], len(uniq)

    def vocabulary(self, min_count: int, max_vocab: int | None) -> Vocabulary:
        self._reduce()
        if not self.keys:
            return Vocabulary(np.zeros(0, np.int64))
        keys, counts = self.keys[0], self.counts[0]
        keep = counts >= min_count
        keys, counts = keys[keep], counts[keep]
        if max_vocab is not None and len(keys) > max_vocab:
            top = np.argsort(-counts, kind="stable")[:max_vocab]
            keys = keys[top]
        return Vocabulary(np.sort(keys))


class _Moments:
    def __init__(self) -> None:
        self.n = 0
        self.s = 0.0
        self.ss = 0.0

    def add(self, values: np.ndarray) -> None:
        v = values[np.isfinite(values)]
        self.n += v.size
        self.s += float(v.sum())
        self.ss += float(np.square(v).sum())

    def stats(self) -> NumericStats:
        if self.n == 0:
            return NumericStats(0.0, 1.0)
        mean = self.s / self.n
        var = max(self.ss / self.n - mean * mean, 0.0)
        std = float(np.sqrt(var))
        return NumericStats(mean, std if std > 1e-12 else 1.0)


class EncoderFitter:
    """Fits a :class:`FeatureEncoder` from streamed batches, one source at a time.

    Feed the users and videos tables (or only their rows that occur in training) with source
    ``user`` / ``video``, and the training part of the log with source ``context``.
    """

    def __init__(self, features: list[FeatureSpec]) -> None:
        self.features = list(features)
        self.counts = {f.name: _Counts() for f in features if f.kind == "categorical"}
        self.moments = {f.name: _Moments() for f in features if f.kind == "numeric"}

    def update(
        self,
        table: pa.Table | pa.RecordBatch,
        source: Source,
        origin: str = "",
        weights: np.ndarray | None = None,
    ) -> None:
        """Adds one batch of a source; ``weights (n,)`` count a row that many times in the
        vocabulary (e.g. a video's training impressions), so ``min_count`` means impressions."""
        for f in self.features:
            if f.source != source:
                continue
            col = _column(table, f, origin)
            if f.kind == "categorical":
                w = weights
                if f.separator is not None:
                    col, rows = _split_multi(col, f.separator)
                    if w is not None:
                        w = np.asarray(w)[rows]  # each value counts as much as its row
                elif not (pa.types.is_integer(col.type) or pa.types.is_string(col.type)):
                    col = col.cast(pa.string())
                self.counts[f.name].add(col, w)
            else:
                x = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
                x = np.asarray(x, dtype=np.float64)
                if f.transform == "log1p":
                    x = np.log1p(np.maximum(x, 0.0))
                self.moments[f.name].add(x)

    def update_many(
        self, batches: Iterable[pa.RecordBatch], source: Source, origin: str = ""
    ) -> None:
        for b in batches:
            self.update(b, source, origin)

    def finish(self) -> FeatureEncoder:
        vocabs = {
            f.name: self.counts[f.name].vocabulary(f.min_count, f.max_vocab)
            for f in self.features
            if f.kind == "categorical"
        }
        stats = {f.name: self.moments[f.name].stats() for f in self.features if f.kind == "numeric"}
        return FeatureEncoder(self.features, vocabs, stats)
