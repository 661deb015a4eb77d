"""bf16 training's quality check: ``training.precision = "bf16"`` (autocast) against fp32, same
seeds, same data, on the demo world and on the KuaiRand-Pure validation day.

For each data set and each seed it trains once in fp32 and once in bf16 and prints every head's
validation metrics as mean ± std over the seeds, with samples/s. bf16 passes when each metric's
mean differs from fp32's by no more than the larger of the two seed spreads (std): the
difference the precision makes is then within what the seed alone makes.

    .venv/bin/python bench/train_precision.py               # 3 seeds, both data sets
    .venv/bin/python bench/train_precision.py --seeds 2 --skip-kuairand

Speed here is whatever this CPU does with bf16 (printed beside it: AMX, AVX-512 BF16 or
neither); the quality figures do not depend on the CPU beyond float rounding.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_model  # noqa: E402

from ranker.config import Config, load_config  # noqa: E402
from ranker.cpu import describe  # noqa: E402
from training.loop import train  # noqa: E402
from training.synth import WorldConfig, generate  # noqa: E402

METRICS = {"binary": ("auc", "logloss"), "regression": ("rmse",), "ordinal": ("rmse",)}
KUAIRAND = ROOT.parent / "shared/data/kuairand-pure-val"


def run(cfg: Config, seeds: int, threads: int, tmp: Path) -> dict[str, dict]:
    """precision -> {"metrics": [per seed], "speed": [samples/s per seed]}."""
    out: dict[str, dict] = {p: {"metrics": [], "speed": []} for p in ("fp32", "bf16")}
    for seed in range(seeds):
        for precision in out:
            c = Config.model_validate(
                cfg.model_dump()
                | {
                    "training": cfg.training.model_dump()
                    | {
                        "seed": seed,
                        "precision": precision,
                        "threads": threads,
                        "run_dir": tmp / f"{precision}-{seed}",
                    }
                }
            )
            t0 = time.perf_counter()
            r = train(c, progress=False, export=False)
            out[precision]["metrics"].append(r.metrics)
            out[precision]["speed"].append(r.rows_per_second)
            print(
                f"  seed {seed} {precision}: {r.rows_per_second:,.0f} samples/s, "
                + ", ".join(f"{t} auc {m['auc']:.4f}" for t, m in r.metrics.items() if "auc" in m)
                + f" ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    return out


def table(cfg: Config, res: dict[str, dict]) -> tuple[str, bool]:
    """Markdown rows per (head, metric): fp32, bf16 (mean ± std), difference, verdict."""
    lines = [
        "| head | metric | fp32 | bf16 | bf16 - fp32 | larger seed std | within |",
        "|---|---|---|---|---:|---:|---|",
    ]
    ok = True
    for task in cfg.tasks:
        for m in METRICS.get(task.kind, ("rmse",)):
            vals = {p: [run[task.name][m] for run in res[p]["metrics"]] for p in res}
            mean = {p: statistics.mean(v) for p, v in vals.items()}
            std = {p: statistics.stdev(v) if len(v) > 1 else 0.0 for p, v in vals.items()}
            diff, spread = mean["bf16"] - mean["fp32"], max(std.values())
            within = abs(diff) <= spread
            ok &= within
            cell = {p: f"{mean[p]:.4f} ± {std[p]:.4f}" for p in vals}
            lines.append(
                f"| {task.name} | {m} | {cell['fp32']} | {cell['bf16']} | {diff:+.4f} | "
                f"{spread:.4f} | {'yes' if within else 'NO'} |"
            )
    speed = {p: statistics.mean(res[p]["speed"]) for p in res}
    lines.append(
        f"\nsamples/s: fp32 {speed['fp32']:,.0f}, bf16 {speed['bf16']:,.0f} "
        f"({speed['bf16'] / speed['fp32']:.2f}x)"
    )
    return "\n".join(lines), ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=None, help="default: each config's")
    ap.add_argument("--skip-kuairand", action="store_true")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument(
        "--kuairand",
        type=Path,
        default=KUAIRAND,
        help="the KuaiRand-Pure sample (log, users, videos .parquet); default: beside the checkout",
    )
    ap.add_argument(
        "--requests", type=int, default=25000, help="demo world size (make demo's: 25000)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"CPU: {cpu_model()}; {describe()}; torch {torch.__version__}, {args.threads} thread(s)\n"
        f"$ .venv/bin/python bench/train_precision.py {' '.join(sys.argv[1:])}",
        flush=True,
    )
    epochs = [f"training.epochs={args.epochs}"] if args.epochs else []
    verdicts = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        world = tmp / "world"
        world_config = WorldConfig(
            seed=0,
            n_users=max(500, args.requests * 2 // 5),
            n_videos=max(500, args.requests // 5),
            n_requests=args.requests,
        )
        generate(world_config, world, False)
        sets = [
            f'data.log="{world / "log"}"',
            f'data.users="{world / "users.parquet"}"',
            f'data.videos="{world / "videos.parquet"}"',
            *epochs,
        ]
        sets_by_name = {
            f"demo world ({args.requests} requests, default model)": (
                ROOT / "configs/default.toml",
                sets,
            )
        }
        if args.skip_demo:
            sets_by_name.clear()
        if not args.skip_kuairand and not args.kuairand.exists():
            print(f"{args.kuairand} does not exist: KuaiRand skipped (--kuairand PATH)")
        elif not args.skip_kuairand:
            kr = args.kuairand
            k = [f'data.{n}="{kr / (n + ".parquet")}"' for n in ("log", "users", "videos")]
            sets_by_name["KuaiRand-Pure, validation day 2022-04-30"] = (
                ROOT / "configs/kuairand.toml",
                [*k, *epochs],
            )
        for name, (path, overrides) in sets_by_name.items():
            cfg = load_config(path, overrides)
            print(f"\n## {name}", flush=True)
            res = run(cfg, args.seeds, args.threads, tmp)
            text, ok = table(cfg, res)
            verdicts.append((name, ok))
            print(f"\n{name}, {args.seeds} seeds:\n\n{text}", flush=True)
    for name, ok in verdicts:
        print(f"{name}: bf16 within the seed spread of fp32 on every metric: {ok}")


if __name__ == "__main__":
    main()
