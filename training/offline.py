"""Jobs on finished models: evaluate an artifact on a log, export an artifact from a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ranker.artifact import build_model, load_artifact, save_artifact
from ranker.config import Config
from ranker.errors import ArtifactError, ConfigError, DataError, TrainingError
from ranker.features import FeatureEncoder
from ranker.live import OfflineCounters
from ranker.scoring import RankingFormula, load_ranking_config
from ranker.tables import FeatureTable
from training.checkpoint import read_checkpoint
from training.data import BatchBuilder, ImpressionLog, Split
from training.evaluate import (
    format_table,
    gauc_note,
    head_metrics,
    json_ready,
    predict_split,
    reliability,
)
from training.samples import build_samples
from training.selection import Selector
from training.truth import (
    format_truth_table,
    logged_ranking_metrics,
    truth_columns,
    truth_metrics,
)


def evaluate_artifact(
    artifact_path: Path,
    log: str | None = None,
    split: Split = "validation",
    progress: bool = True,
    out: str | None = None,
    ranking: Path | None = None,
    k: int = 10,
) -> dict[str, Any]:
    """Per-head metrics of an exported model on a log, with the artifact's own encoder; on a log
    with truth columns (the synthetic world) also the metrics against the truth, including
    NDCG@k of the ranking score against the true utility. The ranking score is the ``ranking``
    file's, else the artifact's own; one that does not fit the heads costs the ranking metrics
    only (the reason is printed and kept under ``ranking_score_missing``), never the heads'."""
    artifact = load_artifact(artifact_path)
    config = artifact.config
    if log:
        config = Config.model_validate(
            config.model_dump() | {"data": config.data.model_dump() | {"log": Path(log)}}
        )
    d = config.data
    impressions = ImpressionLog(config)
    users = FeatureTable.from_parquet(d.users, d.user_key, artifact.encoder, "user")
    videos = FeatureTable.from_parquet(d.videos, d.video_key, artifact.encoder, "video")
    names = impressions.dataset.schema.names
    extra = [*truth_columns(config, names).values()]
    extra += [c for c in (config.position.column,) if c in names and extra]
    with_truth = bool(extra)
    extra += [c for c in (d.event_time,) if c in names and c not in extra]  # sessions
    counters = continued_counters(artifact.config, config)
    builder = BatchBuilder(
        config, artifact.encoder, users, videos, extra, serving=True, counters=counters
    )
    preds = predict_split(artifact.model, builder, impressions, split, progress=progress)
    metrics = head_metrics(config, preds)
    per_request = counters is not None and (
        counters.history is not None or any(c.per_request for c in counters.live.counters)
    )
    if counters is not None and per_request and d.request_key == d.user_key:
        # The fair within-session comparison for user state that moves: every row scored with
        # the state at its session's start (docs/live-features.md). A log with request ids
        # groups by request, whose rows already share one state.
        counters.frozen = True
        frozen = head_metrics(config, predict_split(artifact.model, builder, impressions, split))
        counters.frozen = False
        for name, m in frozen.items():
            if "gauc_session" in m:
                metrics[name]["gauc_session_frozen"] = m["gauc_session"]
    formula, missing = None, None
    try:
        chosen = load_ranking_config(ranking) if ranking is not None else artifact.ranking
        formula = RankingFormula(chosen, config.task_names)
    except ConfigError as e:
        missing = str(e)
    truth = truth_metrics(config, preds, formula, k) if with_truth else {}
    ranking_score = logged_ranking_metrics(preds, formula, k) if formula is not None else {}
    result = json_ready(
        {
            "artifact": str(artifact.path),
            "version": artifact.version,
            "split": split,
            "rows": len(preds),
            "position": artifact.manifest.get("position"),
            "heads": metrics,
            "ranking": {
                "config": str(ranking) if ranking is not None else "the artifact's own",
                "version": formula.version if formula is not None else None,
            },
            "ranking_score_logged": ranking_score,
            "ranking_score_missing": missing,
            "truth": truth,
        }
    )
    print(f"{artifact.version} on {impressions.path} ({split}, {len(preds)} rows)")
    print(format_table(metrics))
    note = gauc_note(config)
    if note:
        print(note)
    for name, m in metrics.items():
        if "gauc_session_frozen" in m:
            print(
                f"{name}: GAUC within sessions, user state frozen at each session's start: "
                f"{m['gauc_session_frozen']:.4f}"
            )
    if ranking_score:
        print(
            f"ranking score vs logged utility: ndcg@{k} {ranking_score[f'ndcg@{k}']:.4f} "
            f"(per-request std {ranking_score[f'ndcg@{k}_std']:.4f}, "
            f"{int(ranking_score['requests'])} requests)"
        )
    if missing:
        print(f"no ranking score: {missing}")
    if truth:
        print(format_truth_table(truth))
    if out:
        png = Path(out).with_suffix(".reliability.png")
        result["calibration"] = json_ready(reliability(config, preds, png))
        print(f"reliability plot: {png}")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
        print(f"metrics: {out}")
    return result


def continued_counters(trained: Config, evaluated: Config) -> OfflineCounters | None:
    """Live counters for evaluating on ``evaluated``'s log as the service would have had them:
    the training log's events continued through the evaluated log's rows, in time order (the
    two logs are taken as disjoint; the same log is read once)."""
    if trained.live is None:
        return None
    return OfflineCounters(evaluated, [Path(trained.data.log), Path(evaluated.data.log)])


def export_checkpoint(checkpoint: Path, root: Path | None = None) -> Path:
    """An artifact from a checkpoint written by ``ranker train`` (it carries config and encoder),
    with the weights that best-epoch selection kept so far (``training/selection.py``), not the
    last ones, unless ``training.selection.keep = "last"``. A ZILN head's mean calibration needs
    the log (``training/calibration.py``) and is not applied here."""
    try:
        state = read_checkpoint(checkpoint)
    except TrainingError as e:
        raise ArtifactError(f"cannot export: {e}") from None
    config = Config.model_validate_json(state["config"])
    encoder = FeatureEncoder.from_json(json.loads(state["encoder"]))
    model = build_model(config, encoder)
    model.load_state_dict(state["model"])
    if state.get("selection") is not None:
        selector = Selector(config.training.selection, config.task_names)
        selector.load_state_dict(state["selection"])
        selector.restore(model)
    e = config.export
    try:
        samples = build_samples(config, encoder, e.sample_requests, e.sample_candidates)
    except DataError as err:  # the training data is elsewhere: the weights still export
        print(f"warning: no sample requests in the artifact ({err}); auto serves fp32 engines")
        samples = None
    return save_artifact(
        model.eval(), encoder, config, json.loads(state.get("metrics", "{}")), root, samples
    )
