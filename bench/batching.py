"""Dynamic batching, its upper bound: is one forward pass over k requests' candidates cheaper than
k forward passes, one request each?

Dynamic batching (Triton's dynamic batcher, Clipper's adaptive batching, Crankshaw et al., NSDI
2017) waits a moment for concurrent requests and runs them as one batch. It pays where a batch
of one request leaves the hardware idle (a GPU, or tiny batches). Here a request is already 500
candidates, and the service computes each request's user and context share of the first layer
once (``request_split``); rows of different users cannot share that, so a batch runs every row
in full (``/plain``). If the batched pass is not clearly cheaper per request than the separate
ones in this process, the service cannot gain from it at c=8 either (the forward pass is what a
batch could save; the waiting it adds comes on top), and it is not worth building.

Every variant runs in this process on the same rows, interleaved call by call, one thread:

    .venv/bin/python bench/batching.py --artifact artifacts/default
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401 - puts the repository on sys.path
from machine import cpu_model  # noqa: E402

from ranker.artifact import load_artifact  # noqa: E402
from ranker.backends import build_scorer  # noqa: E402
from ranker.cpu import describe  # noqa: E402
from ranker.features import Encoded  # noqa: E402
from ranker.predictor import request_split  # noqa: E402
from ranker.tables import FeatureTable  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def requests_rows(artifact, k: int, candidates: int, seed: int) -> list[Encoded]:  # noqa: ANN001
    """``k`` model inputs as the service builds them, each a different user's."""
    d, enc = artifact.config.data, artifact.encoder
    users = FeatureTable.from_parquet(d.users, d.user_key, enc, "user")
    videos = FeatureTable.from_parquet(d.videos, d.video_key, enc, "video")
    rng = np.random.default_rng(seed)
    out = []
    for u in rng.choice(len(users), k, replace=False):
        v = videos.rows.take(rng.choice(len(videos), candidates, replace=False))
        ur = users.rows.take(np.full(candidates, u, np.int64))
        c = enc.defaults("context", 1).take(np.zeros(candidates, np.int64))
        out.append(Encoded.concat_columns([ur, v, c]))
    return out


def stack(parts: list[Encoded]) -> Encoded:
    """Requests' rows one under the other, as a batcher would hand them to one forward pass."""
    return Encoded(np.concatenate([p.cat for p in parts]), np.concatenate([p.num for p in parts]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=ROOT / "artifacts" / "default")
    ap.add_argument("--backends", default="eager,onnx,bf16")
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--batches", default="2,4,8", help="requests per batch")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    artifact = load_artifact(a.artifact)
    sizes = [int(k) for k in a.batches.split(",")]
    rows = requests_rows(artifact, max(sizes), a.candidates, a.seed)
    split = request_split(artifact.model, artifact.encoder, artifact.config.live)
    print(f"# CPU: {cpu_model()}; {describe()}")
    print(f"# {' '.join(sys.argv)}")
    print(f"# one thread, {a.candidates} candidates per request, median of {a.rounds} rounds\n")
    print("| engine | requests per batch | separate ms / request | batched ms / request | gain |")
    print("|---|---:|---:|---:|---:|")
    for backend in a.backends.split(","):
        per_request = build_scorer(artifact.model, backend, 1, split)
        plain = build_scorer(artifact.model, backend, 1)
        batched = {k: stack(rows[:k]) for k in sizes}
        for r in rows:  # warm-up
            per_request(r.cat, r.num)
        for b in batched.values():
            plain(b.cat, b.num)
        sep: dict[int, list[float]] = {k: [] for k in sizes}
        bat: dict[int, list[float]] = {k: [] for k in sizes}
        for _ in range(a.rounds):
            for k in sizes:
                t0 = time.perf_counter()
                for r in rows[:k]:
                    per_request(r.cat, r.num)
                sep[k].append((time.perf_counter() - t0) / k)
                t0 = time.perf_counter()
                b = stack(rows[:k])  # the batcher's copy is part of its cost
                plain(b.cat, b.num)
                bat[k].append((time.perf_counter() - t0) / k)
        for k in sizes:
            s, b = np.median(sep[k]) * 1000, np.median(bat[k]) * 1000
            print(f"| {backend} | {k} | {s:.2f} | {b:.2f} | {s / b:.2f}x |")


if __name__ == "__main__":
    main()
