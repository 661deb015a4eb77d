"""Encoded feature rows of one pushed feature version, kept in the serving process by id.

A pushed version never changes (``ranker.feature_store``: its keys are written before the
pointer moves to it and are never rewritten), so an entity decoded and encoded once is valid
for as long as that version is current: caching it is exact, not an approximation that can go
stale. Each version gets its own caches and a push starts from empty ones.

Why: reading 500 packed video records and encoding them through the encoder (Arrow columns,
vocabulary lookups, standardisation) took about 3 ms of the request at concurrency 1, most of
it fixed per-call overhead repeated for videos that every user's candidates share. With the
cache a request fetches and encodes only what this process has not seen in this version; the
MGET still carries the version pointer, so a push is noticed on the very next request.

Bounded: at ``capacity`` entries the cache starts over (rows are about 40 bytes for the
default schema, so a million entries is about 40 MB per source and version).
"""

from __future__ import annotations

from itertools import repeat

import numpy as np

from ranker.features import Encoded


class EntityCache:
    """``id -> (encoded row, missing)`` for one source of one version; ``capacity=0`` keeps
    nothing."""

    def __init__(self, template: Encoded, capacity: int) -> None:
        self.capacity = capacity
        self._index: dict[int, int] = {}
        self._cat = np.empty((0, template.cat.shape[1]), template.cat.dtype)
        self._num = np.empty((0, template.num.shape[1]), template.num.dtype)
        self._missing = np.empty(0, bool)
        self._rows = 0  # rows written since the last start-over (>= len(self._index))
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._index)

    def find(self, ids: np.ndarray) -> tuple[np.ndarray, Encoded, np.ndarray]:
        """``(found (n,) bool, rows of the found ids, their missing flags)``. The rows are
        copies: the caller may await before using them while another request adds entries."""
        pos = np.fromiter(map(self._index.get, ids.tolist(), repeat(-1)), np.int64, len(ids))
        found = pos >= 0
        at = pos[found]
        self.hits += len(at)
        self.misses += len(ids) - len(at)
        return found, Encoded(self._cat[at], self._num[at]), self._missing[at]

    def add(self, ids: np.ndarray, rows: Encoded, missing: np.ndarray) -> None:
        """Remembers freshly encoded rows (missing ones too: an id absent from a version stays
        absent from it)."""
        k = len(ids)
        if k == 0 or k > self.capacity:
            return
        if self._rows + k > self.capacity:
            self._index.clear()
            self._rows = 0
        start = self._rows
        if start + k > len(self._missing):
            size = min(self.capacity, max(2 * len(self._missing), start + k, 1024))
            self._cat = _grown(self._cat, size, start)
            self._num = _grown(self._num, size, start)
            self._missing = _grown(self._missing, size, start)
        self._cat[start : start + k] = rows.cat
        self._num[start : start + k] = rows.num
        self._missing[start : start + k] = missing
        self._rows += k
        # An id added twice (two requests missed it at once) points at its newest row; the
        # older row is dead until the next start-over.
        self._index.update(zip(ids.tolist(), range(start, start + k), strict=True))


def _grown(a: np.ndarray, size: int, keep: int) -> np.ndarray:
    out = np.empty((size, *a.shape[1:]), a.dtype)
    out[:keep] = a[:keep]
    return out
