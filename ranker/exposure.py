"""The service's own logs, as the trainer will read them back: exposures and feedback events.

The loop from serving back into training (docs/experiments.md) has three parts that must agree
on these two record layouts, so they live in the core:

- the service writes one **exposure** row per candidate it returned (``service/exposure_log.py``);
- ``POST /v1/events`` writes one **event** row per feedback event it accepted;
- ``ranker build-log`` joins the two into a log in the trainer's format and ``ranker ab-report``
  reads that log per variant.

Exposures are long (one row per shown video), not one row per request: the join with events is
then a join on ``(request_id, video_id)`` and the joined log is the trainer's log as it is, one
impression per row with its ``position``. The request's context values are stored as one JSON
object (``context``), since the context features differ between models; head predictions as a
map from head name to value, for the same reason.
"""

from __future__ import annotations

import pyarrow as pa

EXPOSURE_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),  # X-Request-ID, or the service's
        pa.field("time", pa.float64(), nullable=False),  # the request's time (log time unit)
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("video_id", pa.int64(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),  # 0 = first shown, as in the logs
        pa.field("score", pa.float32(), nullable=False),  # the ranking score it was sorted by
        pa.field("predictions", pa.map_(pa.string(), pa.float32()), nullable=False),
        pa.field("context", pa.string(), nullable=False),  # the request's context, JSON object
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("ranking_version", pa.string(), nullable=False),
        pa.field("variant", pa.string(), nullable=True),  # None: no variants declared
        pa.field("degraded", pa.bool_(), nullable=False),  # ranked on default features
    ]
)
"""One row per candidate returned by ``POST /v1/rank`` (the ``top_k`` shown, not all scored)."""

EVENT_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("request_id", pa.string(), nullable=True),  # the exposure it answers, if known
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("video_id", pa.int64(), nullable=False),
        pa.field("type", pa.string(), nullable=False),  # impression, click, like, watch_seconds
        pa.field("time", pa.float64(), nullable=False),
        pa.field("value", pa.float64(), nullable=False),  # 1, or an amount (seconds)
        pa.field("received", pa.float64(), nullable=False),  # server clock, Unix seconds
    ]
)
"""One row per feedback event accepted by ``POST /v1/events`` (duplicates by id are not kept)."""


def check_schema(table: pa.Schema, expected: pa.Schema, path: str) -> None:
    """Raises ``ValueError`` naming the file and the first missing or mistyped column."""
    for f in expected:
        i = table.get_field_index(f.name)
        if i < 0:
            raise ValueError(f"{path}: missing column {f.name!r}")
        if not table.field(i).type.equals(f.type):
            raise ValueError(
                f"{path}: column {f.name!r} has type {table.field(i).type}, expected {f.type}"
            )
