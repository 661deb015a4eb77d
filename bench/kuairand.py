"""A real log: KuaiRand-Pure (Gao et al., CIKM 2022), shared-bottom vs MMoE vs PLE vs
cross-stitch, softmax vs DSelect-k gates, next to simple baselines, per head on the last day.

Trains on 2022-04-25..29 and validates on 2022-04-30 with ``configs/kuairand.toml`` (the log's
own columns mapped onto the ranker's tasks: click = is_click, watch_time = play_time_ms / 1000,
like = is_like, long_view; no rating head), for each candidate of ``bench/architectures.py`` and
several seeds, with the sizes matched as there; the cost column is MFLOP per candidate, plain and
with the service's user-side split. Baselines, fitted on the same training days:

* global mean: every impression gets the training rate (mean watch time): AUC 0.5 by definition;
* per-video rate: the video's training click / like / long-view rate (mean watch time), shrunk
  towards the global value with ``--prior`` pseudo-impressions; unseen videos get the global value.

    .venv/bin/python bench/kuairand.py             # 5 candidates x 3 seeds, ~8 min
    .venv/bin/python bench/kuairand.py --seeds 1
    .venv/bin/python bench/kuairand.py --only mmoe cross_stitch mmoe+dselect
    .venv/bin/python bench/kuairand.py --data /work/shared/data/kuairand-pure-val  # a worktree

The data lives beside the checkout (``../shared/data/kuairand-pure-val``); without it this
script says so and exits 0. Prints the markdown table for ``docs/kuairand.md`` and writes the raw
numbers to ``bench/results/kuairand.json``.
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

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from architectures import (  # noqa: E402
    CANDIDATES,
    cost,
    head_params,
    sized,
    sparsity,
    stitch_units,
    units_table,
)
from machine import cpu_model  # noqa: E402

from ranker.config import SOURCES, Config, SelectionConfig, load_config  # noqa: E402
from ranker.metrics import binary_summary, regression_summary  # noqa: E402
from training.loop import train  # noqa: E402

CONFIG = ROOT / "configs/kuairand.toml"
ARCHS = tuple(CANDIDATES)
COLUMNS = (
    ("click", "auc"),
    ("click", "gauc"),
    ("click", "logloss"),
    ("watch_time", "rmse"),
    ("watch_time", "xauc"),
    ("like", "auc"),
    ("like", "gauc"),
    ("long_view", "auc"),
    ("long_view", "gauc"),
)


def baselines(cfg: Config, prior: float) -> dict[str, dict[str, dict[str, float]]]:
    """Global-mean and per-video baselines, per head, on the validation day."""
    d = cfg.data
    cols = [d.user_key, d.video_key, d.time_column, *[t.label for t in cfg.tasks]]
    log = pq.read_table(d.log, columns=cols)
    t = np.asarray(log.column(d.time_column))
    train, val = t < d.validation_from, t >= d.validation_from  # type: ignore[operator]
    users = np.asarray(log.column(d.user_key))[val]
    vids = np.asarray(log.column(d.video_key))
    out: dict[str, dict[str, dict[str, float]]] = {"global mean": {}, "per-video rate": {}}
    for task in cfg.tasks:
        y = pc.cast(log.column(task.label), "float64").to_numpy() * task.label_scale
        mean = float(y[train].mean())
        # per-video shrunk mean: (sum + prior * mean) / (n + prior), unseen videos get the mean
        keys, inv = np.unique(vids[train], return_inverse=True)
        sums = np.bincount(inv, weights=y[train])
        counts = np.bincount(inv)
        rate = (sums + prior * mean) / (counts + prior)
        pos = np.minimum(np.searchsorted(keys, vids[val]), len(keys) - 1)
        per_video = np.where(keys[pos] == vids[val], rate[pos], mean)
        preds = {"global mean": np.full(val.sum(), mean), "per-video rate": per_video}
        for name, p in preds.items():
            summary = binary_summary if task.kind == "binary" else regression_summary
            out[name][task.name] = summary(y[val], p, users)
    return out


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(
    rows: dict[str, list[dict[str, dict[str, float]]]],
    params: dict[str, int],
    costs: dict[str, dict[str, float]] | None = None,
) -> str:
    costs = costs or {}
    head = "| model | params (non-emb.) | MFLOP/cand. (served) | "
    head += " | ".join(f"{t} {m}" for t, m in COLUMNS) + " |"
    lines = [head, "|---|---:|---:|" + "---:|" * len(COLUMNS)]
    for name, runs in rows.items():
        cells = [cell([r[t][m] for r in runs]) for t, m in COLUMNS]
        p = f"{params[name]:,}" if name in params else "-"
        c = costs.get(name)
        f = f"{c['mflop']:.3f} ({c['mflop_served']:.3f})" if c else "-"
        lines.append(f"| {name} | {p} | {f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--epochs",
        type=int,
        default=3,
        help="a fixed count, last epoch kept, no refit (the table in docs/kuairand.md); "
        "0: the config's selection on 04-30 (its validation metrics; the refit is not scored)",
    )
    ap.add_argument("--prior", type=float, default=5.0, help="per-video baseline shrinkage")
    ap.add_argument("--only", nargs="+", choices=ARCHS, default=list(ARCHS), help="candidates")
    ap.add_argument("--json", type=Path, default=ROOT / "bench/results/kuairand.json")
    ap.add_argument(
        "--data", type=Path, default=None, help="the sample's folder; default: the config's paths"
    )
    args = ap.parse_args()
    data = (
        [f'data.{n}="{args.data / f"{n}.parquet"}"' for n in ("log", "users", "videos")]
        if args.data
        else []
    )
    cfg = load_config(CONFIG, data)
    if not Path(cfg.data.log).exists():
        print(
            f"{cfg.data.log} does not exist: the KuaiRand sample lives beside the checkout "
            f"(../shared/data/kuairand-pure-val); nothing to do."
        )
        return
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows: dict[str, list[dict[str, dict[str, float]]]] = {
        name: [m] for name, m in baselines(cfg, args.prior).items()
    }
    print(table(rows, {}), flush=True)
    inputs = [f for f in cfg.effective_features if f.source in SOURCES]
    d_in = sum(cfg.model.embedding_dim if f.kind == "categorical" else 1 for f in inputs)
    params: dict[str, int] = {}
    costs: dict[str, dict[str, float]] = {}
    raw: list[dict[str, Any]] = []
    gates: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for arch in args.only:
                model, _ = sized(arch, cfg.model, len(cfg.tasks), d_in)
                sets = [
                    f'model.architecture="{model.architecture}"',
                    f'model.gate="{model.gate}"',
                    f"model.expert_hidden={model.expert_hidden}",
                    f"training.seed={seed}",
                    "training.threads=1",
                    f'training.run_dir="{Path(tmp) / "run"}"',
                ]
                if args.epochs:
                    sets += [f"training.epochs={args.epochs}", "training.refit=false"]
                c = load_config(CONFIG, data + sets)
                if args.epochs:  # every epoch trained (no patience), the last one kept
                    fixed = c.training.model_copy(
                        update={"selection": SelectionConfig(keep="last")}
                    )
                    c = c.model_copy(update={"training": fixed})
                t0 = time.perf_counter()
                r = train(c, progress=False, export=False)
                params[arch] = head_params(r.model)
                costs[arch] = cost(r)
                used = sparsity(c, r)
                rows.setdefault(arch, []).append(r.metrics)
                raw.append(
                    {
                        "arch": arch,
                        "seed": seed,
                        "metrics": r.metrics,
                        "gates": r.gate_utilisation,
                        "params": params[arch],
                        "cost": costs[arch],
                        "experts_per_gate": used,
                        "stitch_units": stitch_units(r),
                    }
                )
                if seed == 0 and r.gate_utilisation:
                    gates[arch] = r.gate_utilisation
                print(
                    f"seed {seed} {arch}: click auc {r.metrics['click']['auc']:.4f}, "
                    f"like auc {r.metrics['like']['auc']:.4f}"
                    + (f", experts per gate {used:.2f}" if used is not None else "")
                    + f" ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {"baselines": {k: v[0] for k, v in rows.items() if k not in ARCHS}, "runs": raw},
            indent=1,
        )
    )
    print(
        f"\nvalidation day 2022-04-30, {args.seeds} seeds, {time.perf_counter() - started:.0f} s"
        f" on {cpu_model()}, one torch thread\n"
    )
    print(table(rows, params, costs))
    for arch, util in gates.items():
        experts = list(next(iter(util.values())))
        print(f"\ngate utilisation, {arch} (seed 0):\n")
        print("| gate | " + " | ".join(experts) + " |\n|---|" + "---:|" * len(experts))
        for task, row in util.items():
            print(f"| {task} | " + " | ".join(f"{row[e]:.2f}" for e in experts) + " |")
    for run in raw:
        if run["seed"] == 0 and run["stitch_units"] is not None:
            print(
                f"\nlast cross-stitch unit, seed 0:\n\n{units_table(cfg.task_names, run['stitch_units'][-1])}"
            )
    print(f"\nraw: {args.json}")


if __name__ == "__main__":
    main()
