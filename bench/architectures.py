"""Shared-bottom vs MMoE vs PLE (CGC) vs cross-stitch, softmax vs DSelect-k gates, on the
synthetic video world: per-head validation metrics and the cost per candidate.

One world (``training.synth.generate``, objectives that conflict: clickbait, long videos, niche
videos) is generated into a temporary directory and each architecture is trained on it with
``training.loop.train`` and config overrides, for several training seeds. Sizes are matched:
MMoE has ``E`` experts of ``[H1, H2]``; the shared-bottom's and PLE's first layer is widened or
narrowed until their non-embedding parameter count is within a few percent of MMoE's (printed);
so is cross-stitch's (one column per task) and MMoE's with DSelect-k gates (bigger gates). The
cost column is ``RankingModel.flops_per_row`` in MFLOP per candidate, plain and with the
service's user-side split (the user's and context's share of the first layers once per request).

    .venv/bin/python bench/architectures.py                  # 3 seeds, ~5 min
    .venv/bin/python bench/architectures.py --seeds 1 --requests 3000   # a quick look
    .venv/bin/python bench/architectures.py --only cross_stitch mmoe+dselect

Prints the markdown tables for ``docs/architectures.md`` (mean ± std over seeds, gate
utilisation of one seed) and writes the raw numbers to ``bench/results/architectures.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_model  # noqa: E402

from ranker.config import SOURCES, Config, ModelConfig, load_config  # noqa: E402
from ranker.model import RankingModel  # noqa: E402
from ranker.predictor import request_split  # noqa: E402
from ranker.scoring import RankingFormula, load_ranking_config  # noqa: E402
from training.data import BatchBuilder, ImpressionLog  # noqa: E402
from training.evaluate import predict_split  # noqa: E402
from training.loop import TrainResult, train  # noqa: E402
from training.synth import WorldConfig, generate  # noqa: E402
from training.truth import truth_columns, truth_metrics  # noqa: E402

CANDIDATES: dict[str, dict[str, Any]] = {
    "shared_bottom": {"architecture": "shared_bottom"},
    "mmoe": {"architecture": "mmoe"},
    "ple": {"architecture": "ple"},
    "cross_stitch": {"architecture": "cross_stitch"},
    "mmoe+dselect": {"architecture": "mmoe", "gate": "dselect_k"},
}
"""Model settings of each candidate over the base config (``ModelConfig``'s shipped defaults for
everything not set: DSelect-k ``k = 2``, ``gamma = 1``, entropy weight 1e-3; cross-stitch
units start at 0.9 on the diagonal)."""
ARCHS = tuple(CANDIDATES)
METRICS = {"binary": ("auc", "gauc", "logloss"), "regression": ("rmse", "xauc")}
TRUTH = {"binary": ("auc_true_sampled", "spearman"), "regression": ("spearman",)}


def head_params(model: RankingModel) -> int:
    """Parameters outside the embedding table (which is the same for every architecture)."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("embed."))


def sized(name: str, base: ModelConfig, n_tasks: int, d_in: int) -> tuple[ModelConfig, int]:
    """``base`` with candidate ``name``'s settings (:data:`CANDIDATES`) and the first expert
    layer resized so that the non-embedding parameters match MMoE's ``base`` (same second
    layer, towers and gates)."""
    tasks = [f"t{i}" for i in range(n_tasks)]
    update = CANDIDATES[name]

    def count(cfg: ModelConfig) -> int:
        return head_params(RankingModel([], d_in, tasks, cfg))

    target = count(base.model_copy(update={"architecture": "mmoe", "gate": "softmax"}))
    if name == "mmoe":
        return base, target
    best: tuple[int, ModelConfig] | None = None
    for h1 in range(8, 8 * base.expert_hidden[0] + 1, 4):
        cfg = base.model_copy(update=update | {"expert_hidden": [h1, *base.expert_hidden[1:]]})
        gap = abs(count(cfg) - target)
        if best is None or gap < best[0]:
            best = (gap, cfg)
    assert best is not None
    return best[1], count(best[1])


