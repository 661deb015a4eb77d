"""The user's recent history (``[live.history]``): the last N videos the user engaged with,
strictly before each row, the same definition offline and online.

An engaged event is a ``live.history.engaged`` event (e.g. a click) with a value above 0: on a
log, a row whose event column is positive; at serving, such a ``POST /v1/events`` event. A
user's engaged events are ordered by ``(time, video id)``, most recent first; rows at the same
time are not "before" one another (as for the counters, :mod:`ranker.live`: KuaiRand logs exact
duplicates at one millisecond, and a duplicate's click would leak the other's label). Repeats
count: a video clicked twice is in the history twice.

* :class:`HistoryIndex` (training, evaluation, the start-up state): one sort of every engaged
  event by ``(user, time, video)``; a query is two ``searchsorted`` calls and a gather of the
  ``N`` entries before the found one. Memory: 24 bytes per engaged event of the logs (a key,
  the video id, the time).
* :class:`HistoryState` (serving): per user only its last ``N`` entries, ``16 N + 16`` bytes
  per user (320 + 16 for ``N = 20``). Adding events is a :class:`HistoryIndex` over the
  affected users' kept entries and the new events, queried after everything: the last ``N`` of
  a set are the last ``N`` of (the last ``N`` of any part of it, plus the rest), so the result
  equals the offline query whatever order or batching the events come in.

Videos are encoded with the video id feature's vocabulary (codes ``1..V``; an unknown video is
``0``, the padding code, so it is dropped from the history, online as offline). Nothing loops
over rows in Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ranker.config import Config, HistorySpec
from ranker.features import FeatureEncoder
from ranker.tables import FeatureTable


@dataclass
class Recent:
    """Up to ``N`` most recent engaged videos per query row, most recent first."""

    videos: np.ndarray  # (n, N) int64 video ids, 0 where ok is False
    times: np.ndarray  # (n, N) float64, NaN where ok is False
    ok: np.ndarray  # (n, N) bool: the slot holds a video

    @property
    def counts(self) -> np.ndarray:
        return self.ok.sum(1)


class HistoryIndex:
    """Every user's engaged events, sorted, to answer "the last N before time t"."""

    def __init__(
        self, length: int, users: np.ndarray, times: np.ndarray, videos: np.ndarray
    ) -> None:
        self.length = length
        order = np.lexsort((videos, times, users))
        u, t, v = users[order], times[order], videos[order]
        self.users = np.unique(u)
        self.times_unique = np.unique(t)
        self.stride = len(self.times_unique) + 1
        dense = np.searchsorted(self.users, u)
        self.comp = dense * self.stride + np.searchsorted(self.times_unique, t) + 1
        self.videos = v
        self.times = t
        self.start = np.searchsorted(dense, np.arange(len(self.users)))  # each user's first

    @classmethod
    def of_events(
        cls, spec: HistorySpec, users: np.ndarray, times: np.ndarray, videos: np.ndarray,
        values: np.ndarray,
    ) -> HistoryIndex:  # fmt: skip
        """From event rows: those whose engaged value is above 0 count."""
        m = values > 0
        return cls(spec.length, users[m], times[m], videos[m])

    @property
    def nbytes(self) -> int:
        return self.comp.nbytes + self.videos.nbytes + self.times.nbytes + self.start.nbytes

    def before(self, users: np.ndarray, times: np.ndarray) -> Recent:
        """Per query row, the user's last ``N`` engaged videos at times strictly before its own
        (``times = inf``: after everything)."""
        n, k = len(users), self.length
        if len(self.users) == 0:
            return Recent(
                np.zeros((n, k), np.int64), np.full((n, k), np.nan), np.zeros((n, k), bool)
            )
        dense = np.minimum(np.searchsorted(self.users, users), len(self.users) - 1)
        found = self.users[dense] == users
        rank = np.searchsorted(self.times_unique, times, side="left")  # distinct times < t
        last = np.searchsorted(self.comp, dense * self.stride + rank, side="right") - 1
        avail = np.where(found, last - self.start[dense] + 1, 0)  # the user's events before t
        ok = np.arange(k)[None, :] < np.clip(avail, 0, k)[:, None]  # (n, N)
        pos = np.where(ok, last[:, None] - np.arange(k)[None, :], 0)
        return Recent(
            np.where(ok, self.videos[pos], 0),
            np.where(ok, self.times[pos], np.nan),
            ok,
        )


