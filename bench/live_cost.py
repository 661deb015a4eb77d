"""What live counters and the history add to a ranking request: the same world, a static
model, one with counters (user, user x hour, video, channel) and one with the counters and the
user's last 20 clicks pooled by target attention (``[live.history]``), the service's in-process
``rank()`` on the same requests, interleaved, in one run.

    .venv/bin/python bench/live_cost.py                    # 500 candidates, 300 requests each
    .venv/bin/python bench/live_cost.py --candidates 200
    .venv/bin/python bench/live_cost.py --users 100        # every user with a full history

The attention runs over the filled slots only, so its cost follows the users' history lengths:
the default world (2,000 users, 3,000 requests) leaves most users a few clicks; ``--users 100``
fills nearly every user's 20 slots, the most a request can cost. The mean filled slots of the
timed requests are printed.

Prints the median and p90 milliseconds per request of each model (and the medians of its
stages: features, with the live lookup and encoding; the forward pass; the formula), their
ratios to the static one, MFLOP per candidate as served, the live features' own share and the CPU; nothing is timed
in a test.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_model  # noqa: E402

from ranker.artifact import load_artifact  # noqa: E402
from ranker.config import _apply_override, parse_config  # noqa: E402
from ranker.predictor import Predictor, request_split  # noqa: E402
from ranker.scoring import RankingFormula, load_ranking_config  # noqa: E402
from service.engine import ServingModel, live_state, rank  # noqa: E402
from service.store import InProcessStore  # noqa: E402
from training.loop import train  # noqa: E402
from training.synth import WorldConfig, generate  # noqa: E402

LIVE = {
    "events": [
        {"name": "click", "column": "click"},
        {"name": "like", "column": "like"},
        {"name": "watch_seconds", "column": "watch_time"},
    ],
    "counters": [
        {"name": "user", "keys": ["user"], "events": ["click", "like"], "since_last": True},
        {"name": "user_hour", "keys": ["user", "context:hour"], "events": ["click"]},
        {"name": "video", "keys": ["video"], "events": ["click", "watch_seconds"]},
        {"name": "channel", "keys": ["video:channel_id"], "events": ["click"]},
    ],
}


HISTORY = {"engaged": "click", "length": 20, "pooling": "attention", "side": ["category"]}
NAMES = ("static", "live", "history")


def serving_model(path: Path, backend: str = "eager") -> ServingModel:
    a = load_artifact(path)
    split = request_split(a.model, a.encoder, a.config.live)
    predictor = Predictor(a.model, a.config.tasks, backend, 1, split)  # type: ignore[arg-type]
    store = InProcessStore.from_tables(a.config, a.encoder)
    return ServingModel(a, predictor, store, live=live_state(a))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--users", type=int, default=2000, help="users of the world (3,000 requests)")
    ap.add_argument(
        "--backend",
        default="eager",
        choices=["eager", "torchscript", "onnx", "bf16"],
        help="the engine of every model (the service's RANKER_BACKEND)",
    )
    a = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        generate(
            WorldConfig.small(n_requests=3000, n_users=a.users, n_videos=5000),
            world,
            progress=False,
        )
        models = {}
        for name in NAMES:
            d = tomllib.loads((ROOT / "configs/default.toml").read_text())
            for o in (
                f'data.log="{world / "log"}"',
                f'data.users="{world / "users.parquet"}"',
                f'data.videos="{world / "videos.parquet"}"',
                "training.epochs=1",
                f'training.run_dir="{tmp}/{name}"',
                f'export.artifact_root="{tmp}/artifacts"',
                f'export.name="{name}"',
            ):
                _apply_override(d, o)
            if name != "static":
                d["live"] = LIVE if name == "live" else LIVE | {"history": HISTORY}
            result = train(parse_config(d), progress=False, export=True)
            assert result.artifact is not None
            models[name] = serving_model(result.artifact, a.backend)
        formula = RankingFormula(
            load_ranking_config(ROOT / "configs/ranking.toml"),
            models["static"].artifact.config.task_names,
        )
        rng = np.random.default_rng(0)
        n_videos = len(models["static"].store.videos)
        times: dict[str, list[float]] = {k: [] for k in models}
        stages: dict[str, dict[str, list[float]]] = {k: {} for k in models}
        feature_ms: list[float] = []
        filled: list[int] = []

        async def run() -> None:
            for i in range(a.requests):
                user = int(rng.integers(0, a.users))
                hist = models["history"].live
                assert hist is not None
                recent = hist.recent(user)
                filled.append(0 if recent is None else int(recent.ok.sum()))
                ids = rng.choice(n_videos, a.candidates, replace=False).astype(np.int64)
                ctx = {"device": "ios", "hour": int(rng.integers(0, 24))}
                for name in NAMES[i % 3 :] + NAMES[: i % 3]:
                    t0 = time.perf_counter()
                    r = await rank(models[name], formula, user, ctx, ids, 10)
                    times[name].append((time.perf_counter() - t0) * 1e3)
                    for stage, s in r.timings.items():
                        stages[name].setdefault(stage, []).append(s * 1e3)
                live = models["live"].live
                assert live is not None
                t0 = time.perf_counter()
                live.features(user, ids, ctx, None)
                feature_ms.append((time.perf_counter() - t0) * 1e3)

        asyncio.run(run())
    print(
        f"{a.candidates} candidates, {a.requests} requests per model, one thread, "
        f"{a.backend}; {cpu_model()}"
    )
    for name, ts in times.items():
        q = np.percentile(ts, [50, 90])
        parts = "  ".join(f"{k} {statistics.median(v):.3f}" for k, v in stages[name].items())
        print(f"  {name:7s} median {q[0]:.3f} ms   p90 {q[1]:.3f} ms   (median ms: {parts})")
    for name in NAMES[1:]:
        ratio = statistics.median(times[name]) / statistics.median(times["static"])
        print(f"  {name} / static (median): {ratio:.2f}x")
    print(f"  live features alone: median {statistics.median(feature_ms):.3f} ms")
    length = HISTORY["length"]
    print(f"  history: {statistics.mean(filled):.1f} of {length} slots filled on average")
    for name, m in models.items():
        split = request_split(m.artifact.model, m.artifact.encoder, m.artifact.config.live)
        mf = m.artifact.model.flops_per_row(split) / 1e6
        h = m.artifact.model.history
        own = 0.0 if h is None else h.flops_per_row(m.artifact.model.history_length, True) / 1e6
        print(f"  {name:7s} {mf:.3f} MFLOP per candidate as served ({own:.3f} the history's)")
    print(
        f"rerun: .venv/bin/python bench/live_cost.py --candidates {a.candidates} "
        f"--requests {a.requests} --users {a.users} --backend {a.backend}"
    )


if __name__ == "__main__":
    main()
