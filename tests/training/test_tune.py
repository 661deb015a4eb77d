"""`ranker tune`: known optima on constructed data, the written config, the command end to end."""

import json
from pathlib import Path

import numpy as np
import pytest

from ranker.cli import main
from ranker.config import TaskSpec
from ranker.scoring import HeadWeight, RankingConfig, RankingFormula, load_ranking_config
from service.engine import load_formula
from tests.conftest import RANKING_CONFIG
from training.evaluate import Predictions
from training.listwise import RequestGroups, topk_sums, topk_sums_linear
from training.tune import (
    TuneError,
    list_metrics,
    pareto_front,
    score_terms,
    tune_predictions,
    write_ranking_config,
)

TASKS = [
    TaskSpec(name="watch_time", kind="regression", label="watch_time", loss="mse", unit="seconds"),
    TaskSpec(name="like", kind="binary", label="like", loss="bce"),
]
CURRENT = RankingConfig(
    heads={"watch_time": HeadWeight(weight=0.01), "like": HeadWeight(weight=1.0)}
)


def constructed(anti: bool, n_req: int = 80, size: int = 8, seed: int = 0) -> Predictions:
    """Lists of ``size`` items. The watch_time head orders watch time perfectly. With ``anti``
    the like head orders likes perfectly and likes fall as watch time rises; without, the like
    head is noise and likes are independent of everything."""
    rng = np.random.default_rng(seed)
    n = n_req * size
    watch = rng.exponential(100.0, n)
    if anti:
        p_like = 1.0 / (1.0 + np.exp((watch - 100.0) / 40.0))
        likes = (rng.random(n) < p_like).astype(float)
        like_pred = np.clip(p_like + rng.normal(0, 1e-3, n), 1e-4, 1 - 1e-4)
        like_pred = np.where(likes == 1, np.maximum(like_pred, 0.5), np.minimum(like_pred, 0.49))
    else:
        likes = (rng.random(n) < 0.3).astype(float)
        like_pred = rng.random(n)
    requests = np.repeat(np.arange(n_req) * 7 + 3, size)
    return Predictions(
        preds={"watch_time": watch.copy(), "like": like_pred},
        labels={"watch_time": watch, "like": likes},
        masks={"watch_time": np.ones(n, bool), "like": np.ones(n, bool)},
        users=requests.copy(),
        requests=requests,
    )


def oracle_watch_at(p: Predictions, k: int) -> float:
    groups = RequestGroups.build(p.requests)
    return float(topk_sums(groups, p.labels["watch_time"], p.labels["watch_time"], [k])[0]) / (
        groups.n_requests
    )


def effective_share(result, head: str) -> float:  # noqa: ANN001
    u = np.array([result.chosen.heads[h].weight for h in result.space.heads]) * result.space.scale
    return float(u[result.space.heads.index(head)] / u.sum())


def test_tuner_puts_the_weight_on_the_head_that_orders_the_target() -> None:
    p = constructed(anti=False)
    r = tune_predictions(
        p,
        TASKS,
        CURRENT,
        maximize="watch_time@3",
        constraints=["likes@3>=-30%"],
        samples=120,
        refine=40,
        seed=1,
    )
    assert effective_share(r, "watch_time") > 0.95
    chosen = r.measured["search"]["chosen"]
    assert chosen["watch_time@3"] == pytest.approx(oracle_watch_at(p, 3), rel=1e-3)
    assert chosen["watch_time@3"] > r.measured["search"]["current"]["watch_time@3"]
    bound = r.goal.constraints[0].bound(r.measured["search"]["current"]["likes@3"])
    assert chosen["likes@3"] >= bound


