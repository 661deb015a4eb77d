"""Task weighting: every registered strategy on the same synthetic world, cost and quality.

Two measurements over every strategy in :func:`ranker.weighting.registry`:

(a) **Cost**, every strategy whose config has a ``mode`` in both ``representation`` and
    ``parameters`` mode. The default model (MMoE of ``configs/default.toml``) and batch size
    (2048), a fixed set of in-memory training batches (no data loading in the timed part), the
    trainer's step (forward, masked per-task losses, ``Weighting.backward``, Adam step). Each
    strategy's step alternates with a step of an equal-weighting reference model on the same
    batch, so that load from other jobs hits both alike; a round's ratio is the strategy's time
    over the reference's, ``--timing-steps`` steps per strategy per round, strategies visited
    round-robin from a rotating start; the median over ``--timing-rounds`` rounds is reported.
(b) **Quality**, every strategy in its default mode (``--quality-modes both``: both modes). For
    every seed one world (``--requests`` requests x 20 rows), one training run per strategy
    through the real trainer (``training.loop.train``, training seed = world seed, everything
    else as in ``configs/default.toml``), then on the validation days: click AUC, like AUC,
    watch-time XAUC and RMSE (seconds), rating RMSE (stars) and the NDCG@10 of the serving score
    (``configs/ranking.toml``) against the world's true utility (``training.truth``). Mean and
    spread (sample std) over seeds, and each strategy's paired difference to equal weighting.

A strategy is called the winner of a metric only when the seeds agree: it is the best on average
and, against every other strategy, its per-seed difference has the same sign on every seed and a
mean larger than the spread (std) of those paired differences (every strategy sees the same world
per seed). Otherwise the metric is a tie between the best and those it does not beat so.

``static`` gets the inverse of equal weighting's epoch-1 mean training loss per task (seed 0's,
scaled to sum to the number of tasks): the hand-tuned "balance the loss scales" weights.

The defaults (4000 requests, 3 epochs so that DWA reweights in the last one, 3 seeds, 1 torch
thread) take about 25 minutes on 2 quiet cores (a default-model step: ~0.14 s on one core;
several times that when other jobs share the machine).

    .venv/bin/python bench/weighting.py                                      # the full run
    .venv/bin/python bench/weighting.py --requests 800 --seeds 2 --max-steps 2 \\
        --timing-rounds 1 --timing-steps 1 --out /tmp/wq                    # a quick look
    .venv/bin/python bench/weighting.py --strategies gls,upgrad --skip-quality \\
        --out /tmp/wq                             # the cost of some strategies only

Only the cost, for every strategy in both modes, before/after a change (``--baseline``: another
checkout's code timed in the same invocation, the same ``--strategies``; see
``bench/weighting_cost.py``)::

    git worktree add --detach /tmp/wbase main
    .venv/bin/python bench/weighting.py --cost-only --requests 800 --timing-rounds 5 \\
        --timing-steps 2 --baseline /tmp/wbase                                # ~10 min

Writes ``<out>/weighting.md`` (strategy reference, tables, machine, date, command) and
``<out>/img/weighting_weights.png`` (representative strategies' task weights over training, seed
0); ``--raw FILE`` also keeps the raw numbers, ``--render FILE`` rewrites the markdown and the plot
from such a file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from weighting_cost import code_root, cost_report, time_baseline, write_cost_block  # noqa: E402

ROOT = code_root(Path(__file__).resolve().parent.parent)
"""The checkout whose code and configs are benchmarked: this one, or ``$WEIGHTING_BENCH_CODE``
(``--baseline`` times another checkout that way)."""
sys.path.insert(0, str(ROOT))

from machine import cpu_model  # noqa: E402

from ranker.artifact import build_model  # noqa: E402
from ranker.config import Config, load_config  # noqa: E402
from ranker.heads import head_loss  # noqa: E402
from ranker.model import RankingModel  # noqa: E402
from ranker.scoring import RankingFormula, load_ranking_config  # noqa: E402
from ranker.weighting import (  # noqa: E402
    GradientWeighting,
    SharedPart,
    Weighting,
    build_weighting,
    registry,
)
from training.data import Batch, BatchBuilder, ImpressionLog  # noqa: E402
from training.encoding import fit_encoder  # noqa: E402
from training.evaluate import predict_split  # noqa: E402
from training.loop import train  # noqa: E402
from training.synth import WorldConfig, generate  # noqa: E402
from training.truth import truth_columns, truth_metrics  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "default.toml"
RANKING_CONFIG = ROOT / "configs" / "ranking.toml"

PAPERS: dict[str, str] = {
    "equal": "none (the plain sum; the baseline)",
    "static": "none (fixed hand-set weights)",
    "uncertainty": "Kendall, Gal & Cipolla, CVPR 2018 (arXiv:1705.07115)",
    "dwa": "Liu, Johns & Davison, CVPR 2019 (arXiv:1803.10704)",
    "gradnorm": "Chen et al., ICML 2018 (arXiv:1711.02257)",
    "rlw": "Lin et al., TMLR 2022 (arXiv:2111.10603)",
    "famo": "Liu et al., NeurIPS 2023 (arXiv:2306.03792)",
    "mgda": "Sener & Koltun, NeurIPS 2018 (arXiv:1810.04650)",
    "pcgrad": "Yu et al., NeurIPS 2020 (arXiv:2001.06782)",
    "cagrad": "Liu et al., NeurIPS 2021 (arXiv:2110.14048)",
    "imtl": "Liu et al., ICLR 2021 (openreview IMPnRXEWpvr)",
    "nash_mtl": "Navon et al., ICML 2022 (arXiv:2202.01017)",
    "db_mtl": "Lin et al., 2023 (arXiv:2308.12029)",
    "aligned_mtl": "Senushkin et al., CVPR 2023 (arXiv:2305.19000)",
    "gls": "Chennupati et al., CVPR Workshops 2019 (arXiv:1904.08492)",
    "graddrop": "Chen et al., NeurIPS 2020 (arXiv:2010.06808)",
    "gradvac": "Wang et al., ICLR 2021 (arXiv:2010.05874)",
    "moco": "Fernando et al., ICLR 2023 (arXiv:2210.12624)",
    "stch": "Lin et al., ICML 2024 (arXiv:2402.19078)",
    "excess_mtl": "He et al., ICML 2024 (arXiv:2402.02009)",
    "fairgrad": "Ban & Ji, ICML 2024 (arXiv:2402.15638)",
    "upgrad": "Quinton & Rey, 2024 (arXiv:2406.16232)",
}
"""The paper each strategy implements (the module docstrings give the full reference)."""

MODE_EXTRAS: dict[tuple[str, str], dict[str, Any]] = {
    # DB-MTL's EMA of gradients is meaningless over per-batch representations (see its module).
    ("db_mtl", "representation"): {"beta": 0.0},
    # Nor MoCo's gradient tracking: y_t = g_t (beta 1, no decay) over representations.
    ("moco", "representation"): {"beta": 1.0, "beta_sigma": 0.0},
}
"""Extra config a strategy needs to run in a mode that is not its default."""

PLOTTED = ("uncertainty", "dwa", "gradnorm", "famo", "mgda", "nash_mtl")
"""Strategies whose weights over training are plotted (default mode, seed 0)."""

METRICS: tuple[tuple[str, str, bool], ...] = (
    ("click_auc", "click AUC", True),
    ("like_auc", "like AUC", True),
    ("watch_xauc", "watch XAUC", True),
    ("watch_rmse", "watch RMSE (s)", False),
    ("rating_rmse", "rating RMSE", False),
    ("ndcg10", "truth NDCG@10", True),
)
"""(key, column title, higher is better) of each quality metric."""
QUALITY_KEYS = tuple(k for k, _, _ in METRICS)

NOTES_MARKER = "<!-- Hand-written notes below this line survive a rerun of bench/weighting.py. -->"
"""Everything after this line in ``weighting.md`` is kept when the bench rewrites the file."""


@dataclass(frozen=True)
class Case:
    """One strategy in one configuration: ``label`` in the tables, ``weighting`` the config."""

    label: str
    name: str
    weighting: dict[str, Any]
    default_mode: bool = True


@dataclass
class Results:
    """Everything the markdown and the plot are made of (JSON-serialisable via ``vars``)."""

    args: dict[str, Any]
    command: str
    machine: str
    date: str
    timing: dict[str, list[float]] = field(default_factory=dict)  # label -> per-round ratios
    equal_ms: list[float] = field(default_factory=list)  # equal's ms/step, per round
    quality: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # label -> per seed
    weights: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # label -> records
    static_weights: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def family(name: str) -> str:
    """``gradient`` for a strategy that needs each task's gradient (one backward per task),
    ``loss`` for one that weights the losses and back-propagates once."""
    cls = registry()[name]
    has_mode = "mode" in cls.config_class.model_fields
    return "gradient" if issubclass(cls, GradientWeighting) or has_mode else "loss"


def cases(
    static_weights: dict[str, float], both_modes: bool = True, only: list[str] | None = None
) -> list[Case]:
    """Every registered strategy (or ``equal`` and those in ``only``) with its default config
    (``static`` with ``static_weights``); strategies with a ``mode`` in both modes when
    ``both_modes``, else in their default mode, labelled ``name (rep)`` / ``name (par)``."""
    out: list[Case] = []
    names = sorted(n for n in registry() if n != "equal" and (only is None or n in only))
    for name in ["equal", *names]:
        fields = registry()[name].config_class.model_fields
        base: dict[str, Any] = {"name": name}
        if name == "static":
            base["weights"] = dict(static_weights)
        if "mode" not in fields:
            out.append(Case(name, name, base))
            continue
        default = fields["mode"].default
        modes = ["representation", "parameters"] if both_modes else [default]
        for mode in modes:
            w = base | {"mode": mode} | MODE_EXTRAS.get((name, mode), {})
            label = f"{name} ({mode[:3]})"
            out.append(Case(label, name, w, default_mode=mode == default))
    return out


def toml_value(v: Any) -> str:
    """A Python value as a TOML literal (inline tables for dicts), for ``--set`` overrides."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(float(v)) if isinstance(v, float) else str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no TOML literal for {v!r}")


