"""The seed spread behind the loop test's tolerances (tests/training/test_loop.py).

Runs the test's loop (serve a model trained on the generator's log A, send log B's requests,
draw feedback from the world's truth, build-log, train) for several world and training seeds and
prints, per truth metric on the held-out log C, the model trained on the generator's log, the
one trained on the service's joined log, and their difference, with the difference's mean and
standard deviation across seeds.

    PYTHONPATH=. python bench/loop_spread.py --seeds 5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_model  # noqa: E402
from tests.training.test_loop import TOLERANCE, run_loop  # noqa: E402

METRICS = [*TOLERANCE, ("like", "pearson"), ("watch_time", "pearson")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="world seed = training seed = 0..n-1")
    a = ap.parse_args()
    torch.set_num_threads(1)
    print(f"# {cpu_model()}; PYTHONPATH=. python bench/loop_spread.py --seeds {a.seeds}")
    diffs: dict[tuple[str, str], list[float]] = {m: [] for m in METRICS}
    for seed in range(a.seeds):
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="loop-spread-") as tmp:
            r = run_loop(Path(tmp), world_seed=seed, train_seed=seed)
        policy = r["generator"]["ranking_score"]["logged_policy_ndcg@10"]
        cells = [f"logging policy ndcg@10 {policy:.4f}"]
        for head, metric in METRICS:
            g, lo = r["generator"][head][metric], r["loop"][head][metric]
            diffs[head, metric].append(lo - g)
            cells.append(f"{head}.{metric} gen {g:.4f} loop {lo:.4f} diff {lo - g:+.4f}")
        phases = ", ".join(f"{p} {s:.1f}s" for p, s in r["seconds"].items())
        print(
            f"seed {seed} ({time.perf_counter() - t0:.0f}s: {phases}): " + "; ".join(cells),
            flush=True,
        )
    print("\nloop - generator across seeds:")
    for (head, metric), d in diffs.items():
        x = np.asarray(d)
        print(
            f"  {head}.{metric:<24} mean {x.mean():+.4f}  std {x.std(ddof=1):.4f}  "
            f"min {x.min():+.4f}  max {x.max():+.4f}"
        )


if __name__ == "__main__":
    main()
