"""The service on a real Redis: same rankings as the in-process store, never a mix of two pushed
versions, defaults (flagged) when Redis is slow, down or empty, and recovery by itself."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import redis

from ranker.artifact import load_artifact
from ranker.feature_store import Keys, RecordLayout
from service.redis_store import RedisStore
from service.settings import Settings
from tests.conftest import RANKING_CONFIG, RedisServer, redis_server
from tests.service.conftest import run_service
from training.push import push_files, push_tables

pytestmark = pytest.mark.slow

PREFIX = "ranker:fs"
TIMEOUT_MS = 1000


def _request(world: Path, n: int = 40, user: int | None = None, unknown: int = 2) -> dict:
    videos = pq.read_table(world / "videos.parquet").column("video_id").to_numpy()
    users = pq.read_table(world / "users.parquet").column("user_id").to_numpy()
    ids = [int(v) for v in videos[:n]] + [10**12 + i for i in range(unknown)]
    return {
        "user_id": int(users[3]) if user is None else user,
        "context": {"device": "ios", "hour": 20},
        "candidates": [{"video_id": v} for v in ids],
    }


def _post(url: str, body: dict, client: httpx.Client | None = None) -> dict:
    r = (client or httpx).post(f"{url}/v1/rank", json=body, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def _scores(out: dict, body: dict) -> np.ndarray:
    """Scores in the request's candidate order (ranked order depends on the scores)."""
    by_id = {i["video_id"]: i["score"] for i in out["items"]}
    return np.array([by_id[c["video_id"]] for c in body["candidates"]])


def _push(server: RedisServer, users: pa.Table, videos: pa.Table, batch: int = 5000) -> str:
    client = redis.Redis(port=server.port, password=server.password)
    tables = {"user": (users, "user_id"), "video": (videos, "video_id")}
    return push_tables(client, tables, PREFIX, batch, progress=False).version


def _until(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout} s")
        time.sleep(0.05)


def _redis_service(
    redis_module: RedisServer, tiny_artifact: Path, tiny_world: Path, **extra: str
) -> Iterator[str]:
    """The real service process reading features from the module's Redis."""
    push_files(
        redis_module.url(),
        tiny_world / "users.parquet",
        tiny_world / "videos.parquet",
        progress=False,
    )
    env = {
        "RANKER_ARTIFACT": str(tiny_artifact),
        "RANKER_RANKING_CONFIG": str(RANKING_CONFIG),
        "RANKER_REDIS_URL": redis_module.url(),
        # Generous: these tests check results on a shared 2-core machine, not latency.
        "RANKER_REDIS_TIMEOUT_MS": str(TIMEOUT_MS),
        "RANKER_REDIS_RETRY_MS": "1000",
        **extra,
    }
    with run_service(env) as url:
        yield url


@pytest.fixture(scope="module")
def redis_service(
    redis_module: RedisServer, tiny_artifact: Path, tiny_world: Path
) -> Iterator[str]:
    """Production settings: encoded entities cached per feature version."""
    yield from _redis_service(redis_module, tiny_artifact, tiny_world)


@pytest.fixture(scope="module")
def uncached_service(
    redis_module: RedisServer, tiny_artifact: Path, tiny_world: Path
) -> Iterator[str]:
    """Every entity read from Redis on every request (RANKER_FEATURE_CACHE_ENTRIES=0)."""
    yield from _redis_service(
        redis_module, tiny_artifact, tiny_world, RANKER_FEATURE_CACHE_ENTRIES="0"
    )


def test_redis_ranking_equals_in_process_ranking(
    service_url: str, redis_service: str, tiny_world: Path
) -> None:
    for body in (
        _request(tiny_world),
        _request(tiny_world, n=300, unknown=0),
        _request(tiny_world, user=10**12),  # an unknown user gets the defaults in both
    ):
        body["top_k"] = 25
        via_redis, in_process = _post(redis_service, body), _post(service_url, body)
        assert via_redis["degraded"] is False and via_redis["degraded_reason"] is None
        for k in ("items", "user_known", "unknown_videos", "model_version"):
            assert via_redis[k] == in_process[k], k
    ready = httpx.get(f"{redis_service}/readyz").json()
    assert ready["store"] == "redis" and ready["store_ok"] is True
    assert "version" in ready["detail"] and ready["degraded_responses"] == 0