def world_config(seed: int, requests: int) -> WorldConfig:
    """The bench's world for a seed: the default world's shape, ``requests`` requests."""
    return WorldConfig(
        seed=seed,
        n_users=max(requests // 3, 500),
        n_videos=max(requests // 5, 500),
        n_requests=requests,
    )


def make_config(
    world: Path, run_dir: Path, weighting: dict[str, Any], a: argparse.Namespace, seed: int
) -> Config:
    """``configs/default.toml`` on ``world`` with ``weighting``; everything else as shipped."""
    return load_config(
        DEFAULT_CONFIG,
        [
            f'data.log="{world / "log"}"',
            f'data.users="{world / "users.parquet"}"',
            f'data.videos="{world / "videos.parquet"}"',
            f"weighting={toml_value(weighting)}",
            f"training.seed={seed}",
            f"training.epochs={a.epochs}",
            f"training.threads={a.threads}",
            *([f"training.max_steps_per_epoch={a.max_steps}"] if a.max_steps else []),
            f'training.run_dir="{run_dir}"',
        ],
    )


# --- (a) cost ------------------------------------------------------------------------------


def train_step(
    config: Config,
    model: RankingModel,
    weighting: Weighting,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
) -> None:
    """One step exactly as ``training.loop.train`` takes it (no position tower)."""
    out = model.forward_detailed(batch.cat, batch.num)
    losses = {
        t.name: head_loss(
            t, out.raw[t.name], batch.labels[t.name], batch.masks[t.name], batch.weights.get(t.name)
        )
        for t in config.tasks
    }
    optimizer.zero_grad(set_to_none=True)
    weighting.backward(losses, SharedPart(model.shared_parameters(), out.representation))
    optimizer.step()


@dataclass
class _Timed:
    """One strategy's model, weighting and optimizer, kept across timing rounds."""

    case: Case
    config: Config
    model: RankingModel
    weighting: Weighting
    optimizer: torch.optim.Optimizer

    def step(self, batch: Batch) -> float:
        """Seconds one training step takes."""
        t0 = time.perf_counter()
        train_step(self.config, self.model, self.weighting, self.optimizer, batch)
        return time.perf_counter() - t0


def _timed(world: Path, tmp: Path, case: Case, a: argparse.Namespace, fitted: Any) -> _Timed:
    """A fresh model (seed 0), the case's strategy and the trainer's optimizer setup."""
    cfg = make_config(world, tmp / "timing", case.weighting, a, 0)
    torch.manual_seed(0)
    model = build_model(cfg, fitted.encoder)
    weighting = build_weighting(cfg.weighting, cfg.task_names)
    groups: list[dict[str, Any]] = [{"params": list(model.parameters())}]
    if any(True for _ in weighting.parameters()):
        groups.append({"params": list(weighting.parameters()), "weight_decay": 0.0})
    return _Timed(case, cfg, model, weighting, torch.optim.Adam(groups, lr=cfg.training.lr))


def measure_cost(
    world: Path, tmp: Path, all_cases: list[Case], a: argparse.Namespace, res: Results
) -> None:
    """Fills ``res.timing`` (per-round ratios to equal) and ``res.equal_ms``.

    A separate equal-weighting model is the reference: every step of a strategy is taken right
    after one reference step on the same batch, and a round's ratio is the strategy's summed
    step time over the reference's summed time in that round, so load changes on the machine
    (other jobs) hit both alike. ``equal`` is also timed as a strategy against the reference:
    its ratio is the noise floor. Rounds start at a rotating strategy.
    """
    base = make_config(world, tmp / "timing", {"name": "equal"}, a, 0)
    log = ImpressionLog(base)
    fitted = fit_encoder(base, log, progress=False)
    builder = BatchBuilder(base, fitted.encoder, fitted.users, fitted.videos)
    bs = base.training.batch_size
    batches: list[Batch] = []
    for f, rb in log.record_batches("train", batch_size=bs):
        if rb.num_rows == bs:
            batches.append(builder.build(rb, f))
        if len(batches) == a.timing_steps:
            break
    if len(batches) < a.timing_steps:
        raise SystemExit(f"the world has fewer than {a.timing_steps} full training batches")
    reference = _timed(world, tmp, Case("reference", "equal", {"name": "equal"}), a, fitted)
    runs = [_timed(world, tmp, c, a, fitted) for c in all_cases]
    for run in [reference, *runs]:  # warm-up: allocator, first-step state (GradNorm's L(0))
        for b in batches[:2]:
            run.step(b)
    res.timing = {c.label: [] for c in all_cases}
    for r in range(a.timing_rounds):
        shift = r % len(runs)
        ref_total = 0.0
        for run in runs[shift:] + runs[:shift]:
            ref, own = 0.0, 0.0
            for b in batches:
                ref += reference.step(b)
                own += run.step(b)
            res.timing[run.case.label].append(own / ref)
            ref_total += ref
        res.equal_ms.append(1000 * ref_total / (len(runs) * len(batches)))
        slowest = max(res.timing, key=lambda k: res.timing[k][-1])
        print(
            f"timing round {r + 1}/{a.timing_rounds}: equal {res.equal_ms[-1]:.1f} ms/step, "
            f"slowest {slowest} x{res.timing[slowest][-1]:.2f}",
            flush=True,
        )


# --- (b) quality ---------------------------------------------------------------------------


def evaluate_run(config: Config, result: Any, seed: int) -> dict[str, float]:
    """The validation metrics of one trained model (see the module docstring)."""
    log = ImpressionLog(config)
    extra = list(truth_columns(config, log.dataset.schema.names).values())
    builder = BatchBuilder(config, result.encoder, result.users, result.videos, extra, serving=True)
    preds = predict_split(result.model, builder, log, "validation")
    formula = RankingFormula(load_ranking_config(RANKING_CONFIG), config.task_names)
    truth = truth_metrics(config, preds, formula, k=10, seed=seed)
    m = result.metrics
    return {
        "click_auc": m["click"]["auc"],
        "like_auc": m["like"]["auc"],
        "watch_xauc": m["watch_time"]["xauc"],
        "watch_rmse": m["watch_time"]["rmse"],
        "rating_rmse": m["rating"]["rmse"],
        "ndcg10": truth["ranking_score"]["ndcg@10"],
        "train_seconds": result.seconds,
        "steps": max(r["step"] for r in weight_records(config.training.run_dir)),
    }


def static_from_equal(run_dir: Path, tasks: list[str]) -> dict[str, float]:
    """``1 / L_t`` of equal weighting's epoch-1 mean training loss, scaled to sum to ``T``."""
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("epoch") == 1 and "train_loss" in rec:
            inv = {t: 1.0 / max(float(rec["train_loss"][t]), 1e-12) for t in tasks}
            total = sum(inv.values())
            return {t: round(len(tasks) * v / total, 4) for t, v in inv.items()}
    raise RuntimeError(f"no epoch-1 record in {run_dir / 'train_log.jsonl'}")


def weight_records(run_dir: Path) -> list[dict[str, Any]]:
    """The ``(step, weights)`` records of a run's ``train_log.jsonl``."""
    out = []
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "weights" in rec:
            out.append({"step": rec["step"], "weights": rec["weights"]})
    return out


def measure_quality(tmp: Path, a: argparse.Namespace, res: Results) -> None:
    """Fills ``res.quality``, ``res.weights`` and ``res.static_weights``."""
    for seed in range(a.seeds):
        world = tmp / f"world{seed}"
        generate(world_config(seed, a.requests), world, progress=False)
        todo = cases(res.static_weights, a.quality_modes == "both", a.strategies)
        for c in todo:
            if c.name == "static":  # weights from seed 0's equal run, the same for every seed
                c = Case(c.label, c.name, c.weighting | {"weights": res.static_weights})
            run_dir = tmp / f"run_{seed}_{c.label.replace(' ', '_')}"
            cfg = make_config(world, run_dir, c.weighting, a, seed)
            result = train(cfg, progress=False, export=False)
            m = evaluate_run(cfg, result, seed)
            res.quality.setdefault(c.label, []).append(m)
            if seed == 0 and c.name == "equal":
                res.static_weights = static_from_equal(run_dir, cfg.task_names)
            if seed == 0 and c.default_mode and c.name in PLOTTED:
                res.weights[c.name] = weight_records(run_dir)
            shown = " ".join(f"{k} {v:.4f}" for k, v in m.items() if k in QUALITY_KEYS)
            print(f"seed {seed} {c.label:<18} {m['train_seconds']:6.1f}s  {shown}", flush=True)


# --- report --------------------------------------------------------------------------------


def mean_std(xs: list[float], digits: int = 4) -> str:
    """``mean ± std`` over seeds (just the value for one seed)."""
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def verdict(quality: dict[str, list[dict[str, float]]], key: str, higher: bool) -> str:
    """The winner of a metric where the seeds agree, else the tie (see the module docstring)."""
    labels = list(quality)
    if not labels:
        return "no runs"
    sign = 1.0 if higher else -1.0
    means = {c: statistics.mean(r[key] for r in quality[c]) for c in labels}
    best = max(labels, key=lambda c: sign * means[c])
    n_seeds = len(quality[best])
    not_beaten = []
    for c in labels:
        if c == best:
            continue
        diffs = [sign * (x[key] - y[key]) for x, y in zip(quality[best], quality[c], strict=True)]
        spread = statistics.stdev(diffs) if n_seeds > 1 else math.inf
        if not (min(diffs) > 0 and statistics.mean(diffs) > spread):
            not_beaten.append(c)
    if not not_beaten:
        return f"**{best}** (better than every other strategy on each of {n_seeds} seeds)"
    tied = ", ".join([best, *sorted(not_beaten, key=lambda c: -sign * means[c])])
    return f"tie: {tied} (best mean: {best})"


def against_equal(quality: dict[str, list[dict[str, float]]], key: str, higher: bool) -> str:
    """Strategies better / worse than equal weighting on every seed by more than the spread,
    largest mean paired difference first, each with that difference (signed: > 0 is better)."""
    if "equal" not in quality:
        return ""
    sign = 1.0 if higher else -1.0
    found: list[tuple[float, str]] = []
    for c, runs in quality.items():
        if c == "equal":
            continue
        diffs = [sign * (x[key] - y[key]) for x, y in zip(runs, quality["equal"], strict=True)]
        spread = statistics.stdev(diffs) if len(diffs) > 1 else math.inf
        mean = statistics.mean(diffs)
        if (min(diffs) > 0 or max(diffs) < 0) and abs(mean) > spread:
            found.append((mean, c))
    found.sort(reverse=True)
    better = [f"{c} ({m:+.4f})" for m, c in found if m > 0]
    worse = [f"{c} ({m:+.4f})" for m, c in found if m < 0]
    return f"better than equal: {', '.join(better) or 'none'}; worse: {', '.join(worse) or 'none'}"


def results_table(res: Results) -> str:
    """One markdown row per strategy and mode: cost ratio, then each metric as mean ± std."""
    head = ["strategy", "family", "step time / equal"] + [t for _, t, _ in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    labels = list(dict.fromkeys([*res.timing, *res.quality]))
    for label in labels:
        name = label.split(" ")[0]
        ratios = res.timing.get(label)
        cost = (
            f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
            if ratios
            else ""
        )
        cells = [label, family(name), cost]
        runs = res.quality.get(label)
        for key, _, _ in METRICS:
            cells.append(mean_std([r[key] for r in runs]) if runs else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict_lines(res: Results) -> str:
    """One line per metric: the winner or the tie, and who beats equal weighting."""
    out = []
    for key, title, higher in METRICS:
        out.append(
            f"- {title} ({'higher' if higher else 'lower'} is better): "
            f"{verdict(res.quality, key, higher)}; {against_equal(res.quality, key, higher)}"
        )
    return "\n".join(out)


def reference_table() -> str:
    """Every registered strategy: paper, family, config parameters with their defaults and
    bounds, read from the config classes."""
    lines = ["| `name` | paper | family | parameters (default; bounds) |", "|---|---|---|---|"]
    for name in ["equal", *sorted(n for n in registry() if n != "equal")]:
        params = []
        for key, f in registry()[name].config_class.model_fields.items():
            if key == "name":
                continue
            bounds = []
            for m in f.metadata:
                for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
                    v = getattr(m, attr, None)
                    if v is not None:
                        bounds.append(f"{sym} {_number(v)}")
            default = "required" if f.is_required() else f"`{f.default!r}`".replace("|", "\\|")
            params.append(f"`{key}` = {default}" + (f" ({', '.join(bounds)})" if bounds else ""))
        lines.append(
            f"| `{name}` | {PAPERS.get(name, '?')} | {family(name)} | {'; '.join(params) or '-'} |"
        )
    return "\n".join(lines)


def _number(v: float) -> str:
    """A bound as people write it: ``0.4``, ``1e-12``, ``2^63``."""
    if isinstance(v, int) and v > 2**20 and (v & (v - 1)) == 0:
        return f"2^{v.bit_length() - 1}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def plot_weights(res: Results, png: Path) -> None:
    """Each plotted strategy's per-task share of the weight, ``w_t / sum_s w_s``, over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in PLOTTED if n in res.weights]
    if not names:
        return
    cols = 3
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), sharey=True, squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        recs = res.weights[name]
        steps = [r["step"] for r in recs]
        tasks = list(recs[0]["weights"])
        for t in tasks:
            share = []
            for r in recs:
                total = sum(abs(v) for v in r["weights"].values()) or 1.0
                share.append(r["weights"][t] / total)
            ax.plot(steps, share, label=t, lw=1.2)
        ax.set_title(name)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    axes[0][0].set_ylabel("w_t / sum of |w|")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Task weights over training (seed 0, default mode)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def paired_table(res: Results) -> str:
    """Each strategy's per-seed difference to equal weighting (same world, same training seed),
    mean ± std over seeds, signed so that > 0 is better."""
    if "equal" not in res.quality:
        return ""
    head = ["strategy"] + [t for _, t, _ in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for label, runs in res.quality.items():
        if label == "equal":
            continue
        cells = [label]
        for key, _, higher in METRICS:
            sign = 1.0 if higher else -1.0
            diffs = [
                sign * (x[key] - y[key]) for x, y in zip(runs, res.quality["equal"], strict=True)
            ]
            digits = 4
            spread = f" ± {statistics.stdev(diffs):.{digits}f}" if len(diffs) > 1 else ""
            cells.append(f"{statistics.mean(diffs):+.{digits}f}{spread}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(res: Results, out: Path) -> str:
    """Writes ``out/weighting.md`` and the plot; returns the results part of the markdown."""
    a = res.args
    eq = statistics.median(res.equal_ms) if res.equal_ms else float("nan")
    static = ", ".join(f"{k} {v:g}" for k, v in res.static_weights.items())
    steps = {int(r.get("steps", 0)) for runs in res.quality.values() for r in runs}
    results = (
        f"- Machine: {res.machine}; shared with other jobs while it ran.\n"
        f"- Date: {res.date}; the run took {res.seconds / 60:.1f} min.\n"
        f"- Command: `{res.command}`\n"
        f"- World: {a['requests']} requests x 20 rows per seed, seeds 0..{a['seeds'] - 1} "
        f"(the training seed is the world seed; every strategy sees the same world and the same "
        f"initial model per seed); the default MMoE and training settings of "
        f"`configs/default.toml` (batch 2048, Adam lr 1e-3), {a['epochs']} epochs = "
        f"{'/'.join(str(x) for x in sorted(steps)) or '?'} steps per run, torch threads: "
        f"{a['threads']}.\n"
        f"- Quality: validation days, mean ± std over seeds; gradient strategies in their "
        f"default mode{' and in both modes' if a['quality_modes'] == 'both' else ''}. `static` "
        f"uses {static} (inverse of equal's epoch-1 mean losses, seed 0).\n"
        f"- Cost: per-step time divided by that of an equal-weighting reference model stepped "
        f"alternately with it on the same in-memory batches (default model, batch 2048), "
        f"{a['timing_steps']} steps per round, median (min-max) over {a['timing_rounds']} "
        f"rounds; the reference took {eq:.0f} ms/step (median). The `equal` row is a second "
        f"equal-weighting model against the reference: its distance from 1.00 is the noise. "
        f"`(rep)` / `(par)`: task gradients w.r.t. the shared representation / every shared "
        f"parameter.\n\n"
        f"{results_table(res)}\n\n"
        f"Paired difference to equal weighting (per seed, same world; > 0 is better, RMSE "
        f"differences are signed so too), mean ± std over seeds:\n\n"
        f"{paired_table(res)}\n\n"
        f"Verdicts (a winner only where it beats every other strategy on every seed by more "
        f"than the spread of the paired differences; otherwise a tie):\n\n"
        f"{verdict_lines(res)}\n\n"
        f"![task weights over training](img/weighting_weights.png)\n\n"
        f"Each task's share of the weight, `w_t / sum_s |w_s|`, as `train_log.jsonl` logs it "
        f"(first step of each epoch and every 10 steps), seed 0, default mode.\n"
    )
    doc = (
        "# Task weighting\n\n"
        "`[weighting] name = ...` in the training config picks how the per-task losses become "
        "one update (`ranker/weighting/`, one module per strategy, each citing its paper and "
        "tested against the property that defines it). *Loss* strategies back-propagate a "
        "weighted sum of the losses once; *gradient* strategies take each task's gradient on "
        'the shared part (`mode = "representation"`: w.r.t. the experts\' outputs, one small '
        'backward per task; `mode = "parameters"`: w.r.t. every shared parameter) and choose '
        "the shared update themselves. Unknown names and out-of-range parameters stop the "
        "config with the key's path. The table is generated from the config classes by "
        "`bench/weighting.py`.\n\n"
        f"{reference_table()}\n\n"
        "## Benchmark\n\n"
        f"{results}"
    )
    out.mkdir(parents=True, exist_ok=True)
    md = out / "weighting.md"
    notes = md.read_text().partition(NOTES_MARKER)[2] if md.exists() else ""
    md.write_text(f"{doc}\n{NOTES_MARKER}{notes or chr(10)}")
    plot_weights(res, out / "img" / "weighting_weights.png")
    return f"{results_table(res)}\n\n{paired_table(res)}\n\n{verdict_lines(res)}"


def machine() -> str:
    """A one-line description of the machine (CPU model, cores, torch)."""
    cpu = cpu_model()
    import os

    py = platform.python_version()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {py}"


def main() -> None:
    """Parses the flags, runs (a) and (b), prints and writes the report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=4000, help="requests per world (x20 rows)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3, help="3: DWA reweights from epoch 3 on")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)"
    )
    ap.add_argument("--max-steps", type=int, default=None, help="cap on steps per epoch")
    ap.add_argument("--timing-rounds", type=int, default=3)
    ap.add_argument("--timing-steps", type=int, default=3, help="steps per strategy per round")
    ap.add_argument(
        "--quality-modes",
        choices=["default", "both"],
        default="default",
        help="train gradient strategies in their default mode only, or in both",
    )
    ap.add_argument(
        "--strategies",
        type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
        default=None,
        help="comma-separated names to run (with equal, the reference); default: all",
    )
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs"), help="where weighting.md and img/ go")
    ap.add_argument("--raw", default=None, help="also write the raw results to this JSON file")
    ap.add_argument("--render", default=None, help="only re-render from this raw JSON file")
    ap.add_argument(
        "--cost-only",
        action="store_true",
        help="only (a); rewrite only the cost block of weighting.md (see bench/weighting_cost.py)",
    )
    ap.add_argument(
        "--baseline", default=None, help="with --cost-only: also time this checkout's code"
    )
    ap.add_argument("--cost-json", default=None, help=argparse.SUPPRESS)  # the baseline's child
    a = ap.parse_args()
    unknown = sorted(set(a.strategies or []) - set(registry()))
    if unknown:
        ap.error(f"--strategies: unknown {unknown}; registered: {sorted(registry())}")
    if a.cost_only:
        a.skip_quality, a.skip_timing = True, False
    out = Path(a.out)
    if a.render:
        res = Results(**json.loads(Path(a.render).read_text()))
        print(render(res, out))
        return
    torch.set_num_threads(a.threads)
    command = " ".join([".venv/bin/python bench/weighting.py", *sys.argv[1:]])
    res = Results(
        args=vars(a),
        command=command,
        machine=machine(),
        date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )
    started = time.perf_counter()
    baseline = None
    if a.baseline and not a.cost_json:
        timing_flags = ["--requests", str(a.requests), "--threads", str(a.threads)]
        timing_flags += ["--timing-rounds", str(a.timing_rounds)]
        timing_flags += ["--timing-steps", str(a.timing_steps)]
        if a.strategies:
            timing_flags += ["--strategies", ",".join(a.strategies)]
        baseline = time_baseline(Path(a.baseline), ["--cost-only", *timing_flags])
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        if not a.skip_quality:
            measure_quality(tmp, a, res)
        if not a.skip_timing:
            world = tmp / "world0"
            if not world.exists():
                generate(world_config(0, a.requests), world, progress=False)
            all_cases = cases(
                res.static_weights or {t: 1.0 for t in _task_names()}, only=a.strategies
            )
            measure_cost(world, tmp, all_cases, a, res)
    res.seconds = time.perf_counter() - started
    if a.cost_json:
        Path(a.cost_json).write_text(json.dumps({"timing": res.timing, "equal_ms": res.equal_ms}))
        return
    if not a.skip_timing:
        block = cost_report(
            res.timing,
            baseline,
            a.baseline,
            res.machine,
            res.date,
            command,
            res.equal_ms,
            a.timing_rounds,
            a.timing_steps,
        )
        print(f"\nStep time / equal weighting\n\n{block}")
    if a.cost_only:
        write_cost_block(out / "weighting.md", block)
        print(f"written: the cost block of {out / 'weighting.md'}")
        print(f"rerun: {command}")
        return
    if a.raw:
        Path(a.raw).write_text(json.dumps(vars(res), indent=1))
    print("\n" + render(res, out))
    print(f"\nwritten: {out / 'weighting.md'}, {out / 'img' / 'weighting_weights.png'}")
    print(f"rerun: {command}")
    print(f"took {res.seconds / 60:.1f} min")


def _task_names() -> list[str]:
    """The tasks of ``configs/default.toml``."""
    return load_config(DEFAULT_CONFIG).task_names


if __name__ == "__main__":
    main()
