"""The shadow model on the real service (uvicorn, HTTP): its agreement metrics, that it never
delays a response, and that a shadow which fails to load or to score never affects serving."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.launch import ROOT, free_port, wait_until_ready
from tests.service.conftest import run_service
from tests.service.test_observability import rank_body, scrape, value

pytestmark = pytest.mark.slow

TASKS = ["click", "watch_time", "like", "rating"]


def _until(check: Callable[[], object], timeout: float = 60.0) -> object:
    """Polls ``check`` until it returns something truthy; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout:.0f} s")
        time.sleep(0.05)
    return result


def _settled(url: str) -> dict:
    """``/readyz`` once the shadow has finished loading (ready or failed)."""

    def check() -> dict | None:
        body = httpx.get(f"{url}/readyz", timeout=10).json()
        return body if body["shadow_state"] != "loading" else None

    return _until(check)  # type: ignore[return-value]


def _env(artifact: Path, shadow: Path | str, **extra: str) -> dict[str, str]:
    return {
        "RANKER_ARTIFACT": str(artifact),
        "RANKER_SHADOW_ARTIFACT": str(shadow),
        "RANKER_SHADOW_SAMPLE": "1",
    } | extra


def test_a_shadow_of_the_served_model_agrees_exactly(tiny_artifact: Path, tiny_world: Path) -> None:
    """The served artifact as its own shadow: the same features and weights, so every request
    shows Spearman 1, top-10 overlap 1 and no mean shift on any head."""
    with run_service(_env(tiny_artifact, tiny_artifact)) as url:
        ready = _settled(url)
        assert ready["shadow_state"] == "ready" and ready["shadow_error"] is None
        assert ready["shadow_version"] == ready["model_version"]
        n = 6
        for user in range(n):
            r = httpx.post(f"{url}/v1/rank", json=rank_body(tiny_world, 30, user), timeout=30)
            assert r.status_code == 200

        def all_scored() -> dict | None:
            m = scrape(url)
            return m if value(m, "ranker_shadow_requests_total", outcome="scored") == n else None

        m = _until(all_scored)
        assert value(m, "ranker_shadow_spearman_count") == n
        assert value(m, "ranker_shadow_spearman_sum") == pytest.approx(n)
        assert value(m, "ranker_shadow_top10_overlap_sum") == pytest.approx(n)
        for head in TASKS:
            assert value(m, "ranker_shadow_head_mean_shift_count", head=head) == n
            assert abs(value(m, "ranker_shadow_head_mean_shift_sum", head=head)) < 1e-9
        assert value(m, "ranker_shadow_up") == 1
        assert value(m, "ranker_shadow_requests_total", outcome="failed") == 0


def _republish(src: Path, dst: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of ``src`` whose ``encoder.json`` ``edit`` changes, with its checksum updated:
    a valid artifact that encodes features differently."""
    shutil.copytree(src, dst)
    encoder = json.loads((dst / "encoder.json").read_text())
    edit(encoder)
    (dst / "encoder.json").write_text(json.dumps(encoder))
    manifest = json.loads((dst / "manifest.json").read_text())
    digest = hashlib.sha256((dst / "encoder.json").read_bytes()).hexdigest()
    manifest["files"]["encoder.json"] = digest
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _shift_a_mean(encoder: dict) -> None:
    name = next(iter(encoder["stats"]))
    encoder["stats"][name]["mean"] += 1.0


def _corrupt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize(
    ("broken", "error"),
    [
        (lambda src, tmp: tmp / "no-such-artifact", "does not exist"),
        (lambda src, tmp: _corrupt(src, tmp / "corrupt"), "checksum mismatch"),
        (
            lambda src, tmp: _republish(src, tmp / "other", _shift_a_mean),
            "incompatible features",
        ),
    ],
    ids=["missing", "corrupt", "incompatible"],
)
def test_a_shadow_that_fails_to_load_never_affects_serving(
    broken: Callable[[Path, Path], Path],
    error: str,
    tiny_artifact: Path,
    tiny_world: Path,
    tmp_path: Path,
) -> None:
    shadow = broken(tiny_artifact, tmp_path)
    with run_service(_env(tiny_artifact, shadow)) as url:
        for user in range(5):  # while it loads, and after it failed: 200s throughout
            r = httpx.post(f"{url}/v1/rank", json=rank_body(tiny_world, 20, user), timeout=30)
            assert r.status_code == 200, r.text
        ready = _settled(url)
        assert ready["ready"] is True and ready["shadow_state"] == "failed"
        assert error in ready["shadow_error"] and ready["shadow_version"] is None
        assert str(tmp_path) not in ready["shadow_error"]  # named, not the machine's path
        r = httpx.post(f"{url}/v1/rank", json=rank_body(tiny_world, 20, 9), timeout=30)
        assert r.status_code == 200
        m = scrape(url)
        assert value(m, "ranker_shadow_load_failures_total") == 1
        assert value(m, "ranker_shadow_up") == 0
        assert value(m, "ranker_shadow_requests_total", outcome="scored") == 0


BLOCKING_SERVE = """
import sys, time
from pathlib import Path
import service.shadow as shadow

started, release, port = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
score = shadow.Shadow._score

def blocking_score(self, job):
    started.touch()
    while not release.exists():  # the shadow's work lasts until the test says so
        time.sleep(0.01)
    score(self, job)

shadow.Shadow._score = blocking_score
from ranker.cli import main
sys.exit(main(["serve", "--host", "127.0.0.1", "--port", port]))
"""


@contextmanager
def _blocking_service(env: dict[str, str], tmp: Path) -> Iterator[tuple[str, Path, Path]]:
    """The real service (``ranker serve``, uvicorn) whose shadow blocks in each request's
    scoring until the file ``release`` exists; ``started``: a request's scoring began."""
    script, started, release = tmp / "serve.py", tmp / "started", tmp / "release"
    script.write_text(BLOCKING_SERVE)
    port = free_port()
    log = tmp / "serve.log"
    full = os.environ | {"RANKER_THREADS": "1", "RANKER_BACKEND": "eager"} | env
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(started), str(release), str(port)],
            cwd=ROOT,
            env=full | {"PYTHONPATH": str(ROOT)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, proc, 60, log)
        yield url, started, release
    finally:
        release.touch()
        proc.terminate()
        proc.wait(timeout=15)