def _changed(users: pa.Table, videos: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Every entity's numeric features changed (same columns, same string tables)."""

    def set_col(t: pa.Table, name: str, values: pa.Array) -> pa.Table:
        return t.set_column(t.schema.get_field_index(name), name, values)

    users = set_col(users, "activity", pc.add(pc.multiply(users["activity"], 3.0), 1.0))
    users = set_col(users, "account_age_days", pc.add(users["account_age_days"], 500.0))
    videos = set_col(videos, "duration_s", pc.add(pc.multiply(videos["duration_s"], 2.0), 30.0))
    videos = set_col(videos, "popularity", pc.add(videos["popularity"], 3.0))
    videos = set_col(videos, "age_days", pc.add(videos["age_days"], 100.0))
    return users, videos


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a, b, rtol=0.0, atol=1e-12))


@dataclass
class TwoVersions:
    """Tables A and B that score every video differently, the request, and each version's
    reference scores: a response is then A, B, or mixed (records of both)."""

    users_a: pa.Table
    videos_a: pa.Table
    users_b: pa.Table
    videos_b: pa.Table
    body: dict
    ref_a: np.ndarray
    ref_b: np.ndarray

    def classify(self, out: dict) -> str:
        if out["degraded"]:
            return "degraded"
        s = _scores(out, self.body)
        return "A" if _same(s, self.ref_a) else "B" if _same(s, self.ref_b) else "mixed"


def two_versions(
    url: str, world: Path, push: Callable[[pa.Table, pa.Table], object]
) -> TwoVersions:
    """Pushes A, then B, then each crossing (A's users with B's videos and the reverse) through
    ``push`` and ranks after each: the crossings match neither reference, so the mixed-version
    checks have teeth. Leaves the last crossing pushed."""
    users_a = pq.read_table(world / "users.parquet")
    videos_a = pq.read_table(world / "videos.parquet")
    users_b, videos_b = _changed(users_a, videos_a)
    body = _request(world, n=300, unknown=0)

    def rank() -> np.ndarray:
        out = _post(url, body)
        assert out["degraded"] is False, out["degraded_reason"]
        return _scores(out, body)

    push(users_a, videos_a)
    ref_a = rank()
    push(users_b, videos_b)
    ref_b = rank()
    # Every video scores differently in A and B, and one version's user with the other's
    # videos matches neither.
    assert np.all(np.abs(ref_a - ref_b) > 1e-9)
    for users, videos in ((users_a, videos_b), (users_b, videos_a)):
        push(users, videos)
        crossed = rank()
        assert not _same(crossed, ref_a) and not _same(crossed, ref_b)
    return TwoVersions(users_a, videos_a, users_b, videos_b, body, ref_a, ref_b)


def test_cached_entities_follow_every_push(
    redis_service: str, redis_module: RedisServer, tiny_world: Path
) -> None:
    """The entity cache is per feature version: a push is served from the next request on,
    and going back to the first tables (a new version again) serves them again."""
    users_a = pq.read_table(tiny_world / "users.parquet")
    videos_a = pq.read_table(tiny_world / "videos.parquet")
    users_b, videos_b = _changed(users_a, videos_a)
    body = _request(tiny_world, n=300, unknown=0)
    half = {**body, "candidates": body["candidates"][::2]}

    def rank(b: dict) -> np.ndarray:
        out = _post(redis_service, b)
        assert out["degraded"] is False, out["degraded_reason"]
        return _scores(out, b)

    _push(redis_module, users_a, videos_a)
    half_a, ref_a = rank(half), rank(body)  # the second is half cached, half fetched
    assert _same(rank(body), ref_a) and _same(rank(half), half_a)  # all cached
    _push(redis_module, users_b, videos_b)
    ref_b = rank(body)
    assert np.all(np.abs(ref_a - ref_b) > 1e-9)
    _push(redis_module, users_a, videos_a)
    assert _same(rank(body), ref_a) and _same(rank(half), half_a)


