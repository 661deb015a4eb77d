"""An artifact carries a ranking config that fits its heads: a model without a ``rating`` head
(as ``configs/kuairand.toml`` trains) is evaluated and served with no ranking config given."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ranker.artifact import load_artifact
from tests.conftest import DEFAULT_CONFIG, RANKING_CONFIG, ROOT, tiny_overrides
from tests.service.conftest import run_service
from tests.service.test_rank_http import sample_request

pytestmark = pytest.mark.slow


def ranker(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RANKER_")}
    return subprocess.run(
        [sys.executable, "-m", "ranker", *args], cwd=ROOT, capture_output=True, text=True, env=env
    )


def without_rating(text: str) -> str:
    """The default config minus its rating head and its [ranking] section (derived weights)."""
    text = re.sub(r'\[\[tasks\]\]\nname = "rating".*?\n\n', "", text, flags=re.S)
    text = text.split("# The ranking formula the artifact carries")[0]
    assert "rating" not in text.split("[[tasks]]", 1)[1] and "[ranking" not in text
    return text


@pytest.fixture(scope="module")
def no_rating_artifact(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("norating")
    cfg = tmp / "norating.toml"
    cfg.write_text(without_rating(DEFAULT_CONFIG.read_text()))
    over = [*tiny_overrides(tiny_world, tmp), "training.epochs=1"]
    r = ranker("train", "--quiet", "--config", str(cfg), *[a for o in over for a in ("--set", o)])
    assert r.returncode == 0, r.stderr[-3000:]
    (version,) = (tmp / "artifacts" / "default").iterdir()
    return version


def test_the_artifact_carries_a_ranking_that_fits_its_heads(no_rating_artifact: Path) -> None:
    art = load_artifact(no_rating_artifact)
    assert set(art.ranking.heads) == {"click", "watch_time", "like"}
    assert art.ranking.heads["watch_time"].transform == "log1p"
    assert "ranking.json" in art.manifest["files"]


def test_evaluate_without_a_ranking_config_uses_the_artifacts(no_rating_artifact: Path) -> None:
    r = ranker("evaluate", "--quiet", "--json", "--artifact", str(no_rating_artifact))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ranking score vs logged utility: ndcg@10" in r.stdout
    out = json.loads(r.stdout[r.stdout.index("{\n") :])
    assert out["ranking_score_logged"]["ndcg@10"] > 0 and out["ranking_score_missing"] is None


def test_evaluate_with_an_unfitting_ranking_config_still_reports_every_head(
    no_rating_artifact: Path,
) -> None:
    r = ranker(
        "evaluate",
        "--quiet",
        "--artifact",
        str(no_rating_artifact),
        "--ranking",
        str(RANKING_CONFIG),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for head in ("click", "watch_time", "like"):
        assert re.search(rf"^{head}\s", r.stdout, re.M), r.stdout
    assert "no ranking score: ranking config names head(s) ['rating']" in r.stdout


def test_the_service_serves_it_with_no_ranking_config(
    no_rating_artifact: Path, tiny_world: Path
) -> None:
    assert "RANKER_RANKING_CONFIG" not in os.environ
    with run_service({"RANKER_ARTIFACT": str(no_rating_artifact)}) as url:
        r = httpx.post(f"{url}/v1/rank", json=sample_request(tiny_world, 20), timeout=10)
        assert r.status_code == 200, r.text
        out = r.json()
    assert out["ranking_version"] == load_artifact(no_rating_artifact).ranking.version
    scores = [i["score"] for i in out["items"]]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) > 1
    assert set(out["items"][0]["predictions"]) == {"click", "watch_time", "like"}


def test_reload_without_a_ranking_file_brings_the_new_models_own(
    no_rating_artifact: Path, tiny_artifact: Path, tiny_world: Path, tmp_path: Path
) -> None:
    """Serving the 4-head model, a 3-head one arrives: with no ranking file its own ranking
    comes with it (a fixed file naming ``rating`` would refuse it)."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings
    from tests.service.test_reload import AUTH, TOKEN, publish, rank_body

    root = tmp_path / "artifacts"
    root.mkdir()
    publish(root, tiny_artifact, "20300101T000000-base")
    settings = Settings(artifact=root, threads=1, admin_token=TOKEN)
    assert settings.ranking_config is None
    with TestClient(create_app(settings)) as c:
        before = c.post("/v1/rank", json=rank_body(tiny_world)).json()
        assert before["ranking_version"] == load_artifact(tiny_artifact).ranking.version
        publish(root, no_rating_artifact, "20300101T000001-next")
        r = c.post("/admin/reload", headers=AUTH)
        assert r.status_code == 200 and r.json()["error"] is None, r.text
        after = c.post("/v1/rank", json=rank_body(tiny_world)).json()
    assert after["model_version"] == "20300101T000001-next"
    assert after["ranking_version"] == load_artifact(no_rating_artifact).ranking.version
    assert set(after["items"][0]["predictions"]) == {"click", "watch_time", "like"}


def test_tune_without_a_ranking_config_starts_from_the_artifacts(
    no_rating_artifact: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tune"
    args = ["--maximize", "watch_time@10", "--samples", "40", "--refine", "8"]
    r = ranker("tune", "--quiet", "--artifact", str(no_rating_artifact), "--out", str(out), *args)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert "the artifact's own" in json.dumps(summary)
    assert "rating" not in (out / "ranking.toml").read_text()
