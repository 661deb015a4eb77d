"""Live counters in Redis (``service/redis_live.py``): the same features as the in-process state
after the same events, over HTTP the same scores as the in-process service and the offline path,
one state for two service processes, a replayed event counted once, a down Redis a degraded
answer and a 503 for events, never a 500."""

# ruff: noqa: F811 - the fixtures imported from test_live are parameters here
from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest
from redis.asyncio import Redis

from ranker.config import Config
from ranker.live import OfflineCounters, read_log_events
from service.live_state import EventBatch, LiveState
from service.redis_live import RedisLiveState
from service.redis_store import RedisStore
from tests.conftest import RANKING_CONFIG, RedisServer, redis_server
from tests.service.conftest import run_service
from tests.service.test_live import (  # noqa: F401 - fixtures
    LIVE,
    events_of,
    live_artifact,
    live_config,
    live_url,
    offline_predictions,
    post_events,
    split_world,
)
from training.push import push_files
from training.push_state import push_state

pytestmark = pytest.mark.slow

DECAYED: dict[str, Any] = LIVE | {
    "counters": [
        *LIVE["counters"],
        {"name": "user_decay", "keys": ["user"], "events": ["click"], "half_life_s": 3600.0},
        {
            "name": "video_decay",
            "keys": ["video"],
            "events": ["click", "watch_seconds"],
            "half_life_s": 60.0,
            "since_last": True,
        },
    ]
}


def _decayed_config(world: Path, tmp: Path, log: Path) -> Config:
    cfg = live_config(world, tmp, log)
    return Config.model_validate(cfg.model_dump() | {"live": DECAYED})


def _random_batch(rng: np.random.Generator, n: int, users: np.ndarray, videos: np.ndarray,
                  t0: float, k: int, previous: EventBatch | None = None) -> EventBatch:  # fmt: skip
    """Random events: out of order, repeated times, gaps from none to weeks, retried events
    (an earlier event of this batch or of ``previous`` sent again, id and all) within and
    across batches, unknown users and videos, missing contexts."""
    span = rng.choice([1.0, 600.0, 86400.0 * 14])
    times = t0 + np.round(rng.uniform(-span, span, n), rng.integers(0, 3))
    batch = EventBatch(
        ids=[f"e{k}.{i}" for i in range(n)],
        users=rng.choice(np.r_[users[:20], [10**12]], n),
        videos=rng.choice(np.r_[videos[:30], [10**12]], n),
        types=rng.choice(["impression", "click", "like", "watch_seconds"], n).tolist(),
        times=times,
        values=np.round(rng.exponential(30.0, n), 3),
        contexts=[{"hour": int(h)} if h >= 0 else {} for h in rng.integers(-3, 24, n)],
    )
    for i in range(n):
        if rng.random() > 0.1:
            continue
        src, j = (previous, int(rng.integers(len(previous.ids)))) if previous and rng.random() < 0.5 else (batch, int(rng.integers(i + 1)))  # fmt: skip
        batch.ids[i], batch.types[i], batch.contexts[i] = src.ids[j], src.types[j], src.contexts[j]
        batch.users[i], batch.videos[i] = src.users[j], src.videos[j]
        batch.times[i], batch.values[i] = src.times[j], src.values[j]
    return batch


def compare_random_events(
    cfg: Config,
    log_path: Path,
    sync: Any,
    client: Callable[[], Any],
    batches: int,
    seed: int = 7,
) -> int:
    """Pushes the log's state with ``sync`` (one node or a cluster), then feeds random event
    batches to the Redis state (an asyncio ``client()``) and to the in-process one, asserting
    the same accepted/duplicate counts and the same features after each; returns the
    candidates checked."""
    offline = OfflineCounters(cfg, [log_path])
    params = offline.fit(read_log_events(cfg, [log_path], offline.attrs))
    local = LiveState(cfg, params, [log_path])
    log = ds.dataset(log_path).to_table()
    users = np.unique(log["user_id"].to_numpy())
    videos = np.unique(log["video_id"].to_numpy())
    t_end = float(pc.max(log["timestamp"]).as_py())
    rng = np.random.default_rng(seed)
    push_state(sync, cfg, [log_path], "t", progress=False)

    async def run() -> int:
        store = RedisStore(client(), None, "t", 5.0, 0.5, "test")  # type: ignore[arg-type]
        remote = RedisLiveState(cfg, params, store)
        checked, batch = 0, None
        for k in range(batches):
            t = t_end + k * rng.choice([1.0, 30.0, 3600.0])
            batch = _random_batch(rng, int(rng.integers(1, 40)), users, videos, t, k, batch)
            assert await remote.ingest_async(batch) == local.ingest(batch)
            user = int(rng.choice(np.r_[users[:20], [10**12]]))
            cand = rng.choice(np.r_[videos[:30], [10**12]], int(rng.integers(1, 12)))
            ctx = {"hour": int(rng.integers(0, 24))}
            now = t + rng.choice([0.0, 1.0, 86400.0 * 30])
            req = remote.request(user, cand, ctx, now)
            got, got_seen = req.decode(await store.read(req.keys) if req.keys else [])
            want, want_seen = local.features(user, cand, ctx, now)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            assert got_seen == want_seen
            checked += len(cand)
        await store.close()
        return checked

    return asyncio.run(run())


