"""Bounded memory at any size: one epoch on logs of growing size, time and peak RSS per size.

Each size runs in a fresh process (generate, then ``ranker train`` for one epoch with the
default config), which reports its own peak resident memory, so sizes do not share a heap.
Time should grow linearly with rows and peak memory stay flat: the log is streamed, only the
users/videos tables, one shuffle buffer and the validation predictions are held.

    .venv/bin/python bench/scale.py                      # 1M, 5M, 20M rows (about 25 min here)
    .venv/bin/python bench/scale.py --rows 1000000 2000000   # a quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
from training.synth import WorldConfig, generate
from ranker.config import load_config
from training.loop import train
out = {out!r}
rows = {rows}
t0 = time.perf_counter()
generate(WorldConfig(seed=0, n_users=20000, n_videos=10000, n_requests=rows // 20), __import__("pathlib").Path(out), progress=False)
gen_s = time.perf_counter() - t0
rss_gen = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cfg = load_config({root!r} + "/configs/default.toml", [
    f'data.log="{{out}}/log"', f'data.users="{{out}}/users.parquet"',
    f'data.videos="{{out}}/videos.parquet"', "training.epochs=1",
    f'training.run_dir="{{out}}/run"', "training.threads={threads}",
])
t1 = time.perf_counter()
r = train(cfg, progress=False, export=False)
print(json.dumps({{"rows": rows, "generate_s": gen_s, "train_wall_s": time.perf_counter() - t1,
    "train_rows_per_s": r.rows_per_second, "peak_rss_mib_generate": rss_gen / 1024,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "click_auc": r.metrics["click"]["auc"]}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 5_000_000, 20_000_000])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.json"))
    a = ap.parse_args()
    results = []
    for rows in a.rows:
        with tempfile.TemporaryDirectory() as td:
            code = CHILD.format(root=str(ROOT), out=td, rows=rows, threads=a.threads)
            started = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                raise SystemExit(f"size {rows} failed:\n{proc.stderr[-3000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            res["total_s"] = time.perf_counter() - started
            results.append(res)
            print(json.dumps(res), flush=True)
    lines = [
        "| rows | generate s | train wall s (1 epoch + validation) | train rows/s | peak RSS MiB |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['rows']:,} | {r['generate_s']:.0f} | {r['train_wall_s']:.0f} | "
            f"{r['train_rows_per_s']:,.0f} | {r['peak_rss_mib']:.0f} |"
        )
    table = "\n".join(lines)
    cmd = ("python bench/scale.py " + " ".join(sys.argv[1:])).strip()
    print(f"\n{table}\n\nrerun: {cmd}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(
        json.dumps(
            {
                "command": cmd,
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "cpus": os.cpu_count(),
                "threads": a.threads,
                "results": results,
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
