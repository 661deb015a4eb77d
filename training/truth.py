"""Metrics against the synthetic world's ground truth, which no logged data can offer.

The world writes, per impression, the position-free truth in the units the heads predict
(``true_click``, ``true_watch_time``, ``true_like``, ``true_rating``; see
docs/synthetic-world.md). A head whose task reads label column ``L`` is compared with
``true_L`` when the log has it:

* binary heads: AUC against clicks re-sampled from the true probability (the logged clicks are
  position-biased, these are not), and Pearson / Spearman correlation with the true probability;
* regression heads: correlations with the true expectation;
* the ranking score: per-request NDCG@k against the true utility, i.e. the same ranking formula
  applied to the truth columns, next to the logging policy's own order (by logged position).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

from ranker.config import Config
from ranker.metrics import auc, ndcg_at_k
from ranker.scoring import RankingFormula
from training.evaluate import Predictions

PREFIX = "true_"


def truth_columns(config: Config, columns: list[str] | set[str]) -> dict[str, str]:
    """Task name -> truth column, for the tasks whose ``true_<label>`` column exists."""
    have = set(columns)
    return {t.name: PREFIX + t.label for t in config.tasks if PREFIX + t.label in have}


def truth_metrics(
    config: Config,
    p: Predictions,
    formula: RankingFormula | None = None,
    k: int = 10,
    seed: int = 0,
    position_column: str = "position",
) -> dict[str, dict[str, float]]:
    """Per-head agreement with the truth, and the ranking score's NDCG@k against true utility."""
    cols = truth_columns(config, set(p.extra))
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, float]] = {}
    for t in config.tasks:
        if t.name not in cols:
            continue
        truth = p.extra[cols[t.name]].astype(np.float64)
        pred = p.preds[t.name]
        ok = np.isfinite(truth)
        truth, pred = truth[ok], pred[ok]
        if len(truth) < 2:
            continue
        m = {
            "pearson": float(np.corrcoef(pred, truth)[0, 1]),
            "spearman": float(spearmanr(pred, truth).statistic),
        }
        if t.kind == "binary":
            sampled = (rng.random(len(truth)) < np.clip(truth, 0, 1)).astype(np.float64)
            m["auc_true_sampled"] = auc(sampled, pred)
        out[t.name] = m
    if formula is not None:
        heads = [h for h, w in formula.config.heads.items() if w.weight != 0]
        if heads and all(h in cols for h in heads):
            truth_preds = {h: p.extra[cols[h]].astype(np.float64) for h in heads}
            utility = np.maximum(formula.score(truth_preds), 0.0)
            score = formula.score(p.preds)
            ndcg, per = ndcg_at_k(utility, score, p.requests, k)
            entry = {f"ndcg@{k}": ndcg, f"ndcg@{k}_std": float(np.std(per)), "requests": len(per)}
            if position_column in p.extra:
                logged, _ = ndcg_at_k(utility, -p.extra[position_column], p.requests, k)
                entry[f"logged_policy_ndcg@{k}"] = logged
            out["ranking_score"] = entry
    return out


def logged_ranking_metrics(
    p: Predictions, formula: RankingFormula, k: int = 10
) -> dict[str, float]:
    """NDCG@k of the ranking score against the *logged* utility: the same formula applied to the
    logged labels (a label that does not count for its head, e.g. a missing rating, adds 0).

    Works on any log, real ones included; on logged data it is biased towards the logging
    policy's order (what was not shown high was rarely clicked), so prefer the truth version
    where a world provides one. Also the spread of per-request NDCG, so a gain can be told from
    noise."""
    heads = [h for h, w in formula.config.heads.items() if w.weight != 0]
    labels = {h: np.where(p.masks[h], p.labels[h], 0.0) for h in heads}
    utility = np.maximum(formula.score(labels), 0.0)
    ndcg, per = ndcg_at_k(utility, formula.score(p.preds), p.requests, k)
    return {f"ndcg@{k}": ndcg, f"ndcg@{k}_std": float(np.std(per)), "requests": float(len(per))}


def format_truth_table(metrics: dict[str, dict[str, float]]) -> str:
    lines = []
    for name, m in metrics.items():
        cells = ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()
        )
        lines.append(f"  {name:<14} {cells}")
    return "against the truth:\n" + "\n".join(lines) if lines else ""
