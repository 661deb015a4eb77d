"""The feature store and the live counters on a real Redis Cluster (3 masters, 3 replicas on
loopback ports, one cluster for the module): the same store code as on one node, the same
rankings as the in-process service, a push switched under load never mixed, a version removed
while a request ran answered right, a master killed: degraded answers while the replica takes
over, never a 5xx, then full answers again."""

# ruff: noqa: F811 - the fixtures imported from test_live are parameters here
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from ranker.artifact import load_artifact
from ranker.config import Config
from ranker.feature_store import Keys, cluster_url
from service.redis_store import RedisStore
from service.settings import Settings
from tests.conftest import RANKING_CONFIG, RedisClusterNodes, redis_cluster
from tests.service.conftest import run_service
from tests.service.test_history_live import compare_random_history, history_config
from tests.service.test_live import split_world  # noqa: F401 - fixture
from tests.service.test_live_redis import _decayed_config, compare_random_events
from tests.service.test_redis_store import _post, _request, _until, two_versions
from training.push import connect, primaries, push_files, push_tables, rollback

pytestmark = pytest.mark.slow

PREFIX = "ranker:fs"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as nodes:
        yield nodes


def _client(cluster: RedisClusterNodes) -> RedisCluster:
    client = connect(cluster.url())
    assert isinstance(client, RedisCluster)
    return client


def _push(cluster: RedisClusterNodes, users, videos, batch: int = 5000) -> str:  # noqa: ANN001
    client = _client(cluster)
    try:
        tables = {"user": (users, "user_id"), "video": (videos, "video_id")}
        return push_tables(client, tables, PREFIX, batch, progress=False, writers=2).version
    finally:
        client.close()


def _versions_on_masters(client: RedisCluster, keys: Keys) -> dict[int, set[str]]:
    """Per master (by port) the versions whose keys it holds."""
    out: dict[int, set[str]] = {}
    for node in primaries(client):
        port = node.connection_pool.connection_kwargs["port"]
        held = {keys.version_of(k.decode()) for k in node.scan_iter(match=f"{PREFIX}:*")}
        out[port] = held - {None}
    return out


@pytest.fixture(scope="module")
def cluster_service(
    cluster: RedisClusterNodes, tiny_artifact: Path, tiny_world: Path
) -> Iterator[str]:
    """The real service on the cluster, every entity read on every request (no entity cache),
    so the store's reads, not its cache, are what the tests see."""
    push_files(
        cluster.url(),
        tiny_world / "users.parquet",
        tiny_world / "videos.parquet",
        progress=False,
    )
    env = {
        "RANKER_ARTIFACT": str(tiny_artifact),
        "RANKER_RANKING_CONFIG": str(RANKING_CONFIG),
        # The plain scheme and the setting: the other way to name a cluster (the URL's
        # +cluster scheme is what the push above used).
        "RANKER_REDIS_URL": cluster_url(cluster.url())[0],
        "RANKER_REDIS_CLUSTER": "1",
        "RANKER_REDIS_TIMEOUT_MS": "1000",
        "RANKER_REDIS_RETRY_MS": "200",
        "RANKER_FEATURE_CACHE_ENTRIES": "0",
    }
    with run_service(env) as url:
        yield url


def test_ranking_on_a_cluster_equals_in_process_ranking(
    service_url: str, cluster_service: str, cluster: RedisClusterNodes, tiny_world: Path
) -> None:
    for body in (
        _request(tiny_world),
        _request(tiny_world, n=300, unknown=0),
        _request(tiny_world, user=10**12),
    ):
        body["top_k"] = 25
        via_cluster, in_process = _post(cluster_service, body), _post(service_url, body)
        assert via_cluster["degraded"] is False, via_cluster["degraded_reason"]
        for k in ("items", "user_known", "unknown_videos", "model_version"):
            assert via_cluster[k] == in_process[k], k
    ready = httpx.get(f"{cluster_service}/readyz").json()
    assert ready["store_ok"] is True and "(cluster)" in ready["detail"]
    # The records spread over every master; the fixed keys share one slot.
    client = _client(cluster)
    keys = Keys(PREFIX)
    held = _versions_on_masters(client, keys)
    assert len(held) == 3 and all(held.values()), held
    slots = {client.keyslot(k) for k in (keys.current, keys.previous, keys.versions, keys.lock)}
    assert len(slots) == 1
    client.close()