def test_push_while_serving_never_mixes_versions(
    uncached_service: str, redis_module: RedisServer, tiny_world: Path
) -> None:
    """Without the entity cache (which would hide the control's in-place overwrite, a thing
    the push never does), every record comes from Redis: the MGET's version check is tested."""
    redis_service = uncached_service
    v = two_versions(redis_service, tiny_world, lambda u, vi: _push(redis_module, u, vi))
    users_a, videos_a, users_b, videos_b, body = (
        v.users_a,
        v.videos_a,
        v.users_b,
        v.videos_b,
        v.body,
    )

    seen: list[str] = []
    stop = threading.Event()

    def fire() -> None:
        with httpx.Client() as client:
            while not stop.is_set():
                seen.append(v.classify(_post(redis_service, body, client)))

    def served(k: int) -> None:
        n = len(seen)
        _until(lambda: len(seen) >= n + k, f"{k} more responses")

    thread = threading.Thread(target=fire, daemon=True)
    thread.start()
    try:
        # Control: overwriting the current version's records in place (what the push never
        # does) is caught as mixed responses, so the check has teeth.
        _push(redis_module, users_a, videos_a)
        served(2)
        client = redis.Redis(port=redis_module.port)
        version = client.get(Keys(PREFIX).current).decode()
        _, ids, records = RecordLayout.pack(videos_b, "video_id", "video", "b")
        prefix = Keys(PREFIX).entity(version, "video")
        size = records.dtype.itemsize
        for part in np.array_split(np.arange(len(ids)), 4)[:3]:
            blob = records[part].tobytes()
            client.mset(
                {f"{prefix}{ids[i]}": blob[j * size : (j + 1) * size] for j, i in enumerate(part)}
            )
            served(2)
        assert seen.count("mixed") >= 1, seen
        _push(redis_module, users_a, videos_a)  # a new version: whole again from here on
        served(2)
        start = len(seen)
        # The real thing: slow pushes (many small batches) alternating B and A while serving.
        for users, videos in ((users_b, videos_b), (users_a, videos_a)) * 2:
            _push(redis_module, users, videos, batch=8)
            served(2)
    finally:
        stop.set()
        thread.join(timeout=30)
    pushed = seen[start:]
    assert "degraded" not in pushed
    assert pushed.count("mixed") == 0, pushed
    assert pushed.count("A") >= 2 and pushed.count("B") >= 2, pushed
    _push(redis_module, users_a, videos_a)  # leave the module's Redis as the other tests expect


def _lookup(url: str, encoder, user: int, videos: np.ndarray):  # noqa: ANN001, ANN202
    async def go():  # noqa: ANN202
        store = RedisStore.from_settings(Settings(redis_url=url, redis_timeout_ms=2000), encoder)
        try:
            return await store.lookup(user, videos), await store.ready()
        finally:
            await store.close()

    return asyncio.run(go())