# Requests weeks before a 60 s half-life counter's reference time overflow exp() in both
# engines alike (the column is then the training mean): part of the ill-conditioned cases.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_redis_state_gives_the_in_process_features_over_random_events(
    tiny_world: Path,
    split_world: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    cfg = _decayed_config(tiny_world, tmp_path, split_world[0])
    with redis_server(tmp_path / "redis") as server:
        import redis

        sync = redis.Redis(port=server.port)
        checked = compare_random_events(
            cfg, split_world[0], sync, lambda: Redis(port=server.port), 300
        )
        assert checked > 300
        sync.close()


# --- The real service on a real Redis ---------------------------------------------------------


@pytest.fixture(scope="module")
def live_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("live_redis")) as server:
        yield server


def _push_all(server: RedisServer, tiny_world: Path, artifact: Path) -> None:
    """Tables with push-features, counter state from the training log with push-state (the
    command line, as an operator runs it)."""
    push_files(
        server.url(), tiny_world / "users.parquet", tiny_world / "videos.parquet", progress=False
    )
    cmd = [sys.executable, "-m", "ranker", "push-state", "--artifact", str(artifact)]
    out = subprocess.run(
        [*cmd, "--redis-url", server.url()], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "pushed live counter state" in out.stdout


def _env(artifact: Path, server: RedisServer) -> dict[str, str]:
    return {
        "RANKER_ARTIFACT": str(artifact),
        "RANKER_RANKING_CONFIG": str(RANKING_CONFIG),
        "RANKER_REDIS_URL": server.url(),
        "RANKER_REDIS_TIMEOUT_MS": "2000",
        "RANKER_REDIS_RETRY_MS": "200",
    }


@pytest.fixture(scope="module")
def two_redis_services(
    live_redis: RedisServer,
    live_artifact: Path,
    tiny_world: Path,
) -> Iterator[tuple[str, str]]:
    _push_all(live_redis, tiny_world, live_artifact)
    env = _env(live_artifact, live_redis)
    with run_service(env) as a, run_service(env) as b:
        yield a, b


def _rank_body(rows: list[dict[str, Any]], t: float) -> dict[str, Any]:
    return {
        "user_id": rows[0]["user_id"],
        "context": {"hour": rows[0]["hour"], "device": rows[0]["device"]},
        "candidates": [{"video_id": r["video_id"]} for r in rows],
        "time": t,
    }


def test_redis_service_scores_as_the_in_process_service_and_the_offline_path(
    two_redis_services: tuple[str, str],
    live_url: str,
    live_artifact: Path,
    split_world: tuple[Path, Path],
) -> None:
    later = ds.dataset(split_world[1]).to_table()
    times = np.unique(later["timestamp"].to_numpy())
    a, b = two_redis_services
    checked, sent = 0, 0
    with (
        httpx.Client(base_url=a, timeout=60) as ca,
        httpx.Client(base_url=b, timeout=60) as cb,
        httpx.Client(base_url=live_url, timeout=60) as local,
    ):
        for t_star in times[[len(times) // 4, len(times) // 2, -1]]:
            ts = later["timestamp"]
            new = later.filter(pc.and_(pc.greater_equal(ts, sent), pc.less(ts, t_star)))
            events = events_of(new)
            half = len(events) // 2
            # Half the events to each service process: both read the one state in Redis.
            post_events(ca, events[:half])
            post_events(cb, events[half:])
            post_events(local, events)
            sent = int(t_star)
            target = later.filter(pc.equal(ts, t_star)).to_pylist()
            body = _rank_body(target, int(t_star))
            want = offline_predictions(
                live_artifact, split_world[1], later.filter(pc.equal(ts, t_star))
            )
            in_process = local.post("/v1/rank", json=body).json()
            for client in (ca, cb):
                out = client.post("/v1/rank", json=body).json()
                assert out["degraded"] is False, out["degraded_reason"]
                assert out["user_has_state"] == in_process["user_has_state"]
                got = {it["video_id"]: it for it in out["items"]}
                ref = {it["video_id"]: it for it in in_process["items"]}
                for i, row in enumerate(target):
                    v = row["video_id"]
                    assert got[v]["score"] == pytest.approx(ref[v]["score"], rel=1e-5, abs=1e-6)
                    for task, p in want.items():
                        assert got[v]["predictions"][task] == pytest.approx(
                            p[i], rel=1e-5, abs=1e-6
                        )
                checked += len(target)
    assert checked >= 6


def test_an_event_sent_to_one_process_counts_once_for_both(
    two_redis_services: tuple[str, str],
    split_world: tuple[Path, Path],
) -> None:
    a, b = two_redis_services
    row = ds.dataset(split_world[1]).to_table().slice(0, 1).to_pylist()[0]
    body = _rank_body([row], 4e9)
    ev = {"user_id": row["user_id"], "video_id": row["video_id"], "time": 3.9e9}
    batch = [ev | {"event_id": f"two{i}", "type": "impression"} for i in range(10)] + [
        ev | {"event_id": f"two-c{i}", "type": "click"} for i in range(10)
    ]
    before = httpx.post(f"{b}/v1/rank", json=body, timeout=30).json()
    r = httpx.post(f"{a}/v1/events", json={"events": batch}, timeout=30)
    assert r.json() == {"accepted": 20, "duplicates": 0}
    after_b = httpx.post(f"{b}/v1/rank", json=body, timeout=30).json()
    after_a = httpx.post(f"{a}/v1/rank", json=body, timeout=30).json()
    assert after_b["items"][0]["score"] != before["items"][0]["score"]
    assert after_b["items"] == after_a["items"]
    assert after_b["user_has_state"] is True
    # The same batch retried on the other process: every id is known there too.
    r = httpx.post(f"{b}/v1/events", json={"events": batch}, timeout=30)
    assert r.json() == {"accepted": 0, "duplicates": 20}
    assert httpx.post(f"{a}/v1/rank", json=body, timeout=30).json()["items"] == after_a["items"]


def test_redis_down_ranks_degraded_and_refuses_events_with_503(
    live_artifact: Path,
    tiny_world: Path,
    tmp_path: Path,
) -> None:
    with redis_server(tmp_path / "redis") as server:
        _push_all(server, tiny_world, live_artifact)
        with run_service(_env(live_artifact, server)) as url:
            row = {"user_id": 1, "video_id": 2, "hour": 3, "device": "ios"}
            body = _rank_body([row], 4e9)
            ok = httpx.post(f"{url}/v1/rank", json=body, timeout=30).json()
            assert ok["degraded"] is False
            server.stop()
            out = httpx.post(f"{url}/v1/rank", json=body, timeout=30)
            assert out.status_code == 200
            assert out.json()["degraded"] is True and out.json()["user_has_state"] is False
            ev = {"event_id": "d1", "user_id": 1, "video_id": 2, "type": "click", "time": 1.0}
            r = httpx.post(f"{url}/v1/events", json={"events": [ev]}, timeout=30)
            assert r.status_code == 503, r.text
            assert "retry" in r.json()["detail"]


def test_a_push_of_tables_keeps_the_counter_state(
    live_artifact: Path, tiny_world: Path, tmp_path: Path
) -> None:
    """The live keys are not versioned: a features push's clean-up of old versions leaves them."""
    import redis

    with redis_server(tmp_path / "redis") as server:
        _push_all(server, tiny_world, live_artifact)
        client = redis.Redis(port=server.port)
        live = sorted(client.scan_iter(match="ranker:fs:live:*", count=10_000))
        assert live
        for _ in range(3):  # the third push removes the first version
            push_files(
                server.url(),
                tiny_world / "users.parquet",
                tiny_world / "videos.parquet",
                progress=False,
            )
        assert sorted(client.scan_iter(match="ranker:fs:live:*", count=10_000)) == live
        client.close()
