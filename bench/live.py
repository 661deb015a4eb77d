"""Static features vs live counters on KuaiRand-Pure's shared validation day, several seeds.

Trains ``configs/kuairand.toml`` (ids and table columns only) and ``configs/kuairand-live.toml``
(the same plus point-in-time counters, ``ranker/live.py``) on 2022-04-25..29, evaluates each
exported artifact on 2022-04-30 exactly as ``ranker evaluate`` does (counters continued from the
training days through the evaluated rows, strictly before each row), and prints one markdown
table: click AUC, click GAUC per user (pooled over the day) and within sessions (a user's
impressions split at gaps over 30 minutes), like and long-view AUC, watch-time XAUC and RMSE.

    .venv/bin/python bench/live.py --data ../shared/data/kuairand-pure-val      # 2 x 3 seeds
    .venv/bin/python bench/live.py --data /path/to/kuairand-pure-val --seeds 1
    .venv/bin/python bench/live.py --variant 'hist=live.history={engaged = "click"}'

Writes the raw numbers to ``bench/results/live.json``.
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
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_model  # noqa: E402

from ranker.config import load_config  # noqa: E402
from training.loop import train  # noqa: E402
from training.offline import evaluate_artifact  # noqa: E402

CONFIGS = {"static": ROOT / "configs/kuairand.toml", "live": ROOT / "configs/kuairand-live.toml"}
COLUMNS = (
    ("click", "auc"),
    ("click", "gauc"),
    ("click", "gauc_session"),
    ("like", "auc"),
    ("long_view", "auc"),
    ("watch_time", "xauc"),
    ("watch_time", "rmse"),
)


def cell(xs: list[float]) -> str:
    m = statistics.fmean(xs)
    return f"{m:.4f} ± {statistics.pstdev(xs):.4f}" if len(xs) > 1 else f"{m:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/kuairand-pure-val"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=OVERRIDE",
        help="also the live config with this override (repeatable; overrides of one name add "
        "up), e.g. 'hist=live.history={engaged = \"click\", length = 20}'",
    )
    a = ap.parse_args()
    variants: dict[str, list[str]] = {}
    for v in a.variant:
        name, _, override = v.partition("=")
        variants.setdefault(name, []).append(override)
    data = Path(a.data)
    if not (data / "log.parquet").exists():
        print(f"no KuaiRand data at {data}; nothing to do")
        return
    torch.set_num_threads(a.threads)
    runs = {k: (p, []) for k, p in CONFIGS.items()}
    runs |= {k: (CONFIGS["live"], o) for k, o in variants.items()}
    rows: dict[str, list[dict]] = {k: [] for k in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (path, extra)) in enumerate(runs.items()):
            for seed in range(a.seeds):
                cfg = load_config(
                    path,
                    [
                        f'data.log="{data / "log.parquet"}"',
                        f'data.users="{data / "users.parquet"}"',
                        f'data.videos="{data / "videos.parquet"}"',
                        f"training.seed={seed}",
                        # evaluated on 04-30, so no refit on all six days: the model of the
                        # epoch that selection on 04-30 keeps
                        "training.refit=false",
                        f'training.run_dir="{tmp}/run{i}-{seed}"',
                        f'export.artifact_root="{tmp}/artifacts"',
                        f'export.name="config{i}-{seed}"',
                        *extra,
                    ],
                )
                t0 = time.perf_counter()
                result = train(cfg, progress=False, export=True)
                assert result.artifact is not None
                m = evaluate_artifact(result.artifact, progress=False, ranking=None)
                rows[name].append(m["heads"])
                print(f"{name} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    head = "| config | " + " | ".join(f"{t} {m}" for t, m in COLUMNS) + " |"
    print(f"\nKuaiRand-Pure, trained 04-25..29, validated on 04-30, {a.seeds} seeds; {cpu_model()}")
    print(head)
    print("|" + "---|" * (len(COLUMNS) + 1))
    for name, runs in rows.items():
        cells = [cell([r[t][m] for r in runs]) for t, m in COLUMNS]
        print(f"| {name} | " + " | ".join(cells) + " |")
    out = ROOT / "bench/results/live.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu_model(), "seeds": a.seeds, "runs": rows}, indent=2))
    more = "".join(f" --variant '{v}'" for v in a.variant)
    print(f"rerun: .venv/bin/python bench/live.py --data {data} --seeds {a.seeds}{more}")


if __name__ == "__main__":
    main()