def test_the_shadow_never_delays_a_response(
    tiny_artifact: Path, tiny_world: Path, tmp_path: Path
) -> None:
    """The shadow's scoring blocks until the test releases it: every response arrives while
    it is blocked (an inline shadow would never answer), requests beyond its queue are dropped
    and counted, and the queued ones are scored once it is released."""
    env = _env(tiny_artifact, tiny_artifact, RANKER_SHADOW_QUEUE="2")
    with (
        _blocking_service(env, tmp_path) as (url, started, release),
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        assert _settled(url)["shadow_state"] == "ready"
        r = client.post("/v1/rank", json=rank_body(tiny_world, 20, 1))
        assert r.status_code == 200  # answered ...
        _until(started.exists)  # ... and the shadow got to work on it after that
        assert not release.exists()
        for user in range(2, 10):  # one in the shadow, 2 queued, 6 dropped: all answered
            assert client.post("/v1/rank", json=rank_body(tiny_world, 20, user)).status_code == 200

        def counts() -> tuple[float, float]:
            m = scrape(url)
            return tuple(  # type: ignore[return-value]
                value(m, "ranker_shadow_requests_total", outcome=o) for o in ("scored", "dropped")
            )

        _until(lambda: counts() == (0, 6))
        assert client.get("/readyz").json()["shadow_state"] == "ready"
        release.touch()
        _until(lambda: counts() == (3, 6))


def test_a_shadow_that_fails_to_score_is_counted_and_serving_goes_on(tiny_artifact: Path) -> None:
    """A forward pass that raises in the shadow: counted as failed, the error kept for
    ``/readyz``, the shadow's thread still takes the next request."""
    from ranker.scoring import RankingFormula
    from service.engine import ServingModel, rank
    from service.settings import Settings
    from service.shadow import Shadow

    settings = Settings(
        artifact=tiny_artifact,
        backend="eager",
        threads=1,
        shadow_artifact=tiny_artifact,
        shadow_sample=1.0,
    )
    served = ServingModel.load(settings)
    formula = RankingFormula(served.artifact.ranking, served.artifact.config.task_names)
    registry = CollectorRegistry()
    shadow = Shadow(settings, registry)
    shadow.start(lambda: served)
    _until(lambda: shadow.state != "loading")
    assert shadow.state == "ready" and shadow.sampled()
    assert shadow.model is not None and shadow.metrics is not None
    good = shadow.model.predictor.predict

    def broken(rows):  # noqa: ANN001, ANN202
        raise RuntimeError("shadow kernel fault")

    shadow.model.predictor.predict = broken  # type: ignore[method-assign]
    ids = np.arange(1, 16, dtype=np.int64)
    ranked = asyncio.run(rank(served, formula, 1, {}, ids, None))
    asyncio.run(shadow.offer(ranked, served, formula))

    def count(outcome: str) -> float | None:
        return registry.get_sample_value("ranker_shadow_requests_total", {"outcome": outcome})

    _until(lambda: count("failed") == 1)
    assert "RuntimeError: shadow kernel fault" in (shadow.error or "")
    shadow.model.predictor.predict = good  # type: ignore[method-assign]
    asyncio.run(shadow.offer(ranked, served, formula))
    _until(lambda: count("scored") == 1)
    assert count("failed") == 1
    shadow.stop()
