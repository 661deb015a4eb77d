"""Offline evaluation: every head's metrics on a split of the log, as a table and as JSON.

Binary heads: AUC, GAUC (grouped by user), logloss, calibration error; regression heads: RMSE,
MAE and XAUC in the served units (seconds for watch time, stars for rating), and RMSE in
``log1p`` units (``rmse_log1p``: the usual watch-time metric on heavy-tailed logs, where a few
long views dominate the RMSE in seconds), on the rows that count for the head. Every head also
reports its training loss on the split (``loss``), what early stopping selects on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ranker.config import Config
from ranker.heads import head_loss, head_prediction
from ranker.metrics import (
    Calibration,
    binary_summary,
    calibration,
    group_auc,
    plot_reliability,
    regression_summary,
    sessions,
)
from ranker.model import RankingModel
from training.data import BatchBuilder, ImpressionLog, Split


@dataclass
class Predictions:
    """A split's served predictions and labels, as numpy arrays of equal length."""

    preds: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    users: np.ndarray
    requests: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    losses: dict[str, float] = field(default_factory=dict)  # task -> mean head loss on the split

    def __len__(self) -> int:
        return len(self.users)


@torch.inference_mode()
def predict_split(
    model: RankingModel,
    builder: BatchBuilder,
    log: ImpressionLog,
    split: Split,
    batch_size: int = 8192,
    progress: bool = False,
    device: str = "cpu",
) -> Predictions:
    was_training = model.training
    model.eval()
    tasks = builder.config.tasks
    out = _RowArrays(log.count_rows(split))
    bar = tqdm(desc=f"predict {split}", unit=" rows", unit_scale=True, disable=not progress)
    loss_sum = dict.fromkeys((t.name for t in tasks), 0.0)
    loss_rows = dict.fromkeys((t.name for t in tasks), 0)
    for f, rb in log.record_batches(split, columns=_columns(builder, log), batch_size=batch_size):
        b = builder.build(rb, f)
        raw = model(b.cat.to(device), b.num.to(device))
        for t in tasks:
            # The head's own loss, each batch weighted by its counted rows (row weights, where a
            # task has them, weigh within a batch only).
            n = int(b.masks[t.name].sum())
            if n:
                w = b.weights.get(t.name)
                loss = head_loss(
                    t,
                    raw[t.name].float(),
                    b.labels[t.name].to(device),
                    b.masks[t.name].to(device),
                    None if w is None else w.to(device),
                )
                loss_sum[t.name] += float(loss) * n
                loss_rows[t.name] += n
            out.put(f"p:{t.name}", head_prediction(t, raw[t.name]).double())
            out.put(f"y:{t.name}", b.labels[t.name])
            out.put(f"m:{t.name}", b.masks[t.name])
        out.put("users", b.users)
        out.put("requests", b.requests)
        for k, v in b.extra.items():
            out.put(f"x:{k}", v)
        out.advance(len(b))
        bar.update(len(b))
    bar.close()
    model.train(was_training)
    cat = out.result()
    if not cat:
        empty = np.zeros(0)
        return Predictions(
            {t.name: empty for t in tasks},
            {t.name: empty for t in tasks},
            {t.name: empty.astype(bool) for t in tasks},
            empty.astype(np.int64),
            empty.astype(np.int64),
        )
    return Predictions(
        preds={t.name: cat[f"p:{t.name}"] for t in tasks},
        labels={t.name: cat[f"y:{t.name}"].astype(np.float64) for t in tasks},
        masks={t.name: cat[f"m:{t.name}"] for t in tasks},
        users=cat["users"],
        requests=cat["requests"],
        extra={k[2:]: v for k, v in cat.items() if k.startswith("x:")},
        losses={k: v / loss_rows[k] if loss_rows[k] else float("nan") for k, v in loss_sum.items()},
    )