def test_redis_url_password_and_db_index_are_honoured(
    tmp_path: Path, tiny_artifact: Path, tiny_world: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder = load_artifact(tiny_artifact).encoder
    users = pq.read_table(tiny_world / "users.parquet").column("user_id").to_numpy()
    videos = pq.read_table(tiny_world / "videos.parquet").column("video_id").to_numpy()[:10]
    with redis_server(tmp_path, password="s3cret:@x") as server:
        good = server.url(db=3)
        assert "s3cret" in good and good.endswith("/3")
        push_files(
            good, tiny_world / "users.parquet", tiny_world / "videos.parquet", progress=False
        )
        client = redis.Redis(port=server.port, password=server.password)
        assert client.dbsize() == 0  # db 0 untouched: everything went to db 3
        assert redis.Redis(port=server.port, password=server.password, db=3).dbsize() > 500

        lookup, (ok, detail) = _lookup(good, encoder, int(users[0]), videos)
        assert (
            lookup.degraded is None and not lookup.user_missing and not lookup.videos_missing.any()
        )
        assert ok and "s3cret" not in detail and "***" in detail

        lookup, (ok, detail) = _lookup(server.url(db=0), encoder, int(users[0]), videos)
        assert "no feature version has been pushed" in lookup.degraded and not ok

        lookup, (ok, detail) = _lookup(server.url(db=3, password="wrong"), encoder, 0, videos)
        assert lookup.degraded is not None and "Auth" in lookup.degraded and not ok
        assert "wrong" not in detail

        monkeypatch.setenv("RANKER_REDIS_URL", good)
        assert Settings().redis_url.get_secret_value() == good


def test_a_version_lacking_a_column_serves_the_rest_flagged(
    redis_module: RedisServer, tiny_artifact: Path, tiny_world: Path
) -> None:
    encoder = load_artifact(tiny_artifact).encoder
    client = redis.Redis(port=redis_module.port)
    users = pq.read_table(tiny_world / "users.parquet").drop_columns(["country"])
    videos = pq.read_table(tiny_world / "videos.parquet")
    tables = {"user": (users, "user_id"), "video": (videos, "video_id")}
    push_tables(client, tables, "t:lacking", progress=False)
    url = redis_module.url()

    async def go():  # noqa: ANN202
        s = Settings(redis_url=url, redis_prefix="t:lacking", redis_timeout_ms=2000)
        store = RedisStore.from_settings(s, encoder)
        try:
            return await store.lookup(
                int(users["user_id"][0].as_py()), videos["video_id"].to_numpy()[:5]
            )
        finally:
            await store.close()

    lookup = asyncio.run(go())
    assert "user.country" in lookup.degraded and not lookup.user_missing
    country = [f.name for f in encoder.of("user", "categorical")].index("country")
    assert lookup.user.cat[0, country] == 0  # the default code; the other columns are real
    assert not lookup.videos_missing.any()


def test_store_faults_degrade_and_recover(
    redis_service: str, redis_module: RedisServer, tiny_world: Path, service_url: str
) -> None:
    """Last in the module: it stops the module's Redis (and leaves it running and pushed)."""
    url, server = redis_service, redis_module
    body = _request(tiny_world, n=20)
    unknown = dict(body, user_id=10**12, candidates=[{"video_id": 10**12 + i} for i in range(22)])
    defaults = _post(service_url, unknown)  # the in-process store's answer for unknown ids
    default_score = defaults["items"][0]["score"]
    default_predictions = defaults["items"][0]["predictions"]
    tables = [pq.read_table(tiny_world / f) for f in ("users.parquet", "videos.parquet")]
    _push(server, *tables)
    healthy = _post(url, body)
    assert healthy == _post(service_url, body) | {"degraded": False, "degraded_reason": None}
    before = httpx.get(f"{url}/readyz", timeout=10).json()["degraded_responses"]

    def degraded(reason: str) -> None:
        out = _post(url, body)
        assert out["degraded"] is True, out
        assert reason in out["degraded_reason"], out["degraded_reason"]
        assert out["user_known"] is False and out["unknown_videos"] == 22
        for item in out["items"]:
            assert item["score"] == pytest.approx(default_score, rel=1e-9, abs=1e-12)
            assert item["predictions"] == pytest.approx(default_predictions, rel=1e-9)

    def recovered() -> bool:
        out = _post(url, body)
        return out["degraded"] is False and out["items"] == healthy["items"]

    # Slow: the server accepts connections and never answers.
    server.pause()
    try:
        degraded(f"did not answer within {TIMEOUT_MS} ms")
        degraded("not retried for now")  # within the retry pause: no waiting at all
        ready = httpx.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["store_ok"] is False
        assert ready.json()["degraded_responses"] == before + 2
        assert ready.json()["ready"] is True and ready.json()["degraded"] is True
        assert "no answer within" in ready.json()["degraded_reason"]
    finally:
        server.resume()
    _until(recovered, "recovered after the stall")
    # Down: connections are refused.
    server.stop()
    try:
        degraded("Redis unreachable")
        ready = httpx.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text  # still answers: ready, and says degraded
        ready = ready.json()
        assert ready["ready"] is True and ready["store_ok"] is False
        assert "unreachable" in ready["detail"]
        assert ready["degraded"] is True and "unreachable" in ready["degraded_reason"]
        assert "default features" in ready["degraded_reason"]
    finally:
        server.start()  # same port, empty: nothing is saved
    _until(
        lambda: "no feature version" in str(_post(url, body)["degraded_reason"]),
        "reporting the empty store",
    )
    degraded("no feature version has been pushed")
    _push(server, *tables)
    _until(recovered, "recovered after the restart and a push")
    ready = httpx.get(f"{url}/readyz", timeout=10).json()
    assert ready["store_ok"] is True and ready["degraded_responses"] >= before + 4
    assert ready["degraded"] is False and ready["degraded_reason"] is None
