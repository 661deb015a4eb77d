"""The push job against a real Redis: versions, the atomic switch, clean-up, the lock, rollback."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import redis

from ranker.cli import main
from ranker.errors import StoreError
from ranker.feature_store import Keys
from tests.conftest import RedisServer
from training import push
from training.push import push_files, push_tables, rollback


def _tables(world: Path) -> dict:
    return {
        "user": (pq.read_table(world / "users.parquet"), "user_id"),
        "video": (pq.read_table(world / "videos.parquet"), "video_id"),
    }


def _versions_with_keys(client: redis.Redis, keys: Keys) -> set[str]:
    return {keys.version_of(k.decode()) for k in client.scan_iter(match=keys.scan_pattern())} - {
        None
    }


def test_each_push_switches_the_pointer_and_keeps_one_previous_version(
    redis_module: RedisServer, tiny_world: Path
) -> None:
    client, keys = redis.Redis(port=redis_module.port), Keys("t:switch")
    results = [push_tables(client, _tables(tiny_world), keys.prefix, 100, False) for _ in range(3)]
    v1, v2, v3 = (r.version for r in results)
    assert int(v1) >= time.time() - 60 and int(v2) == int(v1) + 1 and int(v3) == int(v2) + 1
    assert results[2].previous == v2 and results[2].removed == [v1]
    assert client.get(keys.current) == v3.encode() and client.get(keys.previous) == v2.encode()
    assert _versions_with_keys(client, keys) == {v2, v3}
    assert {v.decode() for v in client.zrange(keys.versions, 0, -1)} == {v2, v3}
    assert results[2].rows == {"user": 200, "video": 300}
    # one key per entity plus the meta
    assert len(list(client.scan_iter(match=f"{keys.prefix}:{v3}:*"))) == 200 + 300 + 1
    assert client.get(keys.lock) is None


def test_rerun_after_a_crash_removes_the_half_written_version(
    redis_module: RedisServer, tiny_world: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, keys = redis.Redis(port=redis_module.port), Keys("t:crash")
    v1 = push_tables(client, _tables(tiny_world), keys.prefix, 100, False).version
    real = push._write_source

    def crash(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
        real(*args, **kwargs)
        raise redis.ConnectionError("the push died half way")

    monkeypatch.setattr(push, "_write_source", crash)
    with pytest.raises(redis.ConnectionError):
        push_tables(client, _tables(tiny_world), keys.prefix, 100, False)
    assert client.get(keys.current) == v1.encode()  # readers never saw the half-written one
    v2 = client.get(keys.seq).decode()
    assert v2 in _versions_with_keys(client, keys)
    monkeypatch.setattr(push, "_write_source", real)
    r = push_tables(client, _tables(tiny_world), keys.prefix, 100, False)
    assert r.previous == v1 and r.removed == [v2]
    assert _versions_with_keys(client, keys) == {v1, r.version}


def test_a_second_push_is_refused_while_the_lock_is_held(
    redis_module: RedisServer, tiny_world: Path
) -> None:
    client, keys = redis.Redis(port=redis_module.port), Keys("t:lock")
    client.set(keys.lock, "someone-else", px=5000)
    with pytest.raises(StoreError, match=r"another push holds \{t:lock\}:lock"):
        push_tables(client, _tables(tiny_world), keys.prefix, 100, False)
    assert client.get(keys.current) is None and client.get(keys.seq) is None


def test_rollback_swaps_current_and_previous(redis_module: RedisServer, tiny_world: Path) -> None:
    url, keys = redis_module.url(), Keys("t:rollback")
    with pytest.raises(StoreError, match="nothing to roll back to"):
        rollback(url, keys.prefix)
    users, videos = tiny_world / "users.parquet", tiny_world / "videos.parquet"
    v1, v2 = (
        push_files(url, users, videos, prefix=keys.prefix, progress=False).version for _ in range(2)
    )
    assert rollback(url, keys.prefix) == (v1, v2)
    assert rollback(url, keys.prefix) == (v2, v1)


def test_cli_pushes_and_reports_throughput(
    redis_module: RedisServer, tiny_world: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["push-features", "--users", str(tiny_world / "users.parquet")]
    args += ["--videos", str(tiny_world / "videos.parquet"), "--redis-url", redis_module.url()]
    assert main([*args, "--prefix", "t:cli", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"pushed version \d+ \(200 users, 300 videos\)", out) and "rows/s" in out
    assert main([*args, "--prefix", "bad prefix*", "--quiet"]) == 2
    assert "prefix" in capsys.readouterr().err
    missing = ["push-features", "--users", "/nonexistent.parquet", "--videos", "/x.parquet"]
    assert main([*missing, "--redis-url", redis_module.url(), "--quiet"]) == 2
    assert "cannot read user table" in capsys.readouterr().err
