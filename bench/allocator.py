"""glibc malloc as the trainer and the service set it (``ranker/allocator.py``: freed memory kept
in the heap) against glibc's own behaviour (``glibc_malloc = "default"``), in one run.

The setting is per process and cannot be undone inside one, so each measurement is a fresh
process, and the two settings alternate, run after run, to see the same noise:

* ``training step``: ``bench/train_speed.py --rounds 1`` (in-memory batches, the trainer's step,
  and the Parquet streaming path), samples/s;
* ``forward``: the eager 500-candidate forward pass as the service builds it (the request's share
  of the first layers computed once), median ms over ``--calls`` calls.

Each row also gives the minor page faults and the kernel CPU time per step or call: unlike the
timings, those hardly depend on what else the host is running, so they show the mechanism
(pages of freshly mapped memory being zeroed by the kernel) even when the timings are noisy.

    .venv/bin/python bench/allocator.py --runs 3 --steps 20 --calls 200
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_model  # noqa: E402

SETTINGS = {"retained": "retain", "glibc default": "default"}  # label -> glibc_malloc


def forward_child(  # noqa: PLR0913
    artifact: Path, backend: str, threads: int, calls: int, choice: str, out: Path
) -> None:
    """One process's forward timings, written as JSON (the parent alternates processes)."""
    import torch
    from serve import forward_rows

    from ranker.allocator import apply_glibc_malloc
    from ranker.artifact import load_artifact
    from ranker.backends import build_scorer
    from ranker.predictor import request_split

    torch.set_num_threads(threads)
    retained = apply_glibc_malloc(choice)  # as the service's start-up does
    a = load_artifact(artifact)
    rows = forward_rows(a, 500, 0)
    score = build_scorer(a.model, backend, threads, request_split(a.model, a.encoder))
    for _ in range(20):  # warm-up
        score(rows.cat, rows.num)
    times = []
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(calls):
        t0 = time.perf_counter()
        score(rows.cat, rows.num)
        times.append(time.perf_counter() - t0)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    out.write_text(
        json.dumps(
            {
                "retained": retained,
                "ms": float(np.median(times)) * 1000,
                "faults": (r1.ru_minflt - r0.ru_minflt) / calls,
                "system_ms": (r1.ru_stime - r0.ru_stime) / calls * 1000,
            }
        )
    )


def _run(cmd: list[str], choice: str, out: Path) -> dict:
    args = [*cmd, "--glibc-malloc", choice, "--json", str(out)]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=ROOT / "artifacts" / "default")
    ap.add_argument("--runs", type=int, default=3, help="processes per setting and workload")
    ap.add_argument("--steps", type=int, default=20, help="training steps per process")
    ap.add_argument("--calls", type=int, default=200, help="forward calls per process")
    ap.add_argument("--backend", default="eager")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--forward-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--glibc-malloc", default="retain", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.forward_child:
        forward_child(
            args.artifact, args.backend, args.threads, args.calls, args.glibc_malloc, args.json
        )
        return

    py = sys.executable
    train_cmd = [py, str(ROOT / "bench" / "train_speed.py"), "--artifact", str(args.artifact)]
    train_cmd += ["--steps", str(args.steps), "--rounds", "1", "--threads", str(args.threads)]
    fwd_cmd = [py, __file__, "--forward-child", "--artifact", str(args.artifact)]
    fwd_cmd += ["--backend", args.backend, "--threads", str(args.threads)]
    fwd_cmd += ["--calls", str(args.calls)]
    # (workload, setting) -> runs of (value, faults, system ms)
    rows: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.json"
        for i in range(args.runs):
            for setting, choice in SETTINGS.items():
                r = _run(train_cmd, choice, out)
                if r["retained"] != (setting == "retained"):
                    raise SystemExit(f"train_speed.py did not run with {setting} malloc")
                for variant in ("memory", "parquet"):
                    v = r[variant]
                    rows.setdefault((f"training step ({variant}), samples/s", setting), []).append(
                        (v["samples_per_s"], v["faults_per_step"], v["system_ms_per_step"])
                    )
                f = _run(fwd_cmd, choice, out)
                rows.setdefault(
                    (f"{args.backend} forward, 500 candidates, ms", setting), []
                ).append((f["ms"], f["faults"], f["system_ms"]))
            print(f"run {i + 1}/{args.runs} done", file=sys.stderr)

    print(
        f"`bench/allocator.py --runs {args.runs} --steps {args.steps} --calls {args.calls}"
        f" --backend {args.backend} --threads {args.threads}`; {cpu_model()},"
        f" {os.cpu_count()} cores; processes alternate between the settings\n"
    )
    print(
        "| workload | glibc malloc | median | each run | page faults per step or call"
        " | system ms per step or call |\n|---|---|---|---|---|---|"
    )
    medians: dict[tuple[str, str], float] = {}
    for (workload, setting), runs in rows.items():
        vals = [r[0] for r in runs]
        medians[(workload, setting)] = float(np.median(vals))
        fmt = "{:,.0f}" if "samples/s" in workload else "{:.2f}"
        print(
            f"| {workload} | {setting} | {fmt.format(np.median(vals))} | "
            f"{', '.join(fmt.format(v) for v in vals)} | {np.median([r[1] for r in runs]):,.0f} | "
            f"{np.median([r[2] for r in runs]):.2f} |"
        )
    print()
    for workload in dict.fromkeys(w for w, _ in rows):
        ratio = medians[(workload, "retained")] / medians[(workload, "glibc default")]
        better = "faster" if ("samples/s" in workload) == (ratio > 1) else "slower"
        print(f"- {workload}: retained / glibc default = {ratio:.2f} ({better})")


if __name__ == "__main__":
    main()