class _RowArrays:
    """Per-row outputs of a pass over a split, written into arrays sized once for the split.

    Why not a list of per-batch pieces concatenated at the end: each piece is a small
    allocation that outlives the batch's large temporaries (the forward pass's activations),
    so the pieces end up scattered through the heap and glibc can neither reuse nor return the
    freed space around them. On a 768k-row validation split that grew the resident size by
    1.9 GB for 62 MB of predictions; with arrays sized up front it stays flat
    (``docs/scale.md``). A split that turns out longer than counted grows the arrays (rare:
    a log appended to while it is read).
    """

    def __init__(self, rows: int) -> None:
        self.capacity = rows
        self.n = 0
        self.arrays: dict[str, np.ndarray] = {}

    def put(self, key: str, x: torch.Tensor) -> None:
        v = x.detach().cpu().numpy()
        a = self.arrays.get(key)
        if a is None:
            a = self.arrays[key] = np.empty((self.capacity, *v.shape[1:]), v.dtype)
        if self.n + len(v) > len(a):
            grown = np.empty((max(2 * len(a), self.n + len(v)), *v.shape[1:]), v.dtype)
            grown[: self.n] = a[: self.n]
            a = self.arrays[key] = grown
        a[self.n : self.n + len(v)] = v

    def advance(self, rows: int) -> None:
        self.n += rows

    def result(self) -> dict[str, np.ndarray]:
        return {k: a[: self.n] for k, a in self.arrays.items()}


@torch.inference_mode()
def gate_utilisation(
    model: RankingModel,
    builder: BatchBuilder,
    log: ImpressionLog,
    split: Split = "validation",
    max_rows: int = 200_000,
    batch_size: int = 8192,
    device: str = "cpu",
) -> dict[str, dict[str, float]] | None:
    """Mean gate weight per task per expert on (up to ``max_rows`` rows of) a split, in eval
    mode (no gate dropout): how much each task leans on each expert. A task whose weight sits
    on one expert (~1.0) has a collapsed gate, the polarisation Zhao et al. (RecSys 2019,
    section 4.2) report. ``None`` for a model without gates (shared-bottom)."""
    was_training = model.training
    model.eval()
    total: torch.Tensor | None = None
    rows = 0
    try:
        for f, rb in log.record_batches(split, batch_size=batch_size):
            b = builder.build(rb, f)
            gates = model.forward_detailed(b.cat.to(device), b.num.to(device)).gates
            if gates is None:
                return None
            s = gates.double().sum(0).cpu()  # (T, E)
            total = s if total is None else total + s
            rows += len(b)
            if rows >= max_rows:
                break
    finally:
        model.train(was_training)
    if total is None or rows == 0:
        return None
    mean = (total / rows).tolist()
    names = model.expert_names()
    return {t: dict(zip(names, mean[i], strict=True)) for i, t in enumerate(model.tasks)}


def format_gate_table(util: dict[str, dict[str, float]]) -> str:
    """Gate utilisation as a fixed-width table: one row per task, one column per expert."""
    experts = list(next(iter(util.values())))
    w = max(8, *(len(e) + 2 for e in experts))
    head = f"{'gate':<12}" + "".join(f"{e:>{w}}" for e in experts)
    lines = [head, "-" * len(head)]
    for task, row in util.items():
        lines.append(f"{task:<12}" + "".join(f"{row[e]:>{w}.3f}" for e in experts))
    return "\n".join(lines)


def _columns(builder: BatchBuilder, log: ImpressionLog) -> list[str]:
    have = set(log.dataset.schema.names)
    return list(
        dict.fromkeys(log.required_columns() + [c for c in builder.extra_columns if c in have])
    )


def session_groups(config: Config, p: Predictions) -> np.ndarray | None:
    """The groups one ranking request could have ranked together: the log's requests when it has
    a request id of its own, else sessions (a user's impressions split at gaps over 30 minutes,
    :func:`ranker.metrics.sessions`); ``None`` when the rows carry no event time."""
    d = config.data
    if d.request_key != d.user_key:
        return p.requests
    t = p.extra.get(d.event_time)
    if t is None:
        return None
    return sessions(p.users, t.astype(np.float64) * d.time_unit_s)


