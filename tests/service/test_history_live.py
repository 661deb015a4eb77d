"""The history feature end to end: a model with counters and ``[live.history]`` trained on the
first days of a log, served by the real service (uvicorn, HTTP), fed the later days' events,
scores as the offline path (``evaluate --log``) does for the same rows."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest

from ranker.config import Config
from tests.conftest import RANKING_CONFIG
from tests.service.conftest import run_service
from tests.service.test_live import (
    live_config,
    served_equals_offline,
    split_world,  # noqa: F401  (a fixture)
)

HISTORY = {
    "engaged": "click",
    "length": 5,
    "pooling": "attention",
    "attention_hidden": [8],
    "side": ["category"],  # the model maps each history video to its category
}


@pytest.fixture(scope="module")
def history_artifact(
    tiny_world: Path,
    split_world: tuple[Path, Path],  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    from training.loop import train

    cfg = history_config(tiny_world, tmp_path_factory.mktemp("hist_train"), split_world[0])
    result = train(cfg, progress=False, export=True)
    assert result.artifact is not None
    return result.artifact


@pytest.fixture(scope="module")
def history_url(history_artifact: Path) -> Iterator[str]:
    with run_service(
        {"RANKER_ARTIFACT": str(history_artifact), "RANKER_RANKING_CONFIG": str(RANKING_CONFIG)},
        timeout=180.0,
    ) as url:
        yield url


def test_service_history_after_the_same_events_scores_as_the_offline_path(
    history_url: str,
    history_artifact: Path,
    split_world: tuple[Path, Path],  # noqa: F811
) -> None:
    checked, answers = served_equals_offline(
        history_url, history_artifact, split_world[1], [(1, 5), (1, 2), (3, 4), (1, 1)]
    )
    with_history = sum(a["user_has_history"] for a in answers)
    assert checked >= 4
    assert with_history >= 1  # some of the checked users had a history that the scores used


def test_clicks_change_the_history_and_the_list_once(history_url: str) -> None:
    body = {
        "user_id": 987654321,  # a user no log holds: no history yet
        "context": {"hour": 20},
        "candidates": [{"video_id": v} for v in range(1, 40)],
        "time": 4e9,
    }
    clicks = [
        {
            "event_id": f"h{v}",
            "user_id": 987654321,
            "video_id": v,
            "type": "click",
            "time": 3.9e9 + v,
        }
        for v in (3, 5, 7)
    ]
    with httpx.Client(base_url=history_url, timeout=60) as client:
        before = client.post("/v1/rank", json=body).json()
        assert before["user_has_history"] is False
        assert client.post("/v1/events", json={"events": clicks}).json() == {
            "accepted": 3,
            "duplicates": 0,
        }
        after = client.post("/v1/rank", json=body).json()
        assert after["user_has_history"] is True
        assert [i["score"] for i in after["items"]] != [i["score"] for i in before["items"]]
        again = client.post("/v1/events", json={"events": clicks}).json()
        assert again == {"accepted": 0, "duplicates": 3}
        assert client.post("/v1/rank", json=body).json()["items"] == after["items"]


def history_config(tiny_world: Path, tmp_path: Path, log: Path) -> Config:
    """The live test config with the module's history."""
    cfg = live_config(tiny_world, tmp_path, log)
    assert cfg.live is not None
    return cfg.model_copy(
        update={"live": cfg.live.model_validate(cfg.live.model_dump() | {"history": HISTORY})}
    )


def compare_random_history(
    cfg: Config, log_path: Path, sync: Any, client: Callable[[], Any], batches: int, seed: int
) -> int:
    """push-state's histories with ``sync`` (one node or a cluster), then random event batches
    (out of order, ties, duplicate ids, unknown users and videos, negative ids) into Redis (the
    Lua script, through an asyncio ``client()``) and the in-process state: every user's history
    read in the request's MGET equals the in-process one. Returns the entries compared."""
    import asyncio

    from ranker.live import OfflineCounters, read_log_events
    from service.live_state import LiveState
    from service.redis_live import RedisLiveState
    from service.redis_store import RedisStore
    from tests.service.test_live_redis import _random_batch
    from training.push_state import push_state

    offline = OfflineCounters(cfg, [log_path])
    params = offline.fit(read_log_events(cfg, [log_path], offline.attrs))
    local = LiveState(cfg, params, [log_path])
    log = ds.dataset(log_path).to_table()
    users = np.unique(log["user_id"].to_numpy())
    videos = np.r_[np.unique(log["video_id"].to_numpy()), [-(2**62), -7]]
    t_end = float(pc.max(log["timestamp"]).as_py())
    rng = np.random.default_rng(seed)
    res = push_state(sync, cfg, [log_path], "t", progress=False)
    assert res.entities["history"] == len(local.history)  # type: ignore[arg-type]

    async def run() -> int:
        store = RedisStore(client(), None, "t", 5.0, 0.5, "test")  # type: ignore[arg-type]
        remote = RedisLiveState(cfg, params, store)
        seen = 0
        for k in range(batches):
            t = t_end + k * rng.choice([0.0, 1.0, 3600.0])
            batch = _random_batch(rng, int(rng.integers(1, 40)), users, videos, t, k)
            assert await remote.ingest_async(batch) == local.ingest(batch)
            for user in rng.choice(np.r_[users[:20], [10**12]], 3).tolist():
                req = remote.request(int(user), np.asarray([1]), {}, t)
                req.decode(await store.read(req.keys))  # the service's read, one node or a cluster
                got, want = req.recent, local.recent(int(user))
                assert got is not None and want is not None
                np.testing.assert_array_equal(got.ok, want.ok)
                np.testing.assert_array_equal(got.videos, want.videos)
                np.testing.assert_array_equal(got.times[got.ok], want.times[want.ok])
                seen += int(got.ok.sum())
        await store.close()
        return seen

    return asyncio.run(run())


def test_redis_history_equals_the_in_process_one_over_random_events(
    tiny_world: Path,
    split_world: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    import redis
    from redis.asyncio import Redis

    from tests.conftest import redis_server

    cfg = history_config(tiny_world, tmp_path, split_world[0])
    with redis_server(tmp_path / "redis") as server:
        sync = redis.Redis(port=server.port)
        seen = compare_random_history(
            cfg, split_world[0], sync, lambda: Redis(port=server.port), 200, seed=11
        )
        assert seen > 100
        sync.close()


def test_the_artifact_maps_every_history_video_to_its_category(
    history_artifact: Path, tiny_world: Path
) -> None:
    """``live.history.side``: the model carries each video id code's category code, read from
    the video table at training, so the service looks up only the history's video ids."""
    import pyarrow.parquet as pq

    from ranker.artifact import load_artifact

    a = load_artifact(history_artifact)
    videos = pq.read_table(tiny_world / "videos.parquet")
    vid = a.encoder.vocabs["video_id"].lookup(videos["video_id"])
    cat = a.encoder.vocabs["category"].lookup(videos["category"])
    model = a.model
    names = [f.name for f in a.encoder.categorical]
    column = sum(a.encoder.cat_widths[: names.index("category")])
    codes = (model.history_side_codes[0] - model.embed.offsets[column]).numpy()
    known = vid > 0
    assert known.sum() > 100
    np.testing.assert_array_equal(codes[vid[known]], cat[known])
    assert codes[0] == 0  # padding: the unknown category, masked anyway
