"""Does the user's recent history help where interests drift? Truth NDCG@10 with and without it.

A synthetic world with ``interest_drift`` (``training/synth.py``): each user's interest is a
lasting part plus a category the user is into *now*, redrawn every ``drift_period_days``; no
feature says which, only what the user just clicked shows it. The same default config is trained
without ``[live]``, with ``[live.history]`` mean-pooled and with DIN target attention, for several
seeds, and each is scored on the validation split against the world's truth: NDCG@10 of the
serving score (``configs/ranking.toml``) against the true utility, and the click head's Spearman
correlation with the true click probability. The history is computed strictly before each row
(``ranker/history.py``), from the training and validation rows alike, as the service would
have had it. Also prints the attention's MFLOP per candidate beside the model's.

    .venv/bin/python bench/history.py --seeds 3     # 320,000 rows, 4 variants x 3 seeds
    .venv/bin/python bench/history.py --seeds 1 --variants static attention+category

``+category``: ``side = ["category"]``, each history video's category embedding added to its
id's (DIN's goods id + category id). The world is 250 users with ~64 requests each over 14
days, so that most rows have a full history and the video embeddings are seen often enough;
on a quarter of it (80,000 rows) selection keeps one of the first two epochs and no variant
separates.

Prints a markdown table (mean ± std over seeds) for ``docs/live-features.md`` and writes the
raw numbers to ``bench/results/history.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_model  # noqa: E402

from ranker.config import Config, _apply_override, parse_config  # noqa: E402
from ranker.predictor import request_split  # noqa: E402
from ranker.scoring import RankingFormula, load_ranking_config  # noqa: E402
from training.data import BatchBuilder, ImpressionLog  # noqa: E402
from training.evaluate import predict_split  # noqa: E402
from training.loop import TrainResult, train  # noqa: E402
from training.synth import WorldConfig, generate  # noqa: E402
from training.truth import truth_columns, truth_metrics  # noqa: E402

VARIANTS: dict[str, dict[str, Any] | None] = {
    "static": None,
    "mean": {"engaged": "click", "length": 20, "pooling": "mean"},
    "attention": {"engaged": "click", "length": 20, "pooling": "attention"},
    "attention+category": {
        "engaged": "click",
        "length": 20,
        "pooling": "attention",
        "side": ["category"],
    },
    "mean+category": {"engaged": "click", "length": 20, "pooling": "mean", "side": ["category"]},
    "attention32+category": {
        "engaged": "click",
        "length": 20,
        "pooling": "attention",
        "attention_hidden": [32],
        "side": ["category"],
    },
}


def config(
    world: Path, run: Path, seed: int, epochs: int, history: dict[str, Any] | None
) -> Config:
    d = tomllib.loads((ROOT / "configs/default.toml").read_text())
    for o in [
        f'data.log="{world / "log"}"',
        f'data.users="{world / "users.parquet"}"',
        f'data.videos="{world / "videos.parquet"}"',
        f"training.seed={seed}",
        f"training.epochs={epochs}",
        "training.batch_size=1024",
        "training.lr=0.002",
        f'training.run_dir="{run}"',
        "export.sample_requests=0",
        "model.expert_hidden=[64]",  # a small model: the comparison is the history's, and
        "model.num_experts=4",  # six runs share a 2-core machine
        "model.tower_hidden=[16]",
    ]:
        _apply_override(d, o)
    if history is not None:
        d["live"] = {"events": [{"name": "click", "column": "click"}], "history": history}
    return parse_config(d)


def against_truth(cfg: Config, r: TrainResult, seed: int) -> dict[str, Any]:
    log = ImpressionLog(cfg)
    extra = [*truth_columns(cfg, log.dataset.schema.names).values(), "position"]
    builder = BatchBuilder(cfg, r.encoder, r.users, r.videos, extra, serving=True)
    preds = predict_split(r.model, builder, log, "validation", progress=False)
    formula = RankingFormula(load_ranking_config(ROOT / "configs/ranking.toml"), cfg.task_names)
    return truth_metrics(cfg, preds, formula, k=10, seed=seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="to split the seeds over runs")
    ap.add_argument("--requests", type=int, default=16_000)
    ap.add_argument("--users", type=int, default=250)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--drift", type=float, default=2.0)
    ap.add_argument("--period-days", type=float, default=3.0)
    ap.add_argument(
        "--variants",
        nargs="+",
        default=["static", "attention", "attention+category", "mean+category"],
        choices=list(VARIANTS),
    )
    a = ap.parse_args()
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in a.variants}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-history-") as tmp:
        world = Path(tmp) / "world"
        wc = WorldConfig(
            n_users=a.users,
            n_videos=5_000,
            n_requests=a.requests,
            interest_drift=a.drift,
            drift_period_days=a.period_days,
        )
        summary = generate(wc, world, progress=False)
        print(f"world: {summary.n_rows} rows, click rate {summary.click_rate:.3f}", flush=True)
        for seed in range(a.first_seed, a.first_seed + a.seeds):
            for name in a.variants:
                hist = VARIANTS[name]
                cfg = config(
                    world, Path(tmp) / f"run-{seed}-{len(results[name])}", seed, a.epochs, hist
                )
                r = train(cfg, progress=False, export=False)
                m = against_truth(cfg, r, seed)
                split = request_split(r.model, r.encoder, cfg.live)
                row = {
                    "seed": seed,
                    "ndcg@10": m["ranking_score"]["ndcg@10"],
                    "click_spearman": m["click"]["spearman"],
                    "mflop_served": r.model.flops_per_row(split) / 1e6,
                    "mflop_history": (
                        r.model.history.flops_per_row(r.model.history_length, True) / 1e6
                        if r.model.history is not None
                        else 0.0
                    ),
                }
                results[name].append(row)
                print(f"  seed {seed} {name}: {row}", flush=True)
    print(f"\n{cpu_model()}, {time.time() - t0:.0f} s; world {wc.model_dump_json()}\n")
    print(
        "| model | truth NDCG@10 | click Spearman vs truth | MFLOP/candidate (served) | of it, history |"
    )
    print("|---|---|---|---|---|")

    def ms(rows: list[dict[str, Any]], key: str) -> str:
        v = [r[key] for r in rows]
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        return f"{statistics.mean(v):.4f} ± {sd:.4f}"

    for name, rows in results.items():
        print(
            f"| {name} | {ms(rows, 'ndcg@10')} | {ms(rows, 'click_spearman')} | "
            f"{rows[0]['mflop_served']:.3f} | {rows[0]['mflop_history']:.3f} |"
        )
    cmd = " ".join(["bench/history.py", *sys.argv[1:]])
    print(f"\n.venv/bin/python {cmd}")
    out = ROOT / "bench/results/history.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "cpu": cpu_model(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
