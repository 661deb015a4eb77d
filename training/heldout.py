"""Served predictions of an exported artifact on a held-out split of a log.

Why one helper: the tuner and the report both need "what this artifact predicts for every logged
row of the validation split", computed exactly as the trainer validates (the artifact's own
encoder, :class:`~training.data.BatchBuilder`'s join, :func:`~training.evaluate.predict_split`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ranker.artifact import Artifact, load_artifact
from ranker.config import Config
from ranker.tables import FeatureTable
from training.data import BatchBuilder, ImpressionLog, Split
from training.evaluate import Predictions, predict_split
from training.truth import PREFIX as TRUTH_PREFIX
from training.truth import truth_columns

__all__ = ["TRUTH_PREFIX", "HeldOut", "load_heldout"]


@dataclass
class HeldOut:
    """An artifact, the config it was evaluated with (the log possibly replaced), the log, and
    its predictions on one split; ``predictions.extra`` holds the truth columns the log has
    (``true_<label>``, the synthetic world's position-free truth; docs/synthetic-world.md)."""

    artifact: Artifact
    config: Config
    log: ImpressionLog
    split: Split
    predictions: Predictions


def load_heldout(
    artifact_path: Path,
    log: str | Path | None = None,
    split: Split = "validation",
    with_truth: bool = True,
    progress: bool = True,
) -> HeldOut:
    """Loads an artifact and predicts every row of ``split`` of its log (or of ``log``).

    Args:
        artifact_path: a version directory or its parent (the newest version is used).
        log: another Parquet log; default: the one in the artifact's config.
        split: the time split; validation by default, the rows the model never trained on.
        with_truth: also read the log's ``true_*`` columns when it has them.
        progress: show a progress bar while predicting.
    """
    artifact = load_artifact(Path(artifact_path))
    config = artifact.config
    if log:
        config = Config.model_validate(
            config.model_dump() | {"data": config.data.model_dump() | {"log": Path(log)}}
        )
    d = config.data
    impressions = ImpressionLog(config)
    extra: list[str] = []
    if with_truth:
        extra = list(truth_columns(config, impressions.dataset.schema.names).values())
    users = FeatureTable.from_parquet(d.users, d.user_key, artifact.encoder, "user")
    videos = FeatureTable.from_parquet(d.videos, d.video_key, artifact.encoder, "video")
    # serving=True: context features with a serving default (the position, when it is a model
    # feature) take that value, so these are the predictions the service would make
    from training.offline import continued_counters

    counters = continued_counters(artifact.config, config)
    builder = BatchBuilder(
        config, artifact.encoder, users, videos, extra, serving=True, counters=counters
    )
    preds = predict_split(artifact.model, builder, impressions, split, progress=progress)
    return HeldOut(artifact, config, impressions, split, preds)
