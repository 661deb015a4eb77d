"""``make demo``: generate the default world, train, export, serve, rank one request, stop.

Each step runs the same command a user would type (``ranker generate``, ``ranker train``,
``ranker serve``), so the demo proves the README's commands, not a private code path.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq

from service.launch import serve

WORLD = Path("data/default")
EXPOSURE_LOG = Path("runs/demo-exposure-log")  # RANKER_EXPOSURE_DIR: what the service showed
GENERATE = ["--n-users", "10000", "--n-videos", "5000", "--n-requests", "25000", "--seed", "0"]
HISTORY = [
    "--set",
    'live.events=[{name = "click", column = "click"}]',
    "--set",
    'live.history={engaged = "click", length = 20, pooling = "attention", side = ["category"]}',
]
"""The demo's model also reads the user's last 20 clicked videos and their categories
(docs/live-features.md), so that step 5 can show the list move as clicks arrive."""


def step(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def run(args: list[str]) -> str:
    """Runs a ``ranker`` subcommand, echoing its output; returns its stdout."""
    cmd = [sys.executable, "-m", "ranker", *args]
    print("$ ranker " + " ".join(args), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"ranker {args[0]} failed with exit code {proc.returncode}")
    return proc.stdout


def sample_request(n_candidates: int = 200) -> dict:
    """A user from the log's last day, with videos they were shown plus random others."""
    log = pq.read_table(
        WORLD / "log", columns=["user_id", "video_id", "device", "hour", "timestamp"]
    )
    last = log.slice(log.num_rows - 1, 1).to_pylist()[0]
    videos = pq.read_table(WORLD / "videos.parquet", columns=["video_id"]).column(0).to_numpy()
    rng = np.random.default_rng(0)
    chosen = rng.choice(videos, size=min(n_candidates, len(videos)), replace=False)
    return {
        "user_id": int(last["user_id"]),
        "context": {"device": last["device"], "hour": int(last["hour"])},
        "candidates": [{"video_id": int(v)} for v in chosen],
        "top_k": 10,
    }


def show(res: dict, category: dict[int, int]) -> None:
    """The ranked items with each video's category."""
    print(f"{'#':>2} {'video':>7} {'category':>8} {'score':>8} {'click':>7}")
    for i, item in enumerate(res["items"], 1):
        v = item["video_id"]
        print(
            f"{i:>2} {v:>7} {category.get(v, -1):>8} {item['score']:>8.4f} "
            f"{item['predictions']['click']:>7.3f}"
        )


def clicks_then_rank_again(url: str, body: dict) -> None:
    """Step 5: the same request before and after the user clicks five videos of a category the
    list leaves out (the events a client would send, POST /v1/events), so the user's history
    (the model's last-20-clicks feature, kept current by the events) moves the list."""
    videos = pq.read_table(WORLD / "videos.parquet", columns=["video_id", "category", "popularity"])
    vid = videos.column("video_id").to_numpy()
    cat = videos.column("category").to_numpy()
    category = dict(zip(vid.tolist(), cat.tolist(), strict=True))
    before = httpx.post(f"{url}/v1/rank", json=body, timeout=30).json()
    shown = {i["video_id"] for i in before["items"]}
    asked = np.array([c["video_id"] for c in body["candidates"]])
    left_out = np.bincount(
        [category[v] for v in asked.tolist() if v not in shown], minlength=cat.max() + 1
    )
    in_top = np.bincount([category[v] for v in shown], minlength=cat.max() + 1)
    # the category least in the top 10 among those with candidates below it
    target = int(np.lexsort((-left_out, np.where(left_out >= 3, in_top, 10**6)))[0])
    pool = np.flatnonzero((cat == target) & ~np.isin(vid, asked))
    clicked = vid[pool[np.argsort(-videos.column("popularity").to_numpy()[pool])[:5]]]
    now = time.time()
    events = [
        {
            "event_id": f"demo:{body['user_id']}:{v}",
            "user_id": body["user_id"],
            "video_id": int(v),
            "type": "click",
            "time": now - 60 + i,
        }
        for i, v in enumerate(clicked.tolist())
    ]
    print(f"before: user has a history: {before['user_has_history']}")
    show(before, category)
    r = httpx.post(f"{url}/v1/events", json={"events": events}, timeout=30)
    r.raise_for_status()
    print(f"\nPOST /v1/events: clicks on videos {clicked.tolist()} (category {target}): {r.json()}")
    after = httpx.post(f"{url}/v1/rank", json=body, timeout=30).json()
    print(f"after: user has a history: {after['user_has_history']}")
    show(after, category)
    n_before = sum(category[i["video_id"]] == target for i in before["items"])
    n_after = sum(category[i["video_id"]] == target for i in after["items"])
    print(f"category {target} in the top {len(after['items'])}: {n_before} before, {n_after} after")