def gauc_note(config: Config) -> str | None:
    """A warning line when per-user GAUC is not a fair measure for this model: its user
    features move with time (live counters), so a user's rows are scored under different
    states and pooling them per user over days mixes rankings no request ever made."""
    if config.data.request_key != config.data.user_key and not config.live:
        return None
    if not config.live or not (
        config.live.history is not None or any(c.per_request for c in config.live.counters)
    ):
        return None
    return (
        "note: this model's user features move with time; per-user GAUC pools rows scored "
        "under different user states and is not a fair comparison; nor quite is sgauc, where a "
        "row's label still enters its session neighbours' features: see the frozen figure"
    )


def head_metrics(config: Config, p: Predictions) -> dict[str, dict[str, float]]:
    """Metrics per head on the rows that count for it. Binary heads also get ``gauc_session``:
    GAUC within sessions (or requests), the fair comparison for features that change with time
    (per-user GAUC pooled over days is not, see :func:`ranker.metrics.sessions`)."""
    result: dict[str, dict[str, float]] = {}
    groups = session_groups(config, p)
    for t in config.tasks:
        m = p.masks[t.name]
        y, pred, users = p.labels[t.name][m], p.preds[t.name][m], p.users[m]
        if len(y) == 0:
            result[t.name] = {"count": 0.0}
        elif t.kind == "binary":
            result[t.name] = binary_summary(y, pred, users)
            if groups is not None:
                per, w = group_auc(y, pred, groups[m])
                result[t.name]["gauc_session"] = (
                    float(np.dot(per, w) / w.sum()) if per.size else float("nan")
                )
                result[t.name]["gauc_session_groups"] = float(per.size)
            per_user, _ = group_auc(y, pred, users)
            # The spread over users says whether a GAUC gain is broad or carried by a few users.
            result[t.name]["gauc_user_std"] = (
                float(np.std(per_user)) if len(per_user) else float("nan")
            )
        else:
            result[t.name] = regression_summary(y, pred, users)
            result[t.name]["rmse_log1p"] = float(
                np.sqrt(np.mean((np.log1p(np.maximum(pred, 0)) - np.log1p(np.maximum(y, 0))) ** 2))
            )
        if t.name in p.losses:
            result[t.name]["loss"] = p.losses[t.name]
    return result


COLUMNS = (
    "count",
    "auc",
    "gauc",
    "gauc_session",
    "logloss",
    "ece",
    "rmse",
    "rmse_log1p",
    "mae",
    "xauc",
)
HEADERS = {"gauc_session": "sgauc"}
CELL_WIDTH = 11  # the longest header, rmse_log1p, and a space


def reliability(config: Config, p: Predictions, path: Path, bins: int = 10) -> dict[str, Any]:
    """Writes the binary heads' reliability curves to ``path`` (PNG); returns the curve points."""
    curves: dict[str, Calibration] = {}
    for t in config.tasks:
        m = p.masks[t.name]
        if t.kind == "binary" and m.any():
            curves[t.name] = calibration(p.labels[t.name][m], p.preds[t.name][m], bins)
    if curves:
        plot_reliability(curves, path)
    return {
        name: {
            "ece": c.ece,
            "mean_pred": c.bin_mean_pred.tolist(),
            "frac_pos": c.bin_frac_pos.tolist(),
            "count": c.bin_count.tolist(),
        }
        for name, c in curves.items()
    }


def format_table(metrics: dict[str, dict[str, float]]) -> str:
    """A fixed-width table, one row per head; blank where a metric does not apply."""
    w = CELL_WIDTH
    head = f"{'head':<12}" + "".join(f"{HEADERS.get(c, c):>{w}}" for c in COLUMNS)
    lines = [head, "-" * len(head)]
    for task, m in metrics.items():
        cells = []
        for c in COLUMNS:
            v = m.get(c)
            if v is None:
                cells.append(f"{'':>{w}}")
            elif c == "count":
                cells.append(f"{int(v):>{w}d}")
            else:
                cells.append(f"{v:>{w}.4f}")
        lines.append(f"{task:<12}" + "".join(cells))
    return "\n".join(lines)


def json_ready(obj: Any) -> Any:
    """NaN/inf become None so the JSON is strict."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_ready(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