def test_a_binding_constraint_is_met_and_the_objective_does_not_fall() -> None:
    p = constructed(anti=True)
    r = tune_predictions(
        p,
        TASKS,
        CURRENT,
        maximize="watch_time@3",
        constraints=["likes@3>=-10%"],
        samples=200,
        refine=80,
        seed=2,
    )
    cur, new = r.measured["search"]["current"], r.measured["search"]["chosen"]
    assert new["likes@3"] >= 0.9 * cur["likes@3"] - 1e-9
    assert new["watch_time@3"] >= cur["watch_time@3"] - 1e-9
    # the pure watch-time ranking would break the constraint: it binds
    pure = tune_predictions(p, TASKS, CURRENT, maximize="watch_time@3", samples=20, refine=0)
    assert pure.measured["search"]["chosen"]["likes@3"] < 0.9 * cur["likes@3"]
    assert pure.measured["search"]["chosen"]["watch_time@3"] > new["watch_time@3"]


def test_an_unreachable_constraint_is_reported_with_its_bound() -> None:
    with pytest.raises(TuneError, match=r"likes@3>=100[\s\S]*best reachable"):
        tune_predictions(
            constructed(anti=True),
            TASKS,
            CURRENT,
            maximize="watch_time@3",
            constraints=["likes@3>=100"],
            samples=20,
            refine=0,
        )


@pytest.mark.parametrize("formula", ["weighted_sum", "weighted_product"])
def test_linear_terms_rank_exactly_as_the_ranking_formula(formula: str) -> None:
    rng = np.random.default_rng(4)
    p = constructed(anti=True, n_req=30)
    cfg = RankingConfig(
        formula=formula,
        heads={
            "watch_time": HeadWeight(weight=0.7, transform="log1p"),
            "like": HeadWeight(weight=1.3),
        },
    )
    tf = {h: w.transform for h, w in cfg.heads.items()}
    terms = score_terms(formula, tf, p.preds, ["watch_time", "like"])
    groups = RequestGroups.build(p.requests)
    values = rng.random((len(p), 2))
    w = np.array([[0.7, 1.3]])
    linear = topk_sums_linear(groups, terms, w, values, [1, 4], per_request=True)[0]
    served = RankingFormula(cfg, ["watch_time", "like"]).score(p.preds)
    direct = topk_sums(groups, served, values, [1, 4], per_request=True)
    np.testing.assert_allclose(linear, direct)


def test_weighted_product_is_tunable() -> None:
    p = constructed(anti=False)
    r = tune_predictions(
        p,
        TASKS,
        CURRENT,
        maximize="watch_time@3",
        formula="weighted_product",
        samples=60,
        refine=20,
    )
    assert r.chosen.formula == "weighted_product"
    assert effective_share(r, "watch_time") > 0.95


def test_written_config_loads_in_the_scorer_and_the_service(tmp_path: Path) -> None:
    r = tune_predictions(
        constructed(anti=True),
        TASKS,
        CURRENT,
        maximize="watch_time@3",
        constraints=["likes@3>=-10%"],
        samples=40,
        refine=8,
    )
    path = write_ranking_config(r.chosen, tmp_path / "r.toml", ["a comment"])
    loaded = load_ranking_config(path)
    assert loaded == r.chosen and loaded.version == r.chosen.version
    formula = load_formula(path, ["watch_time", "like", "click"])
    assert formula.version == r.chosen.version


def test_truth_columns_give_unbiased_twins_and_sparse_labels_a_mean() -> None:
    p = constructed(anti=False, n_req=10)
    n = len(p)
    rating = np.where(np.arange(n) % 4 == 0, 4.0, 0.0)
    tasks = [*TASKS, TaskSpec(name="rating", kind="regression", label="rating", loss="mse")]
    p.preds["rating"] = np.full(n, 3.0)
    p.labels["rating"] = rating
    p.masks["rating"] = rating > 0
    p.extra = {"true_like": np.full(n, 0.5, np.float32), "true_click": np.ones(n, np.float32)}
    p.extra["true_rating"] = np.full(n, 3.5, np.float32)
    metrics, _ = list_metrics(tasks, p)
    kinds = {m.name: m.kind for m in metrics}
    assert kinds == {
        "watch_time": "sum",
        "likes": "sum",
        "true_likes": "sum",
        "rating": "mean",
        "true_rating": "mean",
    }
    r = tune_predictions(p, tasks, CURRENT, maximize="watch_time@2", samples=10, refine=0)
    assert r.measured["search"]["current"]["rating@2"] == pytest.approx(4.0)
    assert r.measured["search"]["current"]["true_rating@2"] == pytest.approx(3.5)
    assert r.measured["search"]["current"]["true_likes@2"] == pytest.approx(1.0)


