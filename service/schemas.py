"""Request and response bodies of the HTTP API (kept apart: inputs are strict, outputs plain)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

ContextValue = str | int | float | None


class Candidate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    video_id: int = Field(ge=-(2**63), lt=2**63)


class RankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: int = Field(ge=-(2**63), lt=2**63)
    context: dict[str, ContextValue] = Field(
        default_factory=dict, description="request context features by name (device, hour, ...)"
    )
    candidates: list[Candidate] = Field(min_length=1)
    top_k: int | None = Field(default=None, ge=1, description="return only the best k")


class RankedItem(BaseModel):
    video_id: int
    score: float
    predictions: dict[str, float]


class RankResponse(BaseModel):
    model_version: str
    ranking_version: str
    user_known: bool
    unknown_videos: int
    degraded: bool = Field(
        default=False, description="ranked on default features because of a feature-store fault"
    )
    degraded_reason: str | None = None
    items: list[RankedItem]


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    model_version: str | None
    ranking_version: str | None
    store: str
    store_ok: bool = True
    degraded_responses: int = 0
    detail: str | None = None
    position: str | None = None  # what the served model does with position (from the manifest)
