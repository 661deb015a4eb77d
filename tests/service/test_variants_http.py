"""Variants of the ranking score on the real service (uvicorn, HTTP): the response and the
metrics carry the variant, two processes assign every user alike, a bad declaration is refused
on reload while the old one serves."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
import pytest

from ranker.scoring import RankingFormula, load_ranking_config
from ranker.variants import CONTROL
from tests.conftest import RANKING_CONFIG
from tests.service.conftest import run_service
from tests.service.test_observability import rank_body, scrape, value
from tests.service.test_reload import AUTH, TOKEN

pytestmark = pytest.mark.slow

TASKS = ["click", "watch_time", "like", "rating"]
VARIANTS = """
[[variants]]
name = "clicks"
share = 0.35

[variants.heads.click]
weight = 1.0

[[variants]]
name = "likes"
share = 0.25

[variants.heads.like]
weight = 1.0
"""


def _config(tmp_path: Path, salt: str = "http-test") -> Path:
    """The shipped weights as control, with two variants; the salt is a top-level key, so it
    goes before the first table."""
    path = tmp_path / "ranking.toml"
    path.write_text(f'salt = "{salt}"\n' + RANKING_CONFIG.read_text() + VARIANTS)
    return path


def test_two_processes_assign_alike_and_score_with_the_variant_weights(
    tiny_artifact: Path, tiny_world: Path, tmp_path: Path
) -> None:
    ranking = _config(tmp_path)
    formula = RankingFormula(load_ranking_config(ranking), TASKS)
    env = {"RANKER_ARTIFACT": str(tiny_artifact), "RANKER_RANKING_CONFIG": str(ranking)}
    users = [*range(60), 2**63 - 1, -(2**63), -5]
    body = rank_body(tiny_world, 12)
    with ExitStack() as stack:
        urls = [stack.enter_context(run_service(env)) for _ in range(2)]
        seen: list[list[str]] = []
        for url in urls:
            arms = []
            with httpx.Client(base_url=url, timeout=30) as client:
                for user in users:
                    r = client.post("/v1/rank", json=body | {"user_id": user})
                    assert r.status_code == 200, r.text
                    out = r.json()
                    arms.append(out["variant"])
                    # the score is the variant's formula of the returned predictions
                    preds = {
                        t: np.array([i["predictions"][t] for i in out["items"]]) for t in TASKS
                    }
                    scores = np.array([i["score"] for i in out["items"]])
                    assert np.allclose(scores, formula.score(preds, out["variant"]), rtol=1e-6)
                ready = client.get("/readyz").json()
                assert ready["variants"] == [CONTROL, "clicks", "likes"]
            seen.append(arms)
            metrics = scrape(url)
            for arm in (CONTROL, "clicks", "likes"):
                assert value(metrics, "ranker_variant_requests_total", variant=arm) == arms.count(
                    arm
                )
        assert seen[0] == seen[1] == [formula.assign(u) for u in users]
        assert set(seen[0]) == {CONTROL, "clicks", "likes"}


def test_no_variants_declared_means_variant_null(service_url: str, tiny_world: Path) -> None:
    r = httpx.post(f"{service_url}/v1/rank", json=rank_body(tiny_world, 5), timeout=30)
    assert r.status_code == 200 and r.json()["variant"] is None
    assert httpx.get(f"{service_url}/readyz", timeout=10).json()["variants"] == []


def test_a_bad_declaration_is_refused_on_reload_while_the_old_one_serves(
    tiny_artifact: Path, tiny_world: Path, tmp_path: Path
) -> None:
    ranking = _config(tmp_path)
    env = {
        "RANKER_ARTIFACT": str(tiny_artifact),
        "RANKER_RANKING_CONFIG": str(ranking),
        "RANKER_ADMIN_TOKEN": TOKEN,
    }
    body = rank_body(tiny_world, 5) | {"user_id": 3}
    with run_service(env) as url, httpx.Client(base_url=url, timeout=30) as client:
        before = client.post("/v1/rank", json=body).json()
        ranking.write_text(ranking.read_text().replace("share = 0.25", "share = 0.75"))
        r = client.post("/admin/reload", headers=AUTH)
        assert r.status_code == 409
        assert (
            "variants: shares sum to 1.1 (clicks 0.35, likes 0.75); at most 1" in r.json()["error"]
        )
        after = client.post("/v1/rank", json=body).json()
        assert after["ranking_version"] == before["ranking_version"]
        assert after["variant"] == before["variant"]
        ready = client.get("/readyz").json()
        assert "shares sum to 1.1" in ready["last_reload_error"]
        # a valid change is taken: a new salt reshuffles users
        _config(tmp_path, salt="next")
        assert client.post("/admin/reload", headers=AUTH).status_code == 200
        formula = RankingFormula(load_ranking_config(ranking), TASKS)
        arms = [
            client.post("/v1/rank", json=body | {"user_id": u}).json()["variant"] for u in range(20)
        ]
        assert arms == [formula.assign(u) for u in range(20)]
