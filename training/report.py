"""``ranker report``: one HTML page that shows a trained model in pictures.

Why: the facts about a model are spread over the artifact (manifest, config), the training run's
``train_log.jsonl`` (step losses, task weights, gate weights, epoch validation) and an evaluation
that has to be recomputed. A reader should understand what was trained, whether training
converged, how well-calibrated each head is and which experts each task leans on, without reading
JSON lines. The page is a folder (``index.html`` + PNGs, no scripts, no external assets), so it
opens from disk and can be attached to a review or archived.
"""

from __future__ import annotations

import html
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ranker.errors import RankerError
from ranker.metrics import calibration, plot_reliability
from training.data import Split
from training.evaluate import Predictions, head_metrics
from training.truth import truth_metrics

__all__ = ["ReportError", "TrainLog", "build_report", "read_train_log"]

_FIGSIZE_PANEL = (4.2, 3.0)


class ReportError(RankerError):
    """The report cannot be built (unreadable training log, unwritable folder, ...)."""


@dataclass
class TrainLog:
    """``train_log.jsonl`` split into its record kinds (see :mod:`training.loop`)."""

    steps: list[dict[str, Any]] = field(
        default_factory=list
    )  # step, epoch, losses, weights[, gates]
    epochs: list[dict[str, Any]] = field(default_factory=list)  # epoch, train_loss, validation
    gate_utilisation: dict[str, dict[str, float]] | None = None  # task -> expert -> mean weight
    path: Path | None = None

    @property
    def gate_records(self) -> list[dict[str, Any]]:
        return [r for r in self.steps if r.get("gates") is not None]


def read_train_log(path: Path) -> TrainLog:
    """Parses a training log; a truncated last line (a run still writing) is skipped.

    Raises:
        ReportError: a line in the middle is not JSON (names file and line).
    """
    log = TrainLog(path=path)
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):
                break
            raise ReportError(f"{path}:{i}: not a JSON record: {e}") from None
        if "step" in rec and "losses" in rec:
            log.steps.append(rec)
        elif "epoch" in rec and "validation" in rec:
            log.epochs.append(rec)
        elif isinstance(rec.get("gate_utilisation"), dict):
            log.gate_utilisation = rec["gate_utilisation"]
    return log


# --------------------------------------------------------------------------------------------
# Figures (Agg canvas, never pyplot: safe headless and leaves global state alone)
# --------------------------------------------------------------------------------------------


