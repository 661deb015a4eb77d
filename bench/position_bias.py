"""Position bias: no handling vs position as a feature vs the shallow tower, against the truth.

For each seed a synthetic world is generated (same world for the three modes), a model trained
per mode, and its served predictions on the validation days compared with (a) logged clicks,
(b) the true position-free click probability, (c) the true utility of each request's candidates
(NDCG@10 of the ranking score). Then the world's examination decay (``position_bias``) is swept
from none to strong and the three modes' truth NDCG@10 plotted.

    .venv/bin/python bench/position_bias.py                 # full run (several minutes)
    .venv/bin/python bench/position_bias.py --requests 4000 --seeds 1 --sweep 0 1   # quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ranker.config import load_config  # noqa: E402
from ranker.scoring import RankingFormula, load_ranking_config  # noqa: E402
from training.data import BatchBuilder, ImpressionLog  # noqa: E402
from training.evaluate import head_metrics, predict_split  # noqa: E402
from training.loop import train  # noqa: E402
from training.synth import WorldConfig, generate  # noqa: E402
from training.truth import truth_columns, truth_metrics  # noqa: E402

MODES = ("none", "feature", "shallow_tower")


def run_one(world: Path, mode: str, seed: int, tmp: Path, epochs: int) -> dict[str, float]:
    cfg = load_config(
        ROOT / "configs/default.toml",
        [
            f'data.log="{world / "log"}"',
            f'data.users="{world / "users.parquet"}"',
            f'data.videos="{world / "videos.parquet"}"',
            f'position.mode="{mode}"',
            f"training.seed={seed}",
            f"training.epochs={epochs}",
            f'training.run_dir="{tmp / "run"}"',
        ],
    )
    r = train(cfg, progress=False, export=False)
    log = ImpressionLog(cfg)
    extra = [*truth_columns(cfg, log.dataset.schema.names).values(), "position"]
    builder = BatchBuilder(cfg, r.encoder, r.users, r.videos, extra, serving=True)
    preds = predict_split(r.model, builder, log, "validation")
    formula = RankingFormula(load_ranking_config(ROOT / "configs/ranking.toml"), cfg.task_names)
    logged = head_metrics(cfg, preds)
    truth = truth_metrics(cfg, preds, formula, k=10, seed=seed)
    return {
        "logged_click_auc": logged["click"]["auc"],
        "true_click_auc": truth["click"]["auc_true_sampled"],
        "true_click_pearson": truth["click"]["pearson"],
        "truth_ndcg@10": truth["ranking_score"]["ndcg@10"],
        "logged_policy_ndcg@10": truth["ranking_score"]["logged_policy_ndcg@10"],
    }


def world_for(seed: int, requests: int, position_bias: float, out: Path) -> Path:
    generate(
        WorldConfig(
            seed=seed,
            n_users=max(requests // 3, 500),
            n_videos=max(requests // 5, 500),
            n_requests=requests,
            position_bias=position_bias,
        ),
        out,
        progress=False,
    )
    return out


def mean_std(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=12000, help="requests per world (x20 rows)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--sweep", type=float, nargs="*", default=[0.0, 0.5, 1.0, 2.0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    started = time.perf_counter()
    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for seed in range(a.seeds):
            world = world_for(seed, a.requests, 1.0, tmp / f"world{seed}")
            for mode in MODES:
                r = run_one(world, mode, seed, tmp / f"{mode}{seed}", a.epochs)
                results[mode].append(r)
                print(f"seed {seed} {mode:<14} {json.dumps({k: round(v, 4) for k, v in r.items()})}")
        sweep: dict[str, list[float]] = {m: [] for m in MODES}
        for strength in a.sweep:
            world = world_for(100, a.requests, strength, tmp / f"sweep{strength}")
            for mode in MODES:
                r = run_one(world, mode, 0, tmp / f"s{mode}{strength}", a.epochs)
                sweep[mode].append(r["truth_ndcg@10"])
                print(f"bias {strength} {mode:<14} truth ndcg@10 {r['truth_ndcg@10']:.4f}")

    keys = list(next(iter(results.values()))[0])
    lines = [
        f"| mode | {' | '.join(keys)} |",
        "|---|" + "---|" * len(keys),
    ]
    for mode in MODES:
        cells = [mean_std([r[k] for r in results[mode]]) for k in keys]
        lines.append(f"| {mode} | {' | '.join(cells)} |")
    table = "\n".join(lines)
    sweep_lines = ["| position_bias | " + " | ".join(MODES) + " |", "|---|" + "---|" * len(MODES)]
    for i, strength in enumerate(a.sweep):
        sweep_lines.append(
            f"| {strength} | " + " | ".join(f"{sweep[m][i]:.4f}" for m in MODES) + " |"
        )
    sweep_table = "\n".join(sweep_lines)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in MODES:
        ax.plot(a.sweep, sweep[mode], marker="o", label=mode)
    ax.set_xlabel("examination decay (world position_bias): 0 = no bias")
    ax.set_ylabel("NDCG@10 vs true utility (validation)")
    ax.set_title("Position handling as the bias grows")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    (out / "img").mkdir(parents=True, exist_ok=True)
    png = out / "img" / "position_bias.png"
    fig.savefig(png, dpi=120)
    cmd = "python bench/position_bias.py " + " ".join(sys.argv[1:])
    print(f"\n{table}\n\n{sweep_table}\n\nplot: {png}\nrerun: {cmd.strip()}")
    print(f"took {time.perf_counter() - started:.0f}s")
    (out / "position-bias-results.md").write_text(
        f"Generated by `{cmd.strip()}` ({a.requests} requests x 20 rows per world, "
        f"{a.seeds} seeds, {a.epochs} epochs).\n\n{table}\n\nTruth NDCG@10 as the bias grows "
        f"(seed 100 world):\n\n{sweep_table}\n\n![plot](img/position_bias.png)\n"
    )


if __name__ == "__main__":
    main()