def test_pareto_front_keeps_the_undominated_points() -> None:
    x = np.array([1.0, 2.0, 3.0, 2.0, 0.5, np.nan])
    y = np.array([3.0, 2.0, 1.0, 1.5, 3.0, 9.0])
    assert pareto_front(x, y).tolist() == [True, True, True, False, False, False]


def test_ranker_tune_on_the_tiny_artifact(tiny_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "tune"
    code = main(
        [
            "tune",
            "--artifact",
            str(tiny_artifact),
            "--out",
            str(out),
            "--quiet",
            "--maximize",
            "watch_time@10",
            "--constraint",
            "likes@10>=-5%",
            "--samples",
            "40",
            "--refine",
            "8",
            "--holdout",
            "0.3",
        ]
    )
    assert code == 0
    for name in ("ranking.toml", "summary.json", "summary.md", "settings.csv", "pareto.png"):
        assert (out / name).is_file(), name
    assert (out / "pareto_truth.png").is_file()  # the tiny world writes truth columns
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["metrics"]) == {"search", "holdout"}
    assert summary["metrics"]["search"]["true_watch_time@10"]["current"] > 0
    assert summary["constraints"][0]["met_on_search"] is True
    load_formula(out / "ranking.toml", ["click", "watch_time", "like", "rating"])


def test_ranker_tune_names_a_bad_constraint_before_loading_anything(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(
        [
            "tune",
            "--artifact",
            "/nonexistent",
            "--maximize",
            "watch_time@10",
            "--constraint",
            "likes@10>=-2x",
        ]
    )
    assert code == 2
    assert "bound '-2x' is not a number or a percentage" in capsys.readouterr().err


def test_ranker_tune_writes_its_result_as_a_variant(
    tiny_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    into = tmp_path / "ranking.toml"
    into.write_text(RANKING_CONFIG.read_text())
    out = tmp_path / "tune"
    args = ["tune", "--artifact", str(tiny_artifact), "--out", str(out), "--quiet"]
    args += ["--samples", "30", "--refine", "5"]
    code = main([*args, "--as-variant", "tuned", "--share", "0.1", "--into", str(into)])
    assert code == 0
    written = load_ranking_config(into)
    assert into.read_text().startswith(RANKING_CONFIG.read_text().rstrip("\n"))  # comments kept
    assert written.heads == load_ranking_config(RANKING_CONFIG).heads  # control unchanged
    assert [(v.name, v.share) for v in written.variants] == [("tuned", 0.1)]
    assert written.arm("tuned") == load_ranking_config(out / "ranking.toml")
    RankingFormula(written, ["click", "watch_time", "like", "rating"])
    # A second run with the same name, or a share that does not fit, stops before any work
    # (the artifact path does not exist) with one line naming the problem; the file stays.
    before = into.read_text()
    bad = ["tune", "--artifact", "/nonexistent", "--out", str(out), "--into", str(into)]
    assert main([*bad, "--as-variant", "tuned", "--share", "0.1"]) == 2
    assert "'tuned' is already declared" in capsys.readouterr().err
    assert main([*bad, "--as-variant", "big", "--share", "0.95"]) == 2
    assert (
        "variants: shares sum to 1.05 (tuned 0.1, big 0.95); at most 1" in capsys.readouterr().err
    )
    assert main([*bad, "--as-variant", "x"]) == 2
    assert "--as-variant, --share and --into go together" in capsys.readouterr().err
    assert into.read_text() == before