def _figure(n_panels: int, cols: int = 2, panel: tuple[float, float] = _FIGSIZE_PANEL):  # noqa: ANN202
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = max(1, min(cols, n_panels))
    rows = max(1, -(-n_panels // cols))
    # constrained layout is solved while saving: one draw, where tight_layout costs a second
    fig = Figure(figsize=(panel[0] * cols, panel[1] * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    return fig, axes


def _save(fig: Any, path: Path) -> Path:  # noqa: ANN401 - matplotlib Figure
    fig.savefig(path, format="png")
    return path


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists)."""
    if window <= 1 or y.size == 0:
        return y
    c = np.cumsum(np.r_[0.0, y])
    idx = np.arange(1, y.size + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _epoch_ends(log: TrainLog) -> list[int]:
    """Last logged step of every epoch but the last (where to draw epoch boundaries)."""
    ends: dict[int, int] = {}
    for r in log.steps:
        ends[int(r["epoch"])] = int(r["step"])
    return [ends[e] for e in sorted(ends)[:-1]]


def plot_losses(log: TrainLog, tasks: list[str], path: Path) -> Path:
    """Per task: the logged step losses, their moving average, and each epoch's mean loss."""
    fig, axes = _figure(len(tasks))
    steps = np.array([r["step"] for r in log.steps], dtype=float)
    window = max(1, len(steps) // 15)
    for ax, t in zip(axes, tasks, strict=True):
        y = np.array([r["losses"].get(t, np.nan) for r in log.steps], dtype=float)
        ax.plot(steps, y, color="tab:blue", alpha=0.3, lw=0.8, label="logged step")
        ax.plot(
            steps,
            _smooth(np.nan_to_num(y), window),
            color="tab:blue",
            lw=1.8,
            label=f"moving mean ({window})",
        )
        last = {int(r["epoch"]): int(r["step"]) for r in log.steps}
        ep = [(last[e["epoch"]], e["train_loss"].get(t)) for e in log.epochs if e["epoch"] in last]
        if ep:
            ax.plot(*zip(*ep, strict=True), "o", color="tab:red", label="epoch mean")
        for s in _epoch_ends(log):
            ax.axvline(s, color="0.6", ls=":", lw=1)
        ax.set_title(f"{t}: training loss")
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="x-small")
    return _save(fig, path)


_VALIDATION_KEYS = {"binary": ("auc", "gauc"), "regression": ("xauc", "gxauc")}


def plot_validation(log: TrainLog, kinds: dict[str, str], path: Path) -> Path:
    """Per task, the ranking metrics of every epoch's validation (AUC/GAUC for binary heads,
    XAUC/GXAUC for regression heads: all "probability of ordering a pair right", 0.5 = chance)."""
    tasks = list(kinds)
    fig, axes = _figure(len(tasks))
    epochs = [int(e["epoch"]) for e in log.epochs]
    for ax, t in zip(axes, tasks, strict=True):
        for key in _VALIDATION_KEYS[kinds[t]]:
            y = [e["validation"].get(t, {}).get(key) for e in log.epochs]
            y = [np.nan if v is None else v for v in y]
            ax.plot(epochs, y, "-o", label=key)
        ax.set_title(f"{t}: validation")
        ax.set_xlabel("epoch")
        ax.set_xticks(epochs)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")
    return _save(fig, path)


def plot_task_weights(log: TrainLog, tasks: list[str], path: Path) -> Path:
    """The weighting strategy's per-task weights at every logged step."""
    fig, (ax,) = _figure(1, panel=(7.5, 3.6))
    steps = [r["step"] for r in log.steps]
    for t in tasks:
        ax.plot(steps, [r.get("weights", {}).get(t, np.nan) for r in log.steps], label=t)
    for s in _epoch_ends(log):
        ax.axvline(s, color="0.6", ls=":", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("task weight")
    ax.set_title("Task weights over training")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def mean_gates(log: TrainLog, last: int) -> np.ndarray:
    """``(T, E)`` mean gate weight per task and expert over the ``last`` logged gate records."""
    recs = log.gate_records[-last:]
    return np.mean([np.asarray(r["gates"], dtype=float) for r in recs], axis=0)


def plot_gate_heatmap(
    gates: np.ndarray, tasks: list[str], experts: list[str], title: str, path: Path
) -> Path:
    """Heatmap of the mean gate weights ``(T, E)``: which experts each task's gate leans on."""
    n_t, n_e = gates.shape
    fig, (ax,) = _figure(1, panel=(max(5.0, 0.75 * n_e + 2.5), max(2.6, 0.6 * n_t + 1.4)))
    im = ax.imshow(
        gates, cmap="viridis", vmin=0.0, vmax=max(float(gates.max()), 1e-9), aspect="auto"
    )
    ax.set_xticks(range(n_e), experts, rotation=45 if n_e > 8 else 0, fontsize="small")
    ax.set_yticks(range(n_t), tasks)
    hi = 0.6 * float(gates.max())
    for i in range(n_t):
        for j in range(n_e):
            ax.text(
                j,
                i,
                f"{gates[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="k" if gates[i, j] > hi else "w",
            )
    ax.set_xlabel("expert")
    ax.set_title(title)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def plot_gates_over_training(
    log: TrainLog, tasks: list[str], experts: list[str], path: Path
) -> Path:
    """Per task, its gate's weight on every expert over the logged steps (stacked to 1)."""
    recs = log.gate_records
    steps = np.array([r["step"] for r in recs], dtype=float)
    g = np.array([r["gates"] for r in recs], dtype=float)  # (R, T, E)
    fig, axes = _figure(len(tasks))
    for i, (ax, t) in enumerate(zip(axes, tasks, strict=True)):
        ax.stackplot(steps, g[:, i, :].T, labels=experts)
        ax.set_ylim(0, 1)
        ax.set_title(f"{t}: gate over training")
        ax.set_xlabel("step")
    if len(experts) <= 12:
        axes[0].legend(fontsize="xx-small", ncol=2, loc="upper right")
    return _save(fig, path)


def _quantile_bins(pred: np.ndarray, bins: int) -> np.ndarray:
    """Bin index per row, ``bins`` groups of (nearly) equal size by prediction rank."""
    order = np.argsort(pred, kind="stable")
    idx = np.empty(pred.size, dtype=np.int64)
    idx[order] = np.arange(pred.size) * bins // max(pred.size, 1)
    return idx


def plot_calibration_quantiles(
    p: Predictions, binary: list[str], path: Path, bins: int = 20
) -> Path:
    """Per binary head, mean prediction vs. observed rate in equal-count bins, on log axes.

    Why next to the standard reliability diagram: a like head predicting 1-5 % puts nearly every
    row into the first of ten equal-width bins; equal-count bins on log axes show its whole range.
    """
    fig, axes = _figure(len(binary))
    for ax, t in zip(axes, binary, strict=True):
        m = p.masks[t]
        y, pr = p.labels[t][m], p.preds[t][m]
        idx = _quantile_bins(pr, bins)
        cnt = np.bincount(idx, minlength=bins)
        ok = cnt > 0
        mp = np.bincount(idx, weights=pr, minlength=bins)[ok] / cnt[ok]
        fy = np.bincount(idx, weights=y, minlength=bins)[ok] / cnt[ok]
        lo = max(min(mp.min(initial=1.0), fy[fy > 0].min(initial=1.0)) * 0.7, 1e-5)
        ax.plot([lo, 1], [lo, 1], "--", color="0.5", lw=1)
        ax.plot(mp, np.maximum(fy, lo), "o-", ms=3.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, 1)
        ax.set_ylim(lo, 1)
        ax.set_title(f"{t}: {bins} equal-count bins")
        ax.set_xlabel("mean predicted probability")
        ax.set_ylabel("observed rate")
        ax.grid(True, alpha=0.3, which="both")
    return _save(fig, path)


def plot_regression_calibration(
    p: Predictions, regression: list[str], units: dict[str, str], path: Path, bins: int = 20
) -> Path:
    """Per regression head, mean label vs. mean prediction in equal-count prediction bins: a
    calibrated head lies on the diagonal; a head trained on log1p targets predicts a geometric
    rather than arithmetic mean and sits below it."""
    fig, axes = _figure(len(regression))
    for ax, t in zip(axes, regression, strict=True):
        m = p.masks[t]
        y, pr = p.labels[t][m], p.preds[t][m]
        idx = _quantile_bins(pr, bins)
        cnt = np.bincount(idx, minlength=bins)
        ok = cnt > 0
        mp = np.bincount(idx, weights=pr, minlength=bins)[ok] / cnt[ok]
        my = np.bincount(idx, weights=y, minlength=bins)[ok] / cnt[ok]
        lo, hi = float(min(mp.min(), my.min())), float(max(mp.max(), my.max()))
        ax.plot([lo, hi], [lo, hi], "--", color="0.5", lw=1, label="calibrated")
        ax.plot(mp, my, "o-", ms=3.5, label="bins")
        unit = f" ({units[t]})" if units.get(t) else ""
        ax.set_title(f"{t}: mean label per prediction bin")
        ax.set_xlabel(f"mean prediction{unit}")
        ax.set_ylabel(f"mean label{unit}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222;
       line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0 1em; font-size: .92em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; }
th { background: #f4f4f4; text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; }
p.note { color: #555; font-size: .92em; } .warn { color: #a33; }
code { background: #f4f4f4; padding: 0 .2em; }
"""


def _esc(x: object) -> str:
    return html.escape(str(x))


def _num(v: object, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int | np.integer):
        return f"{int(v):,}"
    if isinstance(v, float | np.floating):
        if not np.isfinite(v):
            return "n/a"
        return f"{v:,.0f}" if abs(v) >= 1e5 else f"{v:.{digits}g}"
    return _esc(v)


def html_table(
    rows: Sequence[Sequence[object]], header: Sequence[str], numeric_from: int = 1
) -> str:
    """A plain HTML table; cells from column ``numeric_from`` on are right-aligned numbers."""
    out = ["<table>", "<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>"]
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            if i >= numeric_from and not isinstance(c, str):
                cells.append(f'<td class="n">{_num(c)}</td>')
            else:
                cells.append(f"<td>{_esc(c)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


EVAL_COLUMNS = (
    "count",
    "auc",
    "gauc",
    "logloss",
    "ece",
    "rmse",
    "rmse_log1p",
    "mae",
    "xauc",
    "gxauc",
)


def evaluation_table(metrics: dict[str, dict[str, float]]) -> str:
    """Per-head metrics as HTML (the columns of ``training.evaluate.format_table`` plus GXAUC and
    the label/prediction means); blank where a metric does not apply."""
    header = ["head", *EVAL_COLUMNS, "label mean", "prediction mean"]
    rows = []
    for t, m in metrics.items():
        cnt = m.get("count")
        row: list[object] = [t, int(cnt) if cnt is not None else ""]
        row += [m.get(c, "") if m.get(c) is not None else "" for c in EVAL_COLUMNS[1:]]
        row += [m.get("positive_rate", m.get("mean_label", "")), m.get("mean_pred", "")]
        rows.append(row)
    return html_table(rows, header)


def _img(name: str, alt: str) -> str:
    return f'<p><img src="{_esc(name)}" alt="{_esc(alt)}"></p>'


def _section(title: str, body: list[str]) -> list[str]:
    return [f"<h2>{_esc(title)}</h2>", *body]


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------


def build_report(
    artifact: Path,
    out: Path | None = None,
    *,
    run_dir: Path | None = None,
    log: str | None = None,
    split: Split = "validation",
    gate_records: int = 5,
    tune_dir: Path | None = None,
    progress: bool = True,
) -> Path:
    """Writes the report folder for an artifact and returns the path of its ``index.html``.

    Args:
        artifact: a version directory or its parent (the newest version).
        out: the folder to write; default ``<run_dir>/report``.
        run_dir: the training run (its ``train_log.jsonl``); default: the artifact config's
            ``training.run_dir``. Without a log, the training sections say so and are skipped.
        log: evaluate on another Parquet log; default: the artifact config's.
        split: the split to evaluate and calibrate on.
        gate_records: how many of the last logged gate records the heatmap averages.
        tune_dir: a ``ranker tune`` output folder to include (Pareto plots, weights, metrics).
        progress: progress bar while predicting.
    """
    from training.heldout import load_heldout

    if gate_records < 1:
        raise ReportError(f"--gate-records must be a positive integer, got {gate_records}")
    held = load_heldout(artifact, log, split, with_truth=True, progress=progress)
    art, config, preds = held.artifact, held.config, held.predictions
    run_dir = Path(run_dir) if run_dir else Path(config.training.run_dir)
    out = Path(out) if out else run_dir / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"cannot create report folder {out}: {e}") from None
    for old in out.glob("*.png"):  # a rerun must not leave pictures of another model
        old.unlink()
    tasks = config.tasks
    names = [t.name for t in tasks]
    kinds = {t.name: t.kind for t in tasks}
    binary = [t.name for t in tasks if t.kind == "binary"]
    regression = [t.name for t in tasks if t.kind == "regression"]
    man = art.manifest
    model_info = man.get("model", {})

    body: list[str] = [
        f"<h1>Model report: {_esc(man.get('name'))} {_esc(art.version)}</h1>",
        f'<p class="note">Artifact <code>{_esc(art.path)}</code>, created '
        f"{_esc(man.get('created'))}, code {_esc(man.get('code_version'))}. Evaluated on the "
        f"{_esc(split)} split of <code>{_esc(held.log.path)}</code> ({len(preds):,} rows, "
        f"{np.unique(preds.requests).size:,} requests).</p>",
    ]

    # what was trained
    m, tr = config.model, config.training
    facts = [
        ("architecture", m.architecture),
        ("parameters", model_info.get("parameters")),
        ("FLOPs per row", model_info.get("flops_per_row")),
        ("experts", getattr(m, "num_experts", "")),
        ("expert layers", str(m.expert_hidden)),
        ("tower layers", str(m.tower_hidden)),
        ("embedding dim", m.embedding_dim),
        ("task weighting", config.weighting.name),
        ("epochs x batch size", f"{tr.epochs} x {tr.batch_size}"),
        ("learning rate", tr.lr),
        ("features", ", ".join(f"{f.name} ({f.source})" for f in config.features)),
        (
            "ranking it carries",
            f"{art.ranking.formula}: "
            + ", ".join(
                f"{h} {w.weight:g}" + (f" ({w.transform})" if w.transform != "identity" else "")
                for h, w in art.ranking.heads.items()
            ),
        ),
    ]
    task_rows = [[t.name, t.kind, t.label, t.loss, t.only_where or "", t.unit or ""] for t in tasks]
    body += _section(
        "What was trained",
        [
            html_table([[k, v] for k, v in facts], ["", "value"]),
            html_table(task_rows, ["head", "kind", "label", "loss", "only where", "unit"], 99),
        ],
    )

    # evaluation
    metrics = head_metrics(config, preds)
    truth = truth_metrics(config, preds)
    ev = [
        evaluation_table(metrics),
        '<p class="note">AUC/GAUC (grouped by user) rank clicks and likes; XAUC is the share of '
        "pairs a regression head orders right (0.5 = chance); ECE is the calibration error "
        "(10 equal-width bins). Binary heads count every row, regression heads the rows with a "
        "label (rating: rated rows only).</p>",
    ]
    if truth:
        ev.append(
            html_table(
                [
                    [t, v.get("pearson"), v.get("spearman"), v.get("auc_true_sampled", "")]
                    for t, v in truth.items()
                ],
                ["head", "Pearson with truth", "Spearman with truth", "AUC vs sampled truth"],
            )
        )
        ev.append(
            '<p class="note">The log has the synthetic world\'s truth columns (position-free '
            "expectations, see docs/synthetic-world.md; metrics from "
            "<code>training.truth</code>): a head trained on position-biased labels that still "
            "agrees with its truth has learnt relevance, not position. The AUC scores clicks "
            "re-drawn from the true probability, free of position bias.</p>"
        )
    body += _section(f"Evaluation ({split} split)", ev)

    # calibration
    cal: list[str] = []
    if binary:
        curves = {
            t: calibration(preds.labels[t][preds.masks[t]], preds.preds[t][preds.masks[t]])
            for t in binary
        }
        plot_reliability(curves, out / "calibration.png")
        plot_calibration_quantiles(preds, binary, out / "calibration_quantiles.png")
        cal += [
            _img("calibration.png", "reliability diagram"),
            '<p class="note">Reliability diagram (10 equal-width bins): points on the diagonal '
            "are calibrated. Heads with small probabilities crowd the first bin, so the next "
            "figure uses equal-count bins on log axes.</p>",
            _img("calibration_quantiles.png", "calibration in equal-count bins"),
        ]
    if regression:
        units = {t.name: t.unit for t in tasks}
        plot_regression_calibration(preds, regression, units, out / "calibration_regression.png")
        cal += [
            _img("calibration_regression.png", "regression heads: label vs prediction"),
            '<p class="note">Regression heads: the mean label of the rows in each prediction '
            "bin. The ranking formula adds these predictions in their served units, so a head "
            "that is off the diagonal shifts the trade-off it was given weight for.</p>",
        ]
    body += _section("Calibration", cal)

    # training curves
    log_path = run_dir / "train_log.jsonl"
    train_log = read_train_log(log_path) if log_path.is_file() else None
    if train_log is None or not train_log.steps:
        body += _section(
            "Training",
            [
                f'<p class="warn">No training log at <code>{_esc(log_path)}</code>: training '
                "curves, task weights and gate weights are skipped (pass --run-dir).</p>"
            ],
        )
    else:
        plot_losses(train_log, names, out / "losses.png")
        tr_body = [
            f'<p class="note">From <code>{_esc(log_path)}</code>: {len(train_log.steps)} logged '
            f"steps, {len(train_log.epochs)} epochs. Dotted lines are epoch boundaries.</p>",
            _img("losses.png", "training losses per task"),
        ]
        if train_log.epochs:
            plot_validation(train_log, kinds, out / "validation.png")
            tr_body.append(_img("validation.png", "validation metrics per epoch"))
            rows = []
            for e in train_log.epochs:
                for t in names:
                    v = e["validation"].get(t, {})
                    keys = _VALIDATION_KEYS[kinds[t]]
                    extra = ("logloss",) if kinds[t] == "binary" else ("rmse",)
                    rows.append(
                        [e["epoch"], t, *(v.get(k) for k in keys + extra), e["train_loss"].get(t)]
                    )
            tr_body.append(
                html_table(
                    rows,
                    ["epoch", "head", "AUC / XAUC", "GAUC / GXAUC", "logloss / RMSE", "train loss"],
                    2,
                )
            )
            mismatch = _log_mismatch(train_log, man)
            if mismatch:
                tr_body.append(f'<p class="warn">{_esc(mismatch)}</p>')
        body += _section("Training", tr_body)

        plot_task_weights(train_log, names, out / "task_weights.png")
        body += _section(
            "Task weights",
            [
                _img("task_weights.png", "task weights over training"),
                f'<p class="note">The weights the <code>{_esc(config.weighting.name)}</code> '
                "strategy gave each task's loss at every logged step (constant for equal and "
                "static weighting).</p>",
            ],
        )

        if train_log.gate_records:
            g = mean_gates(train_log, gate_records)
            experts = _expert_names(train_log, art.model, g.shape[1])
            n_rec = min(gate_records, len(train_log.gate_records))
            title = f"Mean gate weight, last {n_rec} logged training steps"
            plot_gate_heatmap(g, names, experts, title, out / "gates.png")
            plot_gates_over_training(train_log, names, experts, out / "gates_over_training.png")
            gate_body = [
                _img("gates.png", "mean gate weight per task and expert"),
                f'<p class="note">Each row is one task\'s softmax gate averaged over the batch of '
                f"the last {n_rec} logged training steps; it sums to 1. Rows that differ mean the "
                "tasks rely on different experts; a uniform row (1/E everywhere) means the gate "
                "has not specialised; a row with one cell near 1 is a collapsed gate.</p>",
            ]
            util = train_log.gate_utilisation
            if util and set(util) >= set(names):
                cols = list(next(iter(util.values())))
                gv = np.array([[util[t].get(e, np.nan) for e in cols] for t in names])
                title = "Mean gate weight on the validation split (eval mode)"
                plot_gate_heatmap(gv, names, cols, title, out / "gates_validation.png")
                gate_body += [
                    _img("gates_validation.png", "gate weights on validation"),
                    '<p class="note">The same, measured by the trainer after the last epoch on '
                    "the validation rows in eval mode (no gate dropout): what serving sees.</p>",
                ]
            gate_body.append(_img("gates_over_training.png", "gate weights over training"))
            body += _section("Gate utilisation", gate_body)
        else:
            body += _section(
                "Gate utilisation",
                [
                    f'<p class="note">The {_esc(m.architecture)} architecture has no gates: '
                    + (
                        "learned cross-stitch units mix the task columns (their weights are in "
                        "the artifact's model).</p>"
                        if m.architecture == "cross_stitch"
                        else "every task reads the same shared representation.</p>"
                    )
                ],
            )

    if tune_dir is not None:
        body += _section("Ranking-weight tuning", _tune_section(Path(tune_dir), out))

    page = (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>Model report {_esc(art.version)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    index = out / "index.html"
    index.write_text(page)
    return index


def _expert_names(log: TrainLog, model: Any, n: int) -> list[str]:  # noqa: ANN401 - RankingModel
    """The gate columns' names: as logged, else as the model names them, else ``e0..``."""
    logged = log.gate_records[-1].get("gate_experts") if log.gate_records else None
    names = logged or (model.expert_names() if hasattr(model, "expert_names") else None)
    return list(names) if names and len(names) == n else [f"e{i}" for i in range(n)]


def _log_mismatch(log: TrainLog, manifest: dict[str, Any]) -> str | None:
    """A warning when the log's last validation differs from the artifact's recorded metrics:
    the run folder was then reused by another training run."""
    recorded = manifest.get("metrics", {}).get("validation", {})
    last = log.epochs[-1]["validation"] if log.epochs else {}
    for task, m in recorded.items():
        for key, value in m.items():
            other = last.get(task, {}).get(key)
            if value is None or other is None:
                continue
            if abs(float(value) - float(other)) > 1e-6 * max(1.0, abs(float(value))):
                return (
                    f"The training log's last validation ({task} {key} {other:.6g}) differs from "
                    f"the artifact's recorded metrics ({value:.6g}): the log may be from another "
                    "run in the same folder."
                )
    return None


def _tune_section(tune_dir: Path, out: Path) -> list[str]:
    """The Pareto plots and the current-vs-chosen table of a ``ranker tune`` folder."""
    summ_path = tune_dir / "summary.json"
    if not summ_path.is_file():
        return [f'<p class="warn">No tuning summary at <code>{_esc(summ_path)}</code>.</p>']
    summ = json.loads(summ_path.read_text())
    body = [f"<p>Goal: <b>{_esc(summ.get('goal'))}</b> (formula {_esc(summ.get('formula'))}).</p>"]
    for name in ("pareto.png", "pareto_truth.png"):
        if (tune_dir / name).is_file():
            shutil.copyfile(tune_dir / name, out / f"tune_{name}")
            body.append(_img(f"tune_{name}", "engagement vs satisfaction"))
    cur, new = summ.get("current", {}).get("heads", {}), summ.get("chosen", {}).get("heads", {})
    body.append(
        html_table(
            [
                [h, (cur.get(h) or {}).get("weight", 0.0), (new.get(h) or {}).get("weight", 0.0)]
                for h in sorted(set(cur) | set(new))
            ],
            ["head", "current weight", "chosen weight"],
        )
    )
    for split, rows in summ.get("metrics", {}).items():
        body.append(f"<p>Metrics on the {_esc(split)} requests:</p>")
        body.append(
            html_table(
                [
                    [
                        k,
                        v["current"],
                        v["chosen"],
                        "" if v["change_pct"] is None else f"{v['change_pct']:+.1f} %",
                    ]
                    for k, v in rows.items()
                ],
                ["metric", "current", "chosen", "change"],
            )
        )
    body.append(f'<p class="note">{_esc(summ.get("note", ""))}</p>')
    return body