def test_pushes_switch_roll_back_and_clean_up_every_master(
    cluster: RedisClusterNodes, tiny_world: Path
) -> None:
    users = pq.read_table(tiny_world / "users.parquet")
    videos = pq.read_table(tiny_world / "videos.parquet")
    v = [_push(cluster, users, videos, batch=100) for _ in range(3)]
    client, keys = _client(cluster), Keys(PREFIX)
    assert client.get(keys.current).decode() == v[2]
    assert client.get(keys.previous).decode() == v[1]
    # Only the current and previous versions are left, on every master.
    assert all(h == {v[1], v[2]} for h in _versions_on_masters(client, keys).values())
    assert rollback(cluster.url(), PREFIX) == (v[1], v[2])
    assert client.get(keys.current).decode() == v[1]
    assert rollback(cluster.url(), PREFIX) == (v[2], v[1])
    client.close()


def test_a_version_removed_while_a_request_ran_is_read_again(
    cluster: RedisClusterNodes, tiny_artifact: Path, tiny_world: Path
) -> None:
    """The race the cluster read must handle: the pointer read says version N, but N was
    removed (two pushes later) before its records were read, which then come back missing.
    The pointer is replayed stale on purpose; the store must notice N is gone and read the
    new version, not answer every entity unknown."""
    encoder = load_artifact(tiny_artifact).encoder
    users = pq.read_table(tiny_world / "users.parquet")
    videos = pq.read_table(tiny_world / "videos.parquet")
    body = _request(tiny_world, n=50, unknown=0)
    video_ids = np.array([c["video_id"] for c in body["candidates"]], np.int64)
    old = _push(cluster, users, videos)

    class Stale(RedisStore):
        replay: bytes | None = None

        async def read(self, keys: list[str]) -> list[bytes | None]:
            values = await super().read(keys)
            if self.replay is not None:
                values[0], self.replay = self.replay, None
            return values

    async def go():  # noqa: ANN202
        settings = Settings(redis_url=cluster.url(), redis_timeout_ms=5000, feature_cache_entries=0)
        base = RedisStore.from_settings(settings, encoder)
        store = Stale(base.client, encoder, PREFIX, 5.0, 0.5, "test")
        try:
            first = await store.lookup(body["user_id"], video_ids)
            assert first.degraded is None and not first.videos_missing.any()
            for _ in range(2):  # removes `old`
                _push(cluster, users, videos)
            store.replay = old.encode()
            second = await store.lookup(body["user_id"], video_ids)
            return first, second
        finally:
            await store.close()

    first, second = asyncio.run(go())
    assert second.degraded is None
    assert not second.videos_missing.any() and second.user_missing is False
    np.testing.assert_array_equal(second.videos.num, first.videos.num)


