"""Feature stores behind one interface: look up one user and many videos in one call.

The in-process store holds the users and videos tables encoded with the serving model's encoder
(a few MB for hundreds of thousands of entities) and answers with a gather; the Redis store keeps
the same interface for production.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ranker.config import Config
from ranker.features import Encoded, FeatureEncoder
from ranker.tables import FeatureTable


@dataclass
class Lookup:
    user: Encoded  # (1, ...) the user's encoded features (defaults when unknown)
    videos: Encoded  # (n, ...) encoded features per candidate
    user_missing: bool
    videos_missing: np.ndarray  # (n,) bool
    degraded: str | None = None  # why defaults were used for a store fault, None when healthy
    live: np.ndarray | None = None  # (n, W) float32 live counter columns; None: the defaults
    user_has_state: bool = False  # the live state held impressions of this user
    history: np.ndarray | None = None  # (1, N) int64 history codes ([live.history]); None: none
    user_has_history: bool = False  # the history held a video of this user


class FeatureStore(Protocol):
    name: str

    async def lookup(self, user_id: int, video_ids: np.ndarray) -> Lookup: ...

    async def ready(self) -> tuple[bool, str | None]: ...

    async def close(self) -> None: ...


def _path(p: str | Path | None) -> Path | None:
    """None stays None: a config without a users or videos table has no features there."""
    return None if p is None else Path(p)


class InProcessStore:
    """Encoded feature tables in memory; lookups are vectorised ``searchsorted`` + gather."""

    name = "in-process"

    def __init__(self, users: FeatureTable, videos: FeatureTable) -> None:
        self.users = users
        self.videos = videos

    @classmethod
    def from_tables(
        cls,
        config: Config,
        encoder: FeatureEncoder,
        users: Path | None = None,
        videos: Path | None = None,
    ) -> InProcessStore:
        d = config.data
        return cls(
            FeatureTable.from_parquet(_path(users or d.users), d.user_key, encoder, "user"),
            FeatureTable.from_parquet(_path(videos or d.videos), d.video_key, encoder, "video"),
        )

    async def lookup(self, user_id: int, video_ids: np.ndarray) -> Lookup:
        u, umiss = self.users.lookup(np.asarray([user_id], dtype=np.int64))
        v, vmiss = self.videos.lookup(video_ids)
        return Lookup(u, v, bool(umiss[0]), vmiss)

    async def ready(self) -> tuple[bool, str | None]:
        return True, f"{len(self.users)} users, {len(self.videos)} videos"

    async def close(self) -> None:
        return None