def send_feedback(url: str, user_id: int, items: list[dict], request_id: str) -> None:
    """What the user did with the shown videos: an impression of each, a click on the first,
    sent with the response's request id so that the exposure log's rows join them."""
    now = time.time()  # the default world's time unit is the second
    shown = [
        {"type": "impression", "video_id": it["video_id"], "event_id": f"{request_id}:{i}:i"}
        for i, it in enumerate(items)
    ]
    clicked = {"type": "click", "video_id": items[0]["video_id"], "event_id": f"{request_id}:0:c"}
    events = [
        e | {"user_id": user_id, "time": now, "request_id": request_id} for e in [*shown, clicked]
    ]
    r = httpx.post(f"{url}/v1/events", json={"events": events}, timeout=30)
    r.raise_for_status()
    print(f"POST /v1/events: {len(events)} events (request id {request_id}): {r.json()}")


def show_logs(directory: Path) -> None:
    """Where the exposure and event logs are, file by file."""
    print(f"\nexposure and event logs (RANKER_EXPOSURE_DIR={directory}):")
    for name in ("exposures", "events"):
        for f in sorted((directory / name).glob("*.parquet")):
            print(f"  {f}  {pq.read_metadata(f).num_rows} rows")


def serve_rank_and_feedback(artifact: str) -> float:
    """Starts the service with the exposure log on, ranks one request, sends what the user did
    with it, runs step 5 (clicks, then the same request again), stops the service (SIGTERM: the
    logs' pending rows are written); returns step 5's seconds."""
    shutil.rmtree(EXPOSURE_LOG, ignore_errors=True)  # this run's logs only: one model's
    env = {
        "RANKER_ARTIFACT": artifact,
        "RANKER_LOG_LEVEL": "warning",
        "RANKER_EXPOSURE_DIR": str(EXPOSURE_LOG.absolute()),
    }
    print(
        f"$ ranker serve  (RANKER_ARTIFACT={artifact} RANKER_EXPOSURE_DIR={EXPOSURE_LOG})",
        flush=True,
    )
    with serve(env, timeout=120.0) as running:
        url = running.url
        body = sample_request()
        print(
            f"POST /v1/rank: user {body['user_id']}, {len(body['candidates'])} candidates, "
            f"context {json.dumps(body['context'])}, top_k 10"
        )
        t_req = time.perf_counter()
        r = httpx.post(f"{url}/v1/rank", json=body, timeout=30)
        latency = (time.perf_counter() - t_req) * 1000
        r.raise_for_status()
        res = r.json()
        print(
            f"model {res['model_version']}, ranking config {res['ranking_version']}, "
            f"user known: {res['user_known']}, unknown videos: {res['unknown_videos']}, "
            f"{latency:.1f} ms\n"
        )
        print(
            f"{'#':>2} {'video':>7} {'score':>8} {'click':>7} {'watch s':>8} {'like':>7} {'rating':>7}"
        )
        for i, item in enumerate(res["items"], 1):
            p = item["predictions"]
            print(
                f"{i:>2} {item['video_id']:>7} {item['score']:>8.4f} {p['click']:>7.3f} "
                f"{p['watch_time']:>8.1f} {p['like']:>7.3f} {p['rating']:>7.2f}"
            )
        send_feedback(url, body["user_id"], res["items"], r.headers["x-request-id"])
        t5 = step("5. the user clicks a few videos of one category: POST /v1/events, rank again")
        clicks_then_rank_again(url, body)
        return time.perf_counter() - t5


def main() -> None:
    timings: dict[str, float] = {}
    t = step("1. generate the synthetic world")
    run(["generate", "--out", str(WORLD), "--quiet", *GENERATE])
    timings["generate"] = time.perf_counter() - t

    t = step("2. train MMoE (click, watch_time, like, rating), validate, export")
    out = run(["train", "--config", "configs/default.toml", *HISTORY])
    artifact = next(
        line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("artifact: ")
    )
    timings["train + export"] = time.perf_counter() - t

    t = step("3. evaluate the exported artifact on the validation days")
    run(["evaluate", "--artifact", artifact, "--quiet"])
    timings["evaluate"] = time.perf_counter() - t

    t = step("4. start the service, rank a request, send feedback, stop")
    events_s = serve_rank_and_feedback(artifact)
    show_logs(EXPOSURE_LOG)  # complete now: the service wrote what was pending on SIGTERM
    timings["serve + rank"] = time.perf_counter() - t - events_s
    timings["events + rank"] = events_s

    print("\n=== timings ===")
    for k, v in timings.items():
        print(f"{k:<16} {v:6.1f} s")
    print(
        "\nThe service has stopped. To rank requests yourself (README, 'Ranking a request'):\n"
        f"  .venv/bin/ranker serve --artifact {artifact}\n"
        "then, in another shell, the README's curl example against localhost:8000."
    )


if __name__ == "__main__":
    main()
