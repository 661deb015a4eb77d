"""Keyed, pre-encoded feature tables: the vectorised join both training and serving use.

A users or videos table is encoded once; looking up a batch of ids is a ``searchsorted`` plus a
gather. Ids not in the table resolve to a trailing default row (the schema defaults), and the
caller learns which ones were missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ranker.config import Source
from ranker.errors import DataError
from ranker.features import Encoded, FeatureEncoder


def as_int64_ids(column: pa.Array | pa.ChunkedArray | np.ndarray, what: str) -> np.ndarray:
    """Entity ids as int64; the project's keys are integers (both its world and real logs)."""
    if isinstance(column, np.ndarray):
        if column.dtype.kind not in "iu":
            raise DataError(f"{what}: ids must be integers, got dtype {column.dtype}")
        return column.astype(np.int64, copy=False)
    if not pa.types.is_integer(column.type):
        raise DataError(f"{what}: ids must be integers, got type {column.type}")
    if column.null_count:
        raise DataError(f"{what}: {column.null_count} null ids")
    return np.asarray(pc.cast(column, pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)


@dataclass
class FeatureTable:
    """Encoded rows of one source sorted by key, plus a default row at index ``len(keys)``."""

    source: Source
    keys: np.ndarray  # (n,) int64, sorted, unique
    rows: Encoded  # (n + 1) rows; the last is the default

    @classmethod
    def build(
        cls, table: pa.Table, key: str, encoder: FeatureEncoder, source: Source, origin: str
    ) -> FeatureTable:
        if key not in table.schema.names:
            raise DataError(
                f"{origin}: key column {key!r} is missing; columns are {table.schema.names}"
            )
        if table.num_rows == 0:
            raise DataError(
                f"{origin}: the {source}s table has no rows; give a table with one row per "
                f"{source}, or leave data.{source}s out when the log itself carries every feature"
            )
        ids = as_int64_ids(table.column(key), f"{origin} column {key!r}")
        # Duplicate keys: the last row wins (tables are appended to over time).
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        last = np.r_[sorted_ids[1:] != sorted_ids[:-1], True]
        order, sorted_ids = order[last], sorted_ids[last]
        enc = encoder.encode(table, source, origin).take(order)
        default = encoder.defaults(source)
        rows = Encoded(
            np.concatenate([enc.cat, default.cat]), np.concatenate([enc.num, default.num])
        )
        return cls(source, sorted_ids, rows)

    @classmethod
    def absent(cls, encoder: FeatureEncoder, source: Source) -> FeatureTable:
        """No table: every id resolves to the default row. What a config without
        ``data.users`` / ``data.videos`` gets (it has no features of that source, so the default
        row has no columns)."""
        return cls(source, np.zeros(0, np.int64), encoder.defaults(source))

    @classmethod
    def from_parquet(
        cls, path: Path | None, key: str, encoder: FeatureEncoder, source: Source
    ) -> FeatureTable:
        """The table at ``path``; :meth:`absent` when ``path`` is None (no table configured)."""
        if path is None:
            return cls.absent(encoder, source)
        try:
            table = pq.read_table(path)
        except (FileNotFoundError, OSError, pa.ArrowInvalid) as e:
            raise DataError(f"cannot read {source} table {path}: {e}") from None
        return cls.build(table, key, encoder, source, str(path))

    def __len__(self) -> int:
        return len(self.keys)

    def index(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row index per id ``(n,)`` and a ``missing`` mask ``(n,)`` (those get the default row)."""
        if len(self.keys) == 0:
            return np.full(len(ids), 0, np.int64), np.ones(len(ids), bool)
        pos = np.minimum(np.searchsorted(self.keys, ids), len(self.keys) - 1)
        found = self.keys[pos] == ids
        return np.where(found, pos, len(self.keys)), ~found

    def lookup(self, ids: np.ndarray) -> tuple[Encoded, np.ndarray]:
        idx, missing = self.index(ids)
        return self.rows.take(idx), missing
