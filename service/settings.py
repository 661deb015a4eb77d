"""Deployment settings, from the environment (``RANKER_...``) or keyword arguments in tests."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from ranker.feature_store import DEFAULT_PREFIX


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RANKER_", extra="forbid")

    artifact: Path = Field(
        default=Path("artifacts/default"),
        description="an artifact version directory, or a directory whose newest version is served",
    )
    ranking_config: Path = Path("configs/ranking.toml")
    users: Path | None = Field(
        default=None, description="users table; default: the artifact config's"
    )
    videos: Path | None = Field(
        default=None, description="videos table; default: the artifact config's"
    )
    max_candidates: int = Field(default=2000, gt=0)
    threads: int | None = Field(default=None, gt=0, description="torch intra-op threads")
    redis_url: SecretStr | None = Field(
        default=None,
        description="feature store: redis://[:password@]host:port/db (rediss:// for TLS); "
        "unset: the in-process tables",
    )
    redis_prefix: str = Field(default=DEFAULT_PREFIX, description="key prefix the push job used")
    # 50 ms: one MGET of 501 packed records takes about 2 ms (p99, asyncio + hiredis), but the
    # timeout runs on the event loop, which each concurrent request's forward pass blocks for
    # about 10 ms; 50 ms fires on a fault, not on a busy moment, and bounds what a stalled
    # Redis adds to a request (the retry pause then spares the requests after it).
    redis_timeout_ms: float = Field(default=50.0, gt=0, description="per-request Redis budget")
    redis_pool_size: int = Field(default=16, gt=0, description="Redis connections at most")
    redis_retry_ms: float = Field(
        default=500.0,
        ge=0,
        description="after a Redis timeout or connection failure, serve defaults without trying "
        "Redis for this long",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: str = "info"
