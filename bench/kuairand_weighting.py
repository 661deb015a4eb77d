"""KuaiRand: task weighting strategies on the validation day, at the epoch selection keeps.

The sparse ``like`` head (1.7 % positives) is still improving when the dense heads peak, so under
equal weighting best-epoch selection gives it up (docs/kuairand.md, "Epochs"). This compares the
weighting strategies that could give it a larger share of the shared layers' updates, each run
with every epoch validated; the epoch ``configs/kuairand.toml``'s criterion keeps is replayed on
the stored metrics by ``training/selection.py`` itself (as ``bench/selection.py`` does).

    .venv/bin/python bench/kuairand_weighting.py                     # 3 seeds, ~10 min on 1 thread
    .venv/bin/python bench/kuairand_weighting.py --strategies equal,famo --seeds 1
    .venv/bin/python bench/kuairand_weighting.py --from-json         # the table again

Prints the markdown table of docs/kuairand.md, "Task weighting"; raw numbers in
``bench/results/kuairand_weighting.json``.
"""

from __future__ import annotations

import argparse
import json
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
from selection import CONFIG, data_overrides, select, table  # noqa: E402

from ranker.config import SelectionConfig, load_config  # noqa: E402
from ranker.cpu import describe  # noqa: E402
from training.loop import train  # noqa: E402

# name -> --set overrides on configs/kuairand.toml (its [weighting] replaced)
STRATEGIES: dict[str, list[str]] = {
    "equal": ['weighting.name="equal"'],
    "famo": ['weighting.name="famo"'],
    "uncertainty": ['weighting.name="uncertainty"'],
    "dwa": ['weighting.name="dwa"'],
    "static like x4": [
        'weighting.name="static"',
        "weighting.weights={click=1.0,watch_time=1.0,like=4.0,long_view=1.0}",
    ],
    "static like x10": [
        'weighting.name="static"',
        "weighting.weights={click=1.0,watch_time=1.0,like=10.0,long_view=1.0}",
    ],
    "static like x20": [
        'weighting.name="static"',
        "weighting.weights={click=1.0,watch_time=1.0,like=20.0,long_view=1.0}",
    ],
    "static like x10 long view x2": [
        'weighting.name="static"',
        "weighting.weights={click=1.0,watch_time=1.0,like=10.0,long_view=2.0}",
    ],
    "static like x10 long view x2 click x2": [
        'weighting.name="static"',
        "weighting.weights={click=2.0,watch_time=1.0,like=10.0,long_view=2.0}",
    ],
    "db_mtl": ['weighting.name="db_mtl"'],
}


def run(name: str, seed: int, epochs: int, threads: int, sets: list[str], tmp: Path) -> dict:
    c = load_config(
        CONFIG,
        [
            *sets,
            *STRATEGIES[name],
            f"training.seed={seed}",
            f"training.epochs={epochs}",
            f"training.threads={threads}",
            f'training.run_dir="{tmp / "run"}"',
        ],
    )
    # every epoch validated, none stopped early, no refit: selection is replayed afterwards
    every_epoch = c.training.model_copy(update={"refit": False, "selection": SelectionConfig()})
    r = train(c.model_copy(update={"training": every_epoch}), progress=False, export=False)
    return {
        "strategy": name,
        "seed": seed,
        "epochs": {str(h["epoch"]): h["validation"] for h in r.history},
    }


def report(raw: list[dict[str, Any]], criterion: str) -> None:
    rows: dict[str, list[dict[str, dict[str, float]]]] = {}
    picks: dict[str, list[int]] = {}
    for r in raw:
        e = select(r["epochs"], criterion)
        picks.setdefault(r["strategy"], []).append(e)
        rows.setdefault(r["strategy"], []).append(r["epochs"][str(e)])
    named = {f"{k} (epochs {picks[k]})": v for k, v in rows.items()}
    print(
        f"\nat the epoch `{criterion}` keeps, validation day 2022-04-30, mean ± std over seeds:\n"
    )
    print(table(named))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--criterion", default="click.loss", help="the shipped config's criterion")
    ap.add_argument("--data", type=Path, default=None, help="the kuairand-pure-val folder")
    ap.add_argument("--json", type=Path, default=ROOT / "bench/results/kuairand_weighting.json")
    ap.add_argument("--from-json", action="store_true", help="only the table, from --json")
    args = ap.parse_args()
    if args.from_json:
        report(json.loads(args.json.read_text()), args.criterion)
        return
    sets = data_overrides(args.data)
    if not Path(load_config(CONFIG, sets).data.log).exists():
        print("the KuaiRand sample is not there (pass --data); nothing to do.")
        return
    unknown = [s for s in args.strategies.split(",") if s not in STRATEGIES]
    if unknown:
        sys.exit(f"error: --strategies: unknown {unknown}; known: {list(STRATEGIES)}")
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_model()} ({describe()}), {args.threads} thread(s)")
    started = time.perf_counter()
    raw: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.strategies.split(","):
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                raw.append(run(name, seed, args.epochs, args.threads, sets, Path(tmp)))
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(raw, indent=1))  # partial results survive
                print(f"{name} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"\n{len(raw)} runs, {time.perf_counter() - started:.0f} s")
    report(raw, args.criterion)
    print(f"\nraw: {args.json}\nrerun: .venv/bin/python bench/kuairand_weighting.py")


if __name__ == "__main__":
    main()