def overrides(world: Path, run_dir: Path, seed: int, epochs: int, model: ModelConfig) -> list[str]:
    return [
        f'data.log="{world / "log"}"',
        f'data.users="{world / "users.parquet"}"',
        f'data.videos="{world / "videos.parquet"}"',
        f'model.architecture="{model.architecture}"',
        f"model.embedding_dim={model.embedding_dim}",
        f"model.num_experts={model.num_experts}",
        f"model.expert_hidden={model.expert_hidden}",
        f"model.tower_hidden={model.tower_hidden}",
        f"model.task_experts={model.task_experts}",
        f"model.shared_experts={model.shared_experts}",
        f'model.gate="{model.gate}"',
        f"training.seed={seed}",
        f"training.epochs={epochs}",
        "training.batch_size=1024",
        "training.lr=0.002",
        "training.threads=1",
        f'training.run_dir="{run_dir}"',
    ]


def against_truth(cfg: Config, r: TrainResult, seed: int) -> dict[str, dict[str, float]]:
    """The validation split against the world's truth (``training/truth.py``): AUC on clicks and
    likes re-sampled from the true probabilities, rank correlation of every head with its true
    expectation, and NDCG@10 of the serving score (``configs/ranking.toml``) vs true utility."""
    log = ImpressionLog(cfg)
    extra = [*truth_columns(cfg, log.dataset.schema.names).values(), "position"]
    builder = BatchBuilder(cfg, r.encoder, r.users, r.videos, extra, serving=True)
    preds = predict_split(r.model, builder, log, "validation")
    formula = RankingFormula(load_ranking_config(ROOT / "configs/ranking.toml"), cfg.task_names)
    return truth_metrics(cfg, preds, formula, k=10, seed=seed)


def cost(r: TrainResult) -> dict[str, float]:
    """MFLOP per candidate: every row computed in full, and as the service computes it (the
    user's and context's first-layer share once per request, not counted)."""
    split = request_split(r.model, r.encoder)
    return {
        "mflop": r.model.flops_per_row() / 1e6,
        "mflop_served": r.model.flops_per_row(split) / 1e6,
    }


def sparsity(cfg: Config, r: TrainResult, rows: int = 4096) -> float | None:
    """Mean number of experts with non-zero weight per gate per row on the first ``rows``
    validation rows (DSelect-k: at most ``k`` once its selectors are binary); ``None`` without
    gates."""
    log = ImpressionLog(cfg)
    builder = BatchBuilder(cfg, r.encoder, r.users, r.videos)
    for file, rb in log.record_batches("validation", batch_size=rows):
        enc, _, _ = builder.features(rb, file)
        model = r.model.eval()
        with torch.no_grad():
            out = model.forward_detailed(torch.from_numpy(enc.cat), torch.from_numpy(enc.num))
        return None if out.gates is None else float((out.gates > 0).sum(-1).float().mean())
    return None


def stitch_units(r: TrainResult) -> list[list[list[float]]] | None:
    """The learned cross-stitch units (one T x T matrix per layer), ``None`` for other models."""
    if r.model.columns is None:
        return None
    return [[[round(v, 3) for v in row] for row in a.tolist()] for a in r.model.columns.units]


