"""Hot reload: new artifact versions and ranking configs are loaded, checked, warmed and swapped
in; corrupt or unfit ones are refused while the old ones serve on; admin access needs the token."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from service.app import create_app
from service.settings import Settings
from tests.conftest import RANKING_CONFIG, RedisServer
from tests.service.conftest import run_service
from training.push import push_files

pytestmark = pytest.mark.slow

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BASE = "20300101T000000-base"


def publish(root: Path, src: Path, name: str, corrupt: bool = False) -> Path:
    """A copy of the version ``src`` named ``name`` (its manifest says so), moved into ``root``
    in one rename as ``save_artifact`` does; ``corrupt`` flips one byte of the weights."""
    tmp = root / f".tmp-{name}"
    shutil.copytree(src, tmp)
    manifest = json.loads((tmp / "manifest.json").read_text())
    manifest["version"] = name
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    if corrupt:
        weights = tmp / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    os.rename(tmp, root / name)
    return root / name


def rank_body(world: Path, n: int = 20) -> dict:
    videos = pq.read_table(world / "videos.parquet").column("video_id").to_numpy()
    users = pq.read_table(world / "users.parquet").column("user_id").to_numpy()
    return {
        "user_id": int(users[0]),
        "context": {"device": "ios", "hour": 20},
        "candidates": [{"video_id": int(v)} for v in videos[:n]],
    }


def until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout} s")
        time.sleep(0.05)


@pytest.fixture
def root(tmp_path: Path, tiny_artifact: Path) -> Path:
    """An artifact root holding one version of the tiny model."""
    root = tmp_path / "artifacts"
    root.mkdir()
    publish(root, tiny_artifact, BASE)
    return root


@pytest.fixture
def ranking(tmp_path: Path) -> Path:
    path = tmp_path / "ranking.toml"
    shutil.copy(RANKING_CONFIG, path)
    return path


def client(root: Path, ranking: Path, **settings: object) -> TestClient:
    return TestClient(
        create_app(Settings(artifact=root, ranking_config=ranking, threads=1, **settings))
    )


@pytest.fixture
def admin(root: Path, ranking: Path) -> Iterator[TestClient]:
    """The app in process (lifespan run), with an admin token and no polling."""
    with client(root, ranking, admin_token=TOKEN) as c:
        yield c


def test_admin_endpoints_are_404_without_a_token(root: Path, ranking: Path) -> None:
    with client(root, ranking) as c:
        r = c.post("/admin/reload", headers=AUTH)
        assert r.status_code == 404 and r.json() == {"detail": "Not Found"}


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}]
)
def test_admin_reload_refuses_a_missing_or_wrong_token(admin: TestClient, headers: dict) -> None:
    r = admin.post("/admin/reload", headers=headers)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"


def test_admin_reload_loads_the_newest_version(
    admin: TestClient, root: Path, tiny_artifact: Path, tiny_world: Path
) -> None:
    r = admin.post("/admin/reload", headers=AUTH)
    assert r.status_code == 200 and r.json()["model_changed"] is False
    publish(root, tiny_artifact, "20300101T000001-next")
    r = admin.post("/admin/reload", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == "20300101T000001-next" and r.json()["model_changed"]
    out = admin.post("/v1/rank", json=rank_body(tiny_world)).json()
    assert out["model_version"] == "20300101T000001-next"
    ready = admin.get("/readyz").json()
    assert ready["reloads"] == 1 and ready["last_reload_error"] is None


def test_corrupt_artifact_is_refused_and_the_old_one_serves(
    admin: TestClient, root: Path, tiny_artifact: Path, tiny_world: Path
) -> None:
    publish(root, tiny_artifact, "20300101T000001-bad", corrupt=True)
    r = admin.post("/admin/reload", headers=AUTH)
    assert r.status_code == 409, r.text
    assert "checksum mismatch for model.safetensors" in r.json()["error"]
    assert r.json()["model_version"] == BASE
    ready = admin.get("/readyz").json()
    assert "checksum mismatch" in ready["last_reload_error"] and ready["model_version"] == BASE
    assert admin.post("/v1/rank", json=rank_body(tiny_world)).json()["model_version"] == BASE
    # Removing the broken version: the newest is what serves again, the error goes.
    shutil.rmtree(root / "20300101T000001-bad")
    assert admin.post("/admin/reload", headers=AUTH).status_code == 200
    assert admin.get("/readyz").json()["last_reload_error"] is None


def test_weights_that_pass_the_checksums_but_predict_nan_are_refused(
    admin: TestClient, root: Path, tiny_artifact: Path
) -> None:
    bad = publish(root, tiny_artifact, "20300101T000001-nan")
    state = load_file(str(bad / "model.safetensors"))
    name = next(k for k in state if k.endswith("weight") and "tower" in k)
    state[name].fill_(float("nan"))
    save_file(state, str(bad / "model.safetensors"))
    manifest = json.loads((bad / "manifest.json").read_text())
    import hashlib

    digest = hashlib.sha256((bad / "model.safetensors").read_bytes()).hexdigest()
    manifest["files"]["model.safetensors"] = digest
    (bad / "manifest.json").write_text(json.dumps(manifest))
    r = admin.post("/admin/reload", headers=AUTH)
    assert r.status_code == 409 and "non-finite" in r.json()["error"], r.text
    assert r.json()["model_version"] == BASE


@pytest.mark.parametrize(
    ("version", "status"),
    [("../x", 422), ("/etc", 422), ("a/b", 422), ("..", 422), ("nope", 422), ("", 422)],
)
def test_version_names_resolve_only_inside_the_root(
    admin: TestClient, version: str, status: int
) -> None:
    r = admin.post("/admin/reload", headers=AUTH, json={"version": version})
    assert r.status_code == status, r.text
    assert "version" in r.text
    assert admin.get("/readyz").json()["model_version"] == BASE


def test_a_version_linked_from_outside_the_root_is_refused(
    admin: TestClient, root: Path, tiny_artifact: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    target = publish(outside, tiny_artifact, "20300101T000001-out")
    (root / "20300101T000001-out").symlink_to(target, target_is_directory=True)
    r = admin.post("/admin/reload", headers=AUTH)
    assert r.status_code == 409 and "outside the artifact root" in r.json()["error"], r.text
    assert r.json()["model_version"] == BASE


def test_a_pinned_version_holds_until_a_plain_reload(
    admin: TestClient, root: Path, tiny_artifact: Path
) -> None:
    publish(root, tiny_artifact, "20300101T000001-next")
    assert admin.post("/admin/reload", headers=AUTH).json()["model_version"].endswith("next")
    r = admin.post("/admin/reload", headers=AUTH, json={"version": BASE})  # a rollback
    assert r.status_code == 200 and r.json()["model_version"] == BASE
    assert r.json()["pinned_version"] == BASE
    assert admin.get("/readyz").json()["pinned_version"] == BASE
    reloader = admin.app.state.reloader
    assert admin.portal.call(reloader.reload, None, False).model_version == BASE  # a poll
    r = admin.post("/admin/reload", headers=AUTH)
    assert r.json()["model_version"].endswith("next") and r.json()["pinned_version"] is None


def test_ranking_config_is_polled_and_an_invalid_one_is_refused(
    root: Path, ranking: Path, tiny_world: Path
) -> None:
    with client(root, ranking, reload_interval_s=0.05) as c:

        def ready() -> dict:
            return c.get("/readyz").json()

        first = ready()["ranking_version"]
        # the like head's weight, whatever configs/ranking.toml ships, becomes 2.0
        text = re.sub(r"(\[heads\.like\]\nweight = )[^\n]+", r"\g<1>2.0", ranking.read_text())
        assert text != ranking.read_text() and text.count("weight = 2.0") == 1
        ranking.write_text(text)
        until(lambda: ready()["ranking_version"] != first, "the new weights served")
        second = ready()["ranking_version"]
        assert c.post("/v1/rank", json=rank_body(tiny_world)).json()["ranking_version"] == second
        good = ranking.read_text()
        ranking.write_text(good.replace("weight = 2.0", 'weight = "heavy"'))
        until(lambda: ready()["last_reload_error"] is not None, "the invalid config reported")
        assert "heads.like.weight" in ready()["last_reload_error"]
        assert ready()["ranking_version"] == second
        ranking.write_text(good.replace("[heads.like]", "[heads.share]"))  # no such head
        until(lambda: "share" in (ready()["last_reload_error"] or ""), "the unknown head refused")
        assert ready()["ranking_version"] == second
        ranking.write_text(good)
        until(lambda: ready()["last_reload_error"] is None, "the error cleared")
        assert ready()["ranking_version"] == second and ready()["model_version"] == BASE


def test_reloads_under_load_drop_no_request(
    root: Path, ranking: Path, tiny_artifact: Path, tiny_world: Path, tmp_path: Path
) -> None:
    """The real service under 4 client threads: a good version by the poll, a corrupt one
    (refused), then a good one by the admin endpoint; every request answers 200, and each
    thread sees versions only move forward."""
    env = {
        "RANKER_ARTIFACT": str(root),
        "RANKER_RANKING_CONFIG": str(ranking),
        "RANKER_RELOAD_INTERVAL_S": "0.2",
        "RANKER_ADMIN_TOKEN": TOKEN,
    }
    body = rank_body(tiny_world)
    stop = threading.Event()
    seen: list[list[str]] = [[] for _ in range(4)]
    failures: list[str] = []

    def load(i: int, url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            while not stop.is_set():
                try:
                    r = http.post("/v1/rank", json=body)
                except httpx.HTTPError as e:
                    failures.append(f"{type(e).__name__}: {e}")
                    continue
                if r.status_code != 200:
                    failures.append(f"{r.status_code}: {r.text[:200]}")
                else:
                    seen[i].append(r.json()["model_version"])

    with run_service(env, log_path=tmp_path / "service.log") as url:
        threads = [threading.Thread(target=load, args=(i, url)) for i in range(4)]
        for t in threads:
            t.start()
        try:

            def ready() -> dict:
                return httpx.get(f"{url}/readyz", timeout=10).json()

            def served(version: str) -> bool:
                return all(s and s[-1] == version for s in seen)

            until(lambda: served(BASE), "the first version served")
            publish(root, tiny_artifact, "20300101T000001-good")
            until(lambda: served("20300101T000001-good"), "the poll's reload served")
            publish(root, tiny_artifact, "20300101T000002-bad", corrupt=True)
            until(lambda: ready()["last_reload_error"] is not None, "the corrupt one refused")
            assert "checksum mismatch" in ready()["last_reload_error"]
            assert ready()["model_version"] == "20300101T000001-good"
            publish(root, tiny_artifact, "20300101T000003-good")
            r = httpx.post(f"{url}/admin/reload", headers=AUTH, timeout=30)
            assert r.status_code == 200 and r.json()["model_version"] == "20300101T000003-good"
            until(lambda: served("20300101T000003-good"), "the admin reload served")
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
    assert failures == []
    order = [BASE, "20300101T000001-good", "20300101T000003-good"]
    for versions in seen:
        ranks = [order.index(v) for v in versions]
        assert ranks == sorted(ranks), "a thread saw an older version after a newer one"
    assert sum(map(len, seen)) > 20


def test_a_reload_on_redis_keeps_the_pool_and_decodes_with_the_new_encoder(
    redis_module: RedisServer, root: Path, ranking: Path, tiny_artifact: Path, tiny_world: Path
) -> None:
    push_files(
        redis_module.url(),
        tiny_world / "users.parquet",
        tiny_world / "videos.parquet",
        progress=False,
    )
    settings = {"admin_token": TOKEN, "redis_url": redis_module.url(), "redis_timeout_ms": 1000}
    with client(root, ranking, **settings) as c:
        body = rank_body(tiny_world)
        first = c.post("/v1/rank", json=body).json()
        assert first["degraded"] is False and first["user_known"] is True
        before = c.app.state.serving.model.store
        publish(root, tiny_artifact, "20300101T000001-next")
        assert c.post("/admin/reload", headers=AUTH).status_code == 200
        after = c.app.state.serving.model.store
        assert after is not before and after.client is before.client  # one connection pool
        assert after.encoder is c.app.state.serving.model.artifact.encoder
        out = c.post("/v1/rank", json=body).json()
        assert out["degraded"] is False and out["model_version"] == "20300101T000001-next"
        assert out["items"] == first["items"]  # the same weights, read through the new store


def test_a_half_copied_version_is_refused_then_loaded_once_complete(
    root: Path, ranking: Path, tiny_artifact: Path
) -> None:
    """A copy that is not renamed into place (``cp -r`` straight into the root) is seen before
    its weights arrive: refused, then tried again by the poll once its files change."""
    with client(root, ranking, reload_interval_s=0.05) as c:

        def ready() -> dict:
            return c.get("/readyz").json()

        partial = root / "20300101T000001-copy"
        partial.mkdir()
        for f in ("manifest.json", "config.json", "encoder.json", "ranking.json"):
            shutil.copy(tiny_artifact / f, partial / f)
        until(lambda: ready()["last_reload_error"] is not None, "the partial copy refused")
        assert "model.safetensors is missing" in ready()["last_reload_error"]
        for f in ("model.safetensors", "samples.safetensors"):
            shutil.copy(tiny_artifact / f, partial / f)
        version = json.loads((tiny_artifact / "manifest.json").read_text())["version"]
        until(lambda: ready()["model_version"] == version, "the completed copy served")
        assert ready()["last_reload_error"] is None


def test_a_vanished_artifact_root_keeps_the_model_serving(
    root: Path, ranking: Path, tiny_world: Path
) -> None:
    with client(root, ranking, admin_token=TOKEN) as c:
        moved = root.rename(root.with_name("elsewhere"))
        r = c.post("/admin/reload", headers=AUTH)
        assert r.status_code == 409 and "does not exist" in r.json()["error"]
        assert c.post("/v1/rank", json=rank_body(tiny_world)).json()["model_version"] == BASE
        moved.rename(root)
        assert c.post("/admin/reload", headers=AUTH).status_code == 200
