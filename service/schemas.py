"""Request and response bodies of the HTTP API (kept apart: inputs are strict, outputs plain)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

# Context values: JSON's NaN / Infinity literals (which Python's json accepts) and integers
# outside int64 are refused here with a 422 naming the key, not met later as a 500.
Int64 = Annotated[int, Field(ge=-(2**63), lt=2**63)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
ContextValue = str | Int64 | FiniteFloat | None


# Ids and top_k are strict: a JSON integer, not true, "7" or 7.0 (the msgspec fast path in
# service/decode.py is strict by itself).
Id = Annotated[int, Field(ge=-(2**63), lt=2**63, strict=True)]


class Candidate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    video_id: Id


class RankRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "user_id": 42,
                    "context": {"device": "ios", "hour": 20},
                    "candidates": [{"video_id": 1}, {"video_id": 2}, {"video_id": 3}],
                    "top_k": 2,
                }
            ]
        },
    )
    user_id: Id
    context: dict[str, ContextValue] = Field(
        default_factory=dict, description="request context features by name (device, hour, ...)"
    )
    candidates: list[Candidate] = Field(min_length=1)
    top_k: int | None = Field(
        default=None,
        ge=1,
        le=10**9,
        strict=True,
        description="return only the best k (at most RANKER_MAX_CANDIDATES)",
    )
    time: FiniteFloat | None = Field(
        default=None,
        description="the request's time in the log's time unit, for live counters' time since "
        "the last impression (replays); default: the server's clock",
    )


class RankedItem(BaseModel):
    video_id: int
    score: float | None = Field(description="null in a deadline fallback: nothing was scored")
    predictions: dict[str, float] = Field(description="empty in a deadline fallback")


class RankResponse(BaseModel):
    model_version: str
    ranking_version: str
    user_known: bool | None = Field(
        description="the feature store knows the user; null in a deadline fallback (not looked up)"
    )
    unknown_videos: int
    unknown_context: list[str] = Field(
        default_factory=list,
        description="context features whose value the model does not know (never seen in "
        "training): ranked as if the request had left them out",
    )
    degraded: bool = Field(
        default=False,
        description="ranked on default features because of a feature-store fault, or not "
        "ranked at all because the deadline passed first (degraded_reason says which)",
    )
    degraded_reason: str | None = None
    user_has_state: bool | None = Field(
        default=None,
        description="live counters held impressions of this user (None: the model has none)",
    )
    user_has_history: bool | None = Field(
        default=None,
        description="the user's recent history ([live.history]) held an engaged video "
        "(None: the model has no history)",
    )
    variant: str | None = Field(
        default=None,
        description="the ranking config's variant this user is in (control: the base weights); "
        "None when the config declares no variants",
    )
    items: list[RankedItem]


MAX_EVENTS = 10_000
"""Events per ``POST /v1/events`` body: a batch from a log shipper, bounded like candidates."""


class FeedbackEvent(BaseModel):
    """One thing a user did with a shown video; ``type`` is ``impression`` or one of the
    model's ``live.events`` (click, long_view, like, watch_seconds, ...)."""

    model_config = ConfigDict(extra="forbid")
    event_id: str = Field(min_length=1, max_length=128, description="idempotence key")
    user_id: Id
    video_id: Id
    type: str = Field(min_length=1, max_length=64)
    time: FiniteFloat = Field(description="when, in the log's time unit")
    value: FiniteFloat = Field(default=1.0, ge=0, description="1, or an amount (seconds)")
    context: dict[str, ContextValue] = Field(
        default_factory=dict, description="the impression's context (e.g. tab), as in /v1/rank"
    )
    request_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="the X-Request-ID of the /v1/rank response that showed the video: the "
        "event log keeps it, so ranker build-log joins the event to that exposure",
    )


class EventsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[FeedbackEvent] = Field(min_length=1, max_length=MAX_EVENTS)


class EventsResponse(BaseModel):
    accepted: int = Field(description="events applied to the state")
    duplicates: int = Field(description="events whose id was seen before (ignored)")


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
    degraded: bool = Field(
        default=False,
        description="the feature store fails: responses are ranked on default features (every "
        "candidate ties on them); still ready, since it still answers",
    )
    degraded_reason: str | None = None
    position: str | None = None  # what the served model does with position (from the manifest)
    reloads: int = Field(default=0, description="model or ranking swaps since start")
    last_reload_error: str | None = Field(
        default=None,
        description="why the newest artifact or ranking config was refused (the old one serves)",
    )
    pinned_version: str | None = Field(
        default=None, description="the version POST /admin/reload pinned, if any"
    )
    engine: str | None = Field(default=None, description="the scoring engine that serves")
    engine_ms: float | None = Field(
        default=None,
        description="RANKER_BACKEND=auto: its median forward time on the sample requests, ms",
    )
    engine_selection: dict[str, Any] | None = Field(
        default=None,
        description="RANKER_BACKEND=auto: every engine tried, its time, accuracy and verdict",
    )
    variants: list[str] = Field(
        default_factory=list, description="the ranking config's variants, control first"
    )
    shadow_state: str = Field(
        default="off",
        description="the shadow model (RANKER_SHADOW_ARTIFACT): off, loading, ready or failed; "
        "never affects readiness",
    )
    shadow_version: str | None = None
    shadow_error: str | None = Field(default=None, description="why the shadow failed")


class ProblemItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str | None = None


class ValidationProblem(BaseModel):
    """422: one entry per wrong field; ``loc`` names it (``["body", "candidates", 0, ...]``)."""

    detail: list[ProblemItem]


class Problem(BaseModel):
    """Any other 4xx / 5xx: one message (413 body too large, 401, 404, 503, ...)."""

    detail: str


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="a version directory name under the artifact root, to pin (a rollback); "
        "unset: the newest version, ending any pin",
    )


class ReloadResult(BaseModel):
    model_version: str
    ranking_version: str
    model_changed: bool
    ranking_changed: bool
    pinned_version: str | None = None
    error: str | None = Field(default=None, description="what was refused; the old one serves")