class HistoryState:
    """Serving: every user's last ``N`` engaged videos (sorted users, parallel arrays)."""

    def __init__(self, length: int, users: np.ndarray, recent: Recent) -> None:
        self.length = length
        self.users = users
        self.recent = recent

    @classmethod
    def from_index(cls, index: HistoryIndex) -> HistoryState:
        users = index.users.copy()
        return cls(index.length, users, index.before(users, np.full(len(users), np.inf)))

    def __len__(self) -> int:
        return len(self.users)

    @property
    def nbytes(self) -> int:
        r = self.recent
        return self.users.nbytes + r.videos.nbytes + r.times.nbytes + r.ok.nbytes

    def current(self, users: np.ndarray) -> Recent:
        """The users' histories as they stand (empty for a user never seen)."""
        k = self.length
        if len(self.users) == 0:
            n = len(users)
            return Recent(
                np.zeros((n, k), np.int64), np.full((n, k), np.nan), np.zeros((n, k), bool)
            )
        pos = np.minimum(np.searchsorted(self.users, users), len(self.users) - 1)
        hit = (self.users[pos] == users)[:, None]
        r = self.recent
        return Recent(
            np.where(hit, r.videos[pos], 0), np.where(hit, r.times[pos], np.nan), hit & r.ok[pos]
        )

    def add(self, users: np.ndarray, times: np.ndarray, videos: np.ndarray) -> None:
        """Adds engaged events (any order, any batching): each affected user keeps the last
        ``N`` of its kept entries and the new events."""
        if not len(users):
            return
        touched = np.unique(users)
        old = self.current(touched)
        ok = old.ok.ravel()
        idx = HistoryIndex(
            self.length,
            np.r_[np.repeat(touched, self.length)[ok], users],
            np.r_[old.times.ravel()[ok], times],
            np.r_[old.videos.ravel()[ok], videos],
        )
        new = idx.before(touched, np.full(len(touched), np.inf))
        fresh = np.setdiff1d(touched, self.users, assume_unique=True)
        if len(fresh):
            at = np.searchsorted(self.users, fresh)
            r = self.recent
            self.users = np.insert(self.users, at, fresh)
            self.recent = Recent(
                np.insert(r.videos, at, 0, axis=0),
                np.insert(r.times, at, np.nan, axis=0),
                np.insert(r.ok, at, False, axis=0),
            )
        pos = np.searchsorted(self.users, touched)
        self.recent.videos[pos] = new.videos
        self.recent.times[pos] = new.times
        self.recent.ok[pos] = new.ok


def encode_history(config: Config, encoder: FeatureEncoder, recent: Recent) -> np.ndarray:
    """Codes ``(n, N)`` int64 in the video id feature's vocabulary, ``0`` for padding (and for
    a video outside the vocabulary, which the model then skips)."""
    vocab = encoder.vocabs[config.history_feature().name]
    codes = np.zeros(recent.videos.shape, np.int64)
    codes[recent.ok] = vocab.lookup(recent.videos[recent.ok])
    return codes


def side_codes(config: Config, encoder: FeatureEncoder, videos: FeatureTable) -> np.ndarray:
    """``(S, V)`` int64: each ``live.history.side`` feature's code per code of the video id
    vocabulary, read from the video table (``0``, the unknown bucket, for a video the table
    lacks and for the padding code). The model keeps it (:meth:`RankingModel.set_history_side`),
    so the service looks up only the history's video ids, as before."""
    side = config.history_side_features()
    vocab = encoder.vocabs[config.history_feature().name]
    out = np.zeros((len(side), len(vocab.values) + 1), np.int64)
    if not side or len(videos) == 0:
        return out
    cats = encoder.of("video", "categorical")
    starts = np.cumsum([0] + [f.width for f in cats])
    column = {f.name: int(starts[i]) for i, f in enumerate(cats)}
    codes = vocab.lookup(videos.keys)
    known = codes > 0
    rows = videos.rows.cat[: len(videos)]
    for i, f in enumerate(side):
        out[i, codes[known]] = rows[known, column[f.name]]
    return out
