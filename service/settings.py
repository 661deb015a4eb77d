"""Deployment settings, from the environment (``RANKER_...``) or keyword arguments in tests."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: str = "info"
