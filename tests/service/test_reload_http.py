"""Hot reload on the real service (uvicorn, HTTP): what ``/readyz`` and ``/admin/reload`` say
about refused versions, and what refusing an oversized one costs the process."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.launch import Running, serve
from tests.conftest import RANKING_CONFIG
from tests.ranker.test_artifact import inflate
from tests.service.test_reload import AUTH, BASE, TOKEN, publish

pytestmark = pytest.mark.slow


@pytest.fixture
def root(tmp_path: Path, tiny_artifact: Path) -> Path:
    root = tmp_path / "machine-specific" / "artifacts"
    root.mkdir(parents=True)
    publish(root, tiny_artifact, BASE)
    return root


@pytest.fixture
def service(root: Path) -> Iterator[Running]:
    env = {
        "RANKER_ARTIFACT": str(root),
        "RANKER_RANKING_CONFIG": str(RANKING_CONFIG),
        "RANKER_ADMIN_TOKEN": TOKEN,
        "RANKER_THREADS": "1",
        "RANKER_MAX_MODEL_PARAMETERS": "1000000",
    }
    with serve(env) as running:
        yield running


def reload(s: Running, **body: str) -> httpx.Response:
    return httpx.post(f"{s.url}/admin/reload", headers=AUTH, json=body or None, timeout=60)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_readyz_names_the_version_and_file_not_the_path(
    service: Running, root: Path, tiny_artifact: Path
) -> None:
    publish(root, tiny_artifact, "20300101T000001-bad", corrupt=True)
    r = reload(service)
    assert r.status_code == 409
    for error in (
        r.json()["error"],
        httpx.get(f"{service.url}/readyz").json()["last_reload_error"],
    ):
        assert "version 20300101T000001-bad" in error and "model.safetensors" in error, error
        assert str(root) not in error and "machine-specific" not in error and "/" not in error
    shutil.rmtree(root)  # the root vanishes: named by its setting, not its path
    error = reload(service).json()["error"]
    assert "RANKER_ARTIFACT" in error and "/" not in error, error


def test_a_refused_pinned_version_is_not_shown_as_pinned(
    service: Running, root: Path, tiny_artifact: Path
) -> None:
    publish(root, tiny_artifact, "20300101T000001-bad", corrupt=True)
    r = reload(service, version="20300101T000001-bad")
    assert r.status_code == 409 and r.json()["model_version"] == BASE
    assert r.json()["pinned_version"] is None
    ready = httpx.get(f"{service.url}/readyz").json()
    assert ready["pinned_version"] is None and ready["model_version"] == BASE
    assert reload(service, version=BASE).json()["pinned_version"] == BASE  # one that serves
    r = reload(service, version="20300101T000001-bad")
    assert r.status_code == 409 and r.json()["pinned_version"] == BASE  # the earlier pin holds


def test_an_oversized_model_is_refused_before_it_is_built(
    service: Running, root: Path, tiny_artifact: Path
) -> None:
    big = publish(root, tiny_artifact, "20300101T000001-big")
    inflate(big, 400_000)  # 43M parameters, about 165 MiB of float32
    before = peak_rss_mib(service.proc.pid)
    r = reload(service)
    assert r.status_code == 409, r.text
    assert "RANKER_MAX_MODEL_PARAMETERS" in r.json()["error"] and "1,000,000" in r.json()["error"]
    assert r.json()["model_version"] == BASE
    grew = peak_rss_mib(service.proc.pid) - before
    assert grew < 60, f"peak RSS grew by {grew:.0f} MiB refusing it"