def units_table(tasks: list[str], unit: list[list[float]]) -> str:
    lines = ["| task reads | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for t, row in zip(tasks, unit, strict=True):
        lines.append(f"| {t} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    return "\n".join(lines)


def table(cfg: Config, runs: list[dict[str, Any]], truth: bool = False) -> str:
    if truth:
        cols = [(t.name, m) for t in cfg.tasks for m in TRUTH[t.kind]]
        cols.append(("ranking_score", "ndcg@10"))
    else:
        cols = [(t.name, m) for t in cfg.tasks for m in METRICS[t.kind]]
    key = "truth" if truth else "metrics"
    head = "| model | params (non-emb.) | MFLOP/cand. (served) | "
    head += " | ".join(f"{t} {m}" for t, m in cols) + " |"
    lines = [head, "|---|---:|---:|" + "---:|" * len(cols)]
    for arch in dict.fromkeys(r["arch"] for r in runs):
        rs = [r for r in runs if r["arch"] == arch]
        cells = [f"{rs[0]['cost']['mflop']:.3f} ({rs[0]['cost']['mflop_served']:.3f})"]
        for t, m in cols:
            v = [r[key][t][m] for r in rs]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.mean(v):.4f} ± {sd:.4f}")
        lines.append(f"| {arch} | {rs[0]['params']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gate_table(util: dict[str, dict[str, float]]) -> str:
    experts = list(next(iter(util.values())))
    lines = ["| gate | " + " | ".join(experts) + " |", "|---|" + "---:|" * len(experts)]
    for task, row in util.items():
        lines.append(f"| {task} | " + " | ".join(f"{row[e]:.2f}" for e in experts) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=8000, help="world size: requests of 20")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--hidden", type=int, nargs=2, default=[64, 32])
    ap.add_argument("--only", nargs="+", choices=ARCHS, default=list(ARCHS), help="candidates")
    ap.add_argument("--json", type=Path, default=ROOT / "bench/results/architectures.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    base = ModelConfig(
        architecture="mmoe",
        embedding_dim=8,
        num_experts=args.experts,
        expert_hidden=list(args.hidden),
        tower_hidden=[16],
        task_experts=1,
        shared_experts=2,
    )
    runs: list[dict[str, Any]] = []
    gates: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        world = WorldConfig(
            n_users=4000, n_videos=3000, n_channels=300, n_requests=args.requests, days=14.0
        )
        generate(world, tmp / "world", progress=False)
        probe = load_config(
            ROOT / "configs/default.toml", overrides(tmp / "world", tmp / "run", 0, 1, base)
        )
        inputs = [f for f in probe.effective_features if f.source in SOURCES]
        d_in = sum(
            base.embedding_dim if f.kind == "categorical" else 1 for f in inputs
        )  # the embedding layer's output width, the same for every architecture
        models: dict[str, tuple[ModelConfig, int]] = {}
        for arch in args.only:
            models[arch] = sized(arch, base, len(probe.tasks), d_in)
            print(f"{arch}: {models[arch][0].expert_hidden}, {models[arch][1]:,} parameters")
        for seed in range(args.seeds):
            for arch in args.only:
                model, _ = models[arch]
                cfg = load_config(
                    ROOT / "configs/default.toml",
                    overrides(tmp / "world", tmp / "run", seed, args.epochs, model),
                )
                t0 = time.perf_counter()
                r = train(cfg, progress=False, export=False)
                runs.append(
                    {
                        "arch": arch,
                        "seed": seed,
                        "metrics": r.metrics,
                        "truth": against_truth(cfg, r, seed),
                        "params": head_params(r.model),
                        "flops_per_row": r.model.flops_per_row(),
                        "cost": cost(r),
                        "experts_per_gate": sparsity(cfg, r),
                        "stitch_units": stitch_units(r),
                        "expert_hidden": model.expert_hidden,
                        "gates": r.gate_utilisation,
                        "seconds": time.perf_counter() - t0,
                    }
                )
                if seed == 0 and r.gate_utilisation is not None:
                    gates[arch] = r.gate_utilisation
                summary = ", ".join(
                    f"{t.name} "
                    + (
                        f"auc {r.metrics[t.name]['auc']:.4f}"
                        if t.kind == "binary"
                        else f"rmse {r.metrics[t.name]['rmse']:.3f}"
                    )
                    for t in cfg.tasks
                )
                ndcg = runs[-1]["truth"]["ranking_score"]["ndcg@10"]
                used = runs[-1]["experts_per_gate"]
                print(
                    f"seed {seed} {arch}: {summary}, truth ndcg@10 {ndcg:.4f}"
                    + (f", experts per gate {used:.2f}" if used is not None else "")
                    + f" ({runs[-1]['seconds']:.0f} s)",
                    flush=True,
                )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}, indent=1)
    )
    print(f"\n{args.seeds} seeds, {time.perf_counter() - started:.0f} s on {cpu_model()}\n")
    print(f"position handling: {cfg.position.mode}\n\nlogged labels:\n")
    print(table(cfg, runs))
    print("\nagainst the truth:\n")
    print(table(cfg, runs, truth=True))
    for arch, util in gates.items():
        print(f"\ngate utilisation, {arch} (seed 0, validation):\n\n{gate_table(util)}")
    for r in runs:
        if r["seed"] == 0 and r["stitch_units"] is not None:
            print("\nlast cross-stitch unit, seed 0 (rows sum to 1 at the start, 0.9 diagonal):")
            print("\n" + units_table(cfg.task_names, r["stitch_units"][-1]))
    for arch in args.only:
        used = [r["experts_per_gate"] for r in runs if r["arch"] == arch]
        if used and used[0] is not None:
            print(f"\n{arch}: experts with non-zero weight per gate and row {used}")
    print(f"\nraw: {args.json}")


if __name__ == "__main__":
    main()
