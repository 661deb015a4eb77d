"""The MMoE paper's synthetic experiment (Ma et al., KDD 2018, sections 3.2 and 5), reproduced
with this project's own model code.

Data, as the paper's section 3.2 describes it: orthogonal unit vectors ``u1, u2`` in R^100,
``w1 = c u1``, ``w2 = c (p u1 + sqrt(1 - p^2) u2)`` (so ``cos(w1, w2) = p``), inputs
``x ~ N(0, I)``, and per task ``y_i = w_i.x + sum_{j=1..m} sin(alpha_j w_i.x + beta_j) + eps``
with ``c = 1``, ``m = 10``, ``eps ~ N(0, 0.01)`` (read as variance 0.01). The paper calls
``alpha_j, beta_j`` given parameters without stating their law; like the usual reproductions we
draw them from N(0, 1), once per data set and shared by both tasks. Every seed draws fresh
``u, alpha, beta, x`` and fresh initial weights, as the paper's independent runs do.

Models (paper section 5.3): 8 experts, each one ReLU layer of 16 units; towers of one ReLU layer
of 8 units; shared-bottom with one layer of 113 units so that the parameter counts match
(printed below). They are :class:`ranker.model.RankingModel` with numeric input only, i.e. the
same ``ExpertBank``, gates and towers the ranker trains. Adam (lr 1e-3, batch 128), equal-weight
sum of the two MSE losses.

    .venv/bin/python bench/mmoe_paper.py                        # 4 p x 3 models x 8 seeds, ~7 min
    .venv/bin/python bench/mmoe_paper.py --seeds 2 --steps 500  # a quick look

Writes ``docs/img/mmoe_paper_loss.png`` (training-loss curves per p), prints the markdown table
for ``docs/architectures.md`` and writes the raw numbers to ``bench/results/mmoe_paper.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ranker.config import ModelConfig  # noqa: E402
from ranker.model import RankingModel  # noqa: E402

D, M, C = 100, 10, 1.0
NOISE_STD = 0.1  # N(0, 0.01) as a variance
CORRELATIONS = (1.0, 0.9, 0.5, 0.0)
TASKS = ["t1", "t2"]
MODELS: dict[str, ModelConfig] = {
    "shared_bottom": ModelConfig(
        architecture="shared_bottom", embedding_dim=1, expert_hidden=[113], tower_hidden=[8]
    ),
    "omoe": ModelConfig(
        architecture="omoe", embedding_dim=1, num_experts=8, expert_hidden=[16], tower_hidden=[8]
    ),
    "mmoe": ModelConfig(
        architecture="mmoe", embedding_dim=1, num_experts=8, expert_hidden=[16], tower_hidden=[8]
    ),
}


def make_data(p: float, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (n, 100)``, ``y (n, 2)`` of the paper's generator for cosine ``p`` (section 3.2)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((D, 2)))  # two orthonormal columns
    u1, u2 = q[:, 0], q[:, 1]
    w1 = C * u1
    w2 = C * (p * u1 + math.sqrt(max(1.0 - p * p, 0.0)) * u2)
    alpha, beta = rng.standard_normal(M), rng.standard_normal(M)
    x = rng.standard_normal((n, D))
    ys = []
    for w in (w1, w2):
        z = x @ w  # (n,)
        y = z + np.sin(np.outer(z, alpha) + beta).sum(1) + rng.normal(0, NOISE_STD, n)
        ys.append(y)
    return torch.from_numpy(x).float(), torch.from_numpy(np.stack(ys, 1)).float()


def build(name: str, seed: int) -> RankingModel:
    torch.manual_seed(seed)
    return RankingModel([], D, TASKS, MODELS[name])


def n_params(model: RankingModel) -> int:
    """Trainable parameters, without the 1-number placeholder embedding of a model with no
    categorical input."""
    return sum(p.numel() for p in model.parameters()) - model.embed.table.weight.numel()


def run(
    name: str, seeds: list[int], n_train: int, steps: int, every: int, batch: int, lr: float
) -> list[dict[str, object]]:
    """Trains one model per (p, seed) for architecture ``name``, all at once: the models are
    stacked with ``torch.func.stack_module_state`` and run under ``vmap`` (one independent model
    per slice: the summed loss gives each slice exactly its own gradient, and Adam is
    element-wise, so this is the same as training them one after another, ~3x faster on CPU)."""
    runs = [(p, s) for p in CORRELATIONS for s in seeds]
    data = [make_data(p, n_train + 5_000, s) for p, s in runs]
    x = torch.stack([d[0] for d in data])  # (R, n, 100)
    y = torch.stack([d[1] for d in data])  # (R, n, 2)
    xt, yt, xv, yv = x[:, :n_train], y[:, :n_train], x[:, n_train:], y[:, n_train:]
    models = [build(name, 1000 + s) for _, s in runs]
    params, buffers = torch.func.stack_module_state(models)  # each (R, ...)
    base = copy.deepcopy(models[0]).to("meta")

    def forward(p: dict, b: dict, xb: torch.Tensor) -> dict[str, torch.Tensor]:
        no_cat = torch.zeros(xb.shape[0], 0, dtype=torch.long)
        return torch.func.functional_call(base, (p, b), (no_cat, xb))

    vforward = torch.vmap(forward, randomness="different")

    def losses(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """Per run: the sum over the two tasks of the MSE ``(R,)``."""
        out = vforward(params, buffers, xb)  # {task: (R, B)}
        return sum(((out[t] - yb[..., i]) ** 2).mean(-1) for i, t in enumerate(TASKS))

    @torch.no_grad()
    def mean_task_mse(xe: torch.Tensor, ye: torch.Tensor) -> list[float]:
        return (losses(xe, ye) / 2).tolist()

    probe = slice(0, min(5_000, n_train))  # training rows the curve is measured on
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    gen = torch.Generator().manual_seed(0)
    curves = [[(0, v)] for v in mean_task_mse(xt[:, probe], yt[:, probe])]
    rows = torch.arange(len(runs))[:, None]
    for step in range(1, steps + 1):
        idx = torch.randint(0, n_train, (len(runs), batch), generator=gen)  # (R, B)
        loss = losses(xt[rows, idx], yt[rows, idx]).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0:
            for c, v in zip(curves, mean_task_mse(xt[:, probe], yt[:, probe]), strict=True):
                c.append((step, v))
    test = mean_task_mse(xv, yv)
    return [
        {
            "model": name,
            "p": p,
            "seed": s,
            "curve": c,
            "train_loss": c[-1][1],
            "test_loss": t,
            "params": n_params(models[0]),
        }
        for (p, s), c, t in zip(runs, curves, test, strict=True)
    ]


def summarise(results: list[dict], key: str) -> dict[tuple[str, float], tuple[float, float]]:
    out = {}
    for name in MODELS:
        for p in CORRELATIONS:
            v = [float(r[key]) for r in results if r["model"] == name and r["p"] == p]
            out[(name, p)] = (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
    return out


def plot(results: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(CORRELATIONS), sharey=True)
    colors = {
        "shared_bottom": "tab:gray",
        "omoe": "tab:orange",
        "mmoe": "tab:blue",
        "cgc": "tab:green",
    }
    for ax, p in zip(axes, CORRELATIONS, strict=True):
        for name in MODELS:
            runs = [r for r in results if r["model"] == name and r["p"] == p]
            steps = np.array([s for s, _ in runs[0]["curve"]])
            losses = np.array([[v for _, v in r["curve"]] for r in runs])  # (seeds, points)
            # median and the range over seeds: a log axis has no room for mean - std < 0
            ax.plot(steps, np.median(losses, 0), color=colors[name], label=name)
            ax.fill_between(
                steps, losses.min(0), losses.max(0), color=colors[name], alpha=0.12, linewidth=0
            )
        ax.set_title(f"p = {p}")
        ax.set_xlabel("training step")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("training loss (mean MSE of the 2 tasks)")
    axes[-1].legend(fontsize="small")
    fig.suptitle(
        "MMoE paper synthetic data: median (line) and range (band) over "
        f"{len({r['seed'] for r in results})} seeds"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def markdown(results: list[dict]) -> str:
    train = summarise(results, "train_loss")
    test = summarise(results, "test_loss")
    params = {r["model"]: r["params"] for r in results}
    head = "| model | params | " + " | ".join(f"p = {p}" for p in CORRELATIONS) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(CORRELATIONS)]
    for name in MODELS:
        cells = [
            f"{train[(name, p)][0]:.3f} ± {train[(name, p)][1]:.3f} "
            f"({test[(name, p)][0]:.3f} ± {test[(name, p)][1]:.3f})"
            for p in CORRELATIONS
        ]
        lines.append(f"| {name} | {params[name]:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(results: list[dict], png: Path, raw: Path) -> None:
    """Prints the table, MMoE's paired advantage per p and the spread over seeds."""
    seeds = sorted({r["seed"] for r in results})
    print("\nfinal training loss, mean ± std over seeds (held-out loss in brackets):\n")
    print(markdown(results))

    def loss(name: str, p: float, s: int) -> float:
        return next(
            float(r["train_loss"])
            for r in results
            if r["model"] == name and r["p"] == p and r["seed"] == s
        )

    print(
        "\n| p | SB - MMoE (mean ± std over seeds, paired) | seeds MMoE < SB |"
        " max over seeds: SB / OMoE / MMoE |"
    )
    print("|---|---:|---:|---:|")
    for p in CORRELATIONS:
        diff = [loss("shared_bottom", p, s) - loss("mmoe", p, s) for s in seeds]
        wins = sum(d > 0 for d in diff)
        sd = statistics.stdev(diff) if len(diff) > 1 else 0.0
        worst = " / ".join(f"{max(loss(m, p, s) for s in seeds):.3f}" for m in MODELS)
        print(f"| {p} | {statistics.mean(diff):+.3f} ± {sd:.3f} | {wins}/{len(seeds)} | {worst} |")
    print(f"\nplot: {png}\nraw: {raw}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--train-rows", type=int, default=40_000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--png", type=Path, default=ROOT / "docs/img/mmoe_paper_loss.png")
    ap.add_argument("--json", type=Path, default=ROOT / "bench/results/mmoe_paper.json")
    ap.add_argument("--replot", action="store_true", help="redraw and retabulate from --json")
    args = ap.parse_args()
    if args.replot:
        results = json.loads(args.json.read_text())["runs"]
        plot(results, args.png)
        report(results, args.png, args.json)
        return
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = []
    for name in MODELS:
        t0 = time.perf_counter()
        res = run(
            name,
            list(range(args.seeds)),
            args.train_rows,
            args.steps,
            args.every,
            args.batch,
            args.lr,
        )
        results += res
        print(
            f"{name}: {time.perf_counter() - t0:.0f} s; final training loss per p: "
            + ", ".join(
                f"{p}: {statistics.mean(r['train_loss'] for r in res if r['p'] == p):.3f}"
                for p in CORRELATIONS
            ),
            flush=True,
        )
    plot(results, args.png)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": results})
    )
    print(f"\n{args.seeds} seeds, {args.steps} steps, {time.perf_counter() - started:.0f} s")
    report(results, args.png, args.json)


if __name__ == "__main__":
    main()