def test_pushes_while_serving_never_mix_versions(
    cluster_service: str, cluster: RedisClusterNodes, tiny_world: Path
) -> None:
    v = two_versions(cluster_service, tiny_world, lambda u, vi: _push(cluster, u, vi))
    _push(cluster, v.users_a, v.videos_a)  # whole again, before the load starts
    seen: list[str] = []
    stop = threading.Event()

    def fire() -> None:
        with httpx.Client() as client:
            while not stop.is_set():
                seen.append(v.classify(_post(cluster_service, v.body, client)))

    def served(k: int) -> None:
        n = len(seen)
        _until(lambda: len(seen) >= n + k, f"{k} more responses", timeout=60)

    thread = threading.Thread(target=fire, daemon=True)
    thread.start()
    try:
        served(2)
        start = len(seen)
        for users, videos in ((v.users_b, v.videos_b), (v.users_a, v.videos_a)) * 2:
            _push(cluster, users, videos, batch=16)
            served(2)
    finally:
        stop.set()
        thread.join(timeout=30)
    pushed = seen[start:]
    assert "degraded" not in pushed and pushed.count("mixed") == 0, pushed
    assert pushed.count("A") >= 2 and pushed.count("B") >= 2, pushed


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def _compare_on(
    cluster: RedisClusterNodes, compare: Callable[..., int], cfg: Config, log: Path, seed: int
) -> int:
    """A single-node comparison helper (random event batches into Redis and in-process, the
    same state after each) run against the cluster: 60 batches."""
    sync = _client(cluster)
    plain = cluster_url(cluster.url())[0]
    try:
        return compare(cfg, log, sync, lambda: AsyncRedisCluster.from_url(plain), 60, seed=seed)
    finally:
        sync.close()


def test_live_counters_on_a_cluster_equal_the_in_process_state(
    cluster: RedisClusterNodes,
    tiny_world: Path,
    split_world: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    """The update script runs per record, one slot per call: the same counts and features
    as in-process after random batches with retried events."""
    cfg = _decayed_config(tiny_world, tmp_path, split_world[0])
    assert _compare_on(cluster, compare_random_events, cfg, split_world[0], seed=11) > 60


def test_cluster_history_equals_the_in_process_one_over_random_events(
    cluster: RedisClusterNodes, tiny_world: Path, split_world: tuple[Path, Path], tmp_path: Path
) -> None:
    """The user's history records (``{u:<id>}``-tagged) pushed to and updated on a cluster: the
    same entries as the in-process state after every batch (the single-node comparison's
    helper)."""
    cfg = history_config(tiny_world, tmp_path, split_world[0])
    assert _compare_on(cluster, compare_random_history, cfg, split_world[0], seed=13) > 30


def test_a_killed_master_degrades_answers_until_its_replica_takes_over(
    cluster_service: str, cluster: RedisClusterNodes, tiny_world: Path
) -> None:
    """Last in the module: it changes the cluster's roles (restored to 3 + 3 at the end)."""
    body = _request(tiny_world, n=300, unknown=0)
    statuses: list[int] = []
    degraded: list[bool] = []
    stop = threading.Event()

    def fire() -> None:
        with httpx.Client() as client:
            while not stop.is_set():
                r = client.post(f"{cluster_service}/v1/rank", json=body, timeout=30)
                statuses.append(r.status_code)
                if r.status_code == 200:
                    degraded.append(r.json()["degraded"])

    thread = threading.Thread(target=fire, daemon=True)
    thread.start()
    try:
        _until(lambda: len(degraded) >= 3, "3 responses", timeout=60)
        assert not any(degraded)
        killed = cluster.kill_master()
        _until(lambda: any(degraded), "a degraded answer after the kill", timeout=60)
        cluster.wait_ok(replicas=False)  # the replica took over
        _until(
            lambda: len(degraded) >= 5 and not any(degraded[-5:]),
            "5 full answers in a row after the failover",
            timeout=60,
        )
        cluster.restart(killed)
        cluster.wait_ok()  # the old master is back, as a replica
        n = len(degraded)
        _until(lambda: len(degraded) >= n + 3, "3 more answers", timeout=60)
        assert not any(degraded[n:])
    finally:
        stop.set()
        thread.join(timeout=60)
    assert set(statuses) == {200}, sorted(set(statuses))
    ready = httpx.get(f"{cluster_service}/readyz").json()
    assert ready["store_ok"] is True


def test_cluster_url_and_setting() -> None:
    assert cluster_url("redis+cluster://h:7000/0") == ("redis://h:7000/0", True)
    assert cluster_url("rediss+cluster://:pw@h:7000") == ("rediss://:pw@h:7000", True)
    assert cluster_url("redis://h:6379/0") == ("redis://h:6379/0", False)
    assert cluster_url("redis://h:6379/0", cluster=True) == ("redis://h:6379/0", True)
