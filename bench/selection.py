"""KuaiRand: a fixed epoch count vs best-epoch selection (overall and per head), and the
watch-time heads side by side, on the validation day 2022-04-30.

For each watch-time head and seed one run of ``--epochs`` epochs with ``keep = "per_head"``
(``training/selection.py``): its history holds every epoch's validation metrics (so the fixed
epoch counts and the best epoch by the default criterion, the mean relative validation loss,
come from the same run), and its final metrics are those of the per-head composite (shared
layers at the best epoch, each tower at its own task's best epoch).

    .venv/bin/python bench/selection.py                              # 4 heads x 3 seeds, ~15 min
    .venv/bin/python bench/selection.py --heads mse_log1p --seeds 1  # quick look
    .venv/bin/python bench/selection.py --from-json                  # the tables from the JSON

The config's data paths are relative to the config file (``../../shared/data/...``); from a
checkout elsewhere pass ``--data`` (the kuairand-pure-val folder). Prints markdown tables for
``docs/kuairand.md`` and writes the raw numbers to ``bench/results/selection.json``.
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

from ranker.config import SelectionConfig, load_config  # noqa: E402
from training.loop import train  # noqa: E402

CONFIG = ROOT / "configs/kuairand.toml"
HEADS = ("mse_log1p", "ziln", "weighted_logistic", "mse")
CRITERIA = ("relative_loss", "click.loss", "click.gauc", "watch_time.loss")
COLUMNS = (
    ("click", "auc"),
    ("click", "gauc"),
    ("like", "auc"),
    ("long_view", "auc"),
    ("watch_time", "rmse_log1p"),
    ("watch_time", "rmse"),
    ("watch_time", "xauc"),
)


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(rows: dict[str, list[dict[str, dict[str, float]]]], extra: str = "") -> str:
    head = "| variant | " + " | ".join(f"{t} {m}" for t, m in COLUMNS) + " |"
    lines = [head, "|---|" + "---:|" * len(COLUMNS)]
    for name, runs in rows.items():
        cells = [cell([r[t][m] for r in runs]) for t, m in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def data_overrides(data: Path | None) -> list[str]:
    """``--set`` overrides that point the KuaiRand config at a ``kuairand-pure-val`` folder."""
    if data is None:
        return []
    return [f'data.{k}="{data / (k + ".parquet")}"' for k in ("log", "users", "videos")]


def select(epochs: dict[str, dict[str, dict[str, float]]], criterion: str) -> int:
    """The epoch ``training/selection.py`` keeps under ``criterion`` (no patience), replayed
    from a run's stored per-epoch validation metrics."""
    from torch import nn

    from training.selection import Selector

    tasks = list(next(iter(epochs.values())))
    sel = Selector(SelectionConfig(criterion=criterion), tasks)
    for e in sorted(epochs, key=int):
        sel.update(int(e), 0, epochs[e], nn.Linear(1, 1))
    assert sel.best is not None
    return sel.best.epoch


def criteria_table(raw: list[dict[str, Any]], head: str) -> str:
    """Per criterion: the epochs it keeps over the seeds and the validation metrics there."""
    rows: dict[str, list[dict[str, dict[str, float]]]] = {}
    picks: dict[str, list[int]] = {}
    for r in raw:
        if r["head"] != head:
            continue
        eps = {str(k): v for k, v in r["epochs"].items()}
        for crit in CRITERIA:
            e = select(eps, crit)
            picks.setdefault(crit, []).append(e)
            rows.setdefault(f"{crit} (epochs {{}})", []).append(eps[str(e)])
    named = {k.format(picks[k.split(" ")[0]]): v for k, v in rows.items()}
    return table(named)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--heads", default=",".join(HEADS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", type=Path, default=None, help="the kuairand-pure-val folder")
    ap.add_argument("--json", type=Path, default=ROOT / "bench/results/selection.json")
    ap.add_argument("--from-json", action="store_true", help="only the tables, from --json")
    ap.add_argument("--criterion", default="click.loss", help="selection for the tables")
    args = ap.parse_args()
    if args.from_json:
        report(json.loads(args.json.read_text()), args.criterion)
        return
    sets = data_overrides(args.data)
    cfg = load_config(CONFIG, sets)
    if not Path(cfg.data.log).exists():
        print(f"{cfg.data.log} does not exist (pass --data); nothing to do.")
        return
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    raw: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for head in args.heads.split(","):
            for seed in range(args.seeds):
                c = load_config(
                    CONFIG,
                    [
                        *sets,
                        f"training.seed={seed}",
                        f"training.epochs={args.epochs}",
                        f"training.threads={args.threads}",
                        f'training.run_dir="{Path(tmp) / "run"}"',
                    ],
                )
                tasks = [
                    t.model_copy(update={"loss": head}) if t.name == "watch_time" else t
                    for t in c.tasks
                ]
                # every epoch validated, none stopped early, no refit: the history holds all
                # the points the criteria are replayed on
                every_epoch = c.training.model_copy(
                    update={"refit": False, "selection": SelectionConfig(keep="per_head")}
                )
                c = c.model_copy(update={"tasks": tasks, "training": every_epoch})
                t0 = time.perf_counter()
                r = train(c, progress=False, export=False)
                assert r.selection is not None
                by_epoch = {str(h["epoch"]): h["validation"] for h in r.history}
                raw.append(
                    {
                        "head": head,
                        "seed": seed,
                        "selection": r.selection.as_json(),
                        "epochs": by_epoch,
                        "per_head": r.metrics,
                    }
                )
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(raw, indent=1))  # partial results survive
                print(
                    f"{head} seed {seed}: selected {r.selection.as_json()} "
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
    print(
        f"\nvalidation day 2022-04-30, {args.seeds} seeds, up to {args.epochs} epochs, "
        f"{time.perf_counter() - started:.0f} s"
    )
    report(raw, args.criterion)
    print(f"\nraw: {args.json}")


def report(raw: list[dict[str, Any]], criterion: str) -> None:
    """The markdown tables of docs/kuairand.md from the runs' stored histories."""
    for r in raw:
        r["epochs"] = {str(k): v for k, v in r["epochs"].items()}
    base = [r for r in raw if r["head"] == "mse_log1p"]
    if base:
        rows: dict[str, list[dict[str, dict[str, float]]]] = {}
        for e in sorted(base[0]["epochs"], key=int):
            rows[f"fixed {e} epochs"] = [r["epochs"][e] for r in base]
        picks = [select(r["epochs"], criterion) for r in base]
        rows[f"best epoch by {criterion} ({picks})"] = [
            r["epochs"][str(e)] for r, e in zip(base, picks, strict=True)
        ]
        rows["best epoch by relative_loss, per-head towers"] = [r["per_head"] for r in base]
        print("\nmse_log1p watch head: fixed epoch counts vs selection\n")
        print(table(rows))
        print("\nmse_log1p: the epoch each criterion keeps, and its metrics\n")
        print(criteria_table(raw, "mse_log1p"))
    heads: dict[str, list[dict[str, dict[str, float]]]] = {}
    calib: dict[str, list[float]] = {}
    for r in raw:
        e = select(r["epochs"], criterion)
        m = r["epochs"][str(e)]
        heads.setdefault(f"{r['head']} (epochs by {criterion})", []).append(m)
        w = m["watch_time"]
        calib.setdefault(r["head"], []).append(w["mean_pred"] / w["mean_label"])
    print("\nwatch-time heads\n")
    print(table(heads))
    print("\n| watch head | mean prediction / mean label |\n|---|---:|")
    for head, v in calib.items():
        print(f"| {head} | {cell(v)} |")


if __name__ == "__main__":
    main()
