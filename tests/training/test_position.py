"""Position handling: the shallow tower is training-only; position as a feature is fixed at
serving; truth metrics measure what logged clicks cannot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ranker.artifact import load_artifact
from ranker.config import load_config
from ranker.errors import ConfigError
from ranker.position import ShallowTower
from ranker.scoring import HeadWeight, RankingConfig, RankingFormula
from tests.conftest import DEFAULT_CONFIG, tiny_overrides
from training.evaluate import Predictions
from training.loop import train
from training.truth import truth_metrics


@pytest.fixture(scope="module")
def tower_run(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    tmp = tmp_path_factory.mktemp("tower")
    cfg = load_config(
        DEFAULT_CONFIG,
        [*tiny_overrides(tiny_world, tmp), 'position.mode="shallow_tower"', "training.epochs=1"],
    )
    return train(cfg, progress=False)


def test_shallow_tower_is_trained_but_not_exported(tower_run) -> None:  # noqa: ANN001
    ckpt = torch.load(Path(tower_run.config.training.run_dir) / "checkpoint.pt", weights_only=True)
    assert ckpt["bias_tower"] is not None and len(ckpt["bias_tower"]) > 0
    a = load_artifact(tower_run.artifact)
    assert a.manifest["position"]["mode"] == "shallow_tower"
    assert "dropped at serving" in a.manifest["position"]["at_serving"]
    from ranker.artifact import build_model

    assert set(a.model.state_dict()) == set(build_model(a.config, a.encoder).state_dict())
    assert (
        a.encoder.cardinalities == tower_run.encoder.cardinalities
    )  # bias inputs not in the model


def test_tower_dropout_only_in_training() -> None:
    t = ShallowTower([25, 5], [4], dropout=0.5)
    x = torch.stack([torch.full((400,), 7), torch.full((400,), 2)], dim=1)
    t.eval()
    assert torch.equal(t(x), t(x))
    assert len(torch.unique(t(x))) == 1
    t.train()
    torch.manual_seed(0)
    assert len(torch.unique(t(x))) == 2  # some rows saw position 7, others "unknown"


def test_position_feature_is_fixed_at_serving(tiny_world: Path, tmp_path: Path) -> None:
    cfg = load_config(
        DEFAULT_CONFIG,
        [*tiny_overrides(tiny_world, tmp_path), 'position.mode="feature"', "training.epochs=1"],
    )
    r = train(cfg, progress=False, export=False)
    pos = [f for f in r.encoder.of("context") if f.name == "position"]
    assert pos and pos[0].serving_default == 0
    from service.engine import encode_context

    assert np.array_equal(
        encode_context(r.encoder, {"device": "ios"}).cat,
        encode_context(r.encoder, {"device": "ios", "position": 0}).cat,
    )
    assert not np.array_equal(
        encode_context(r.encoder, {"device": "ios"}).cat,
        encode_context(r.encoder, {"device": "ios", "position": 5}).cat,
    )


def test_position_config_errors_name_the_key(tiny_world: Path, tmp_path: Path) -> None:
    over = tiny_overrides(tiny_world, tmp_path)
    with pytest.raises(ConfigError, match=r"position\.tasks: unknown task\(s\) \['clicks'\]"):
        load_config(DEFAULT_CONFIG, [*over, 'position.tasks=["clicks"]'])
    with pytest.raises(ConfigError, match=r"position\.dropout"):
        load_config(DEFAULT_CONFIG, [*over, "position.dropout=1.5"])


def test_truth_metrics_are_perfect_for_perfect_predictions(tiny_config) -> None:  # noqa: ANN001
    rng = np.random.default_rng(0)
    n = 400
    truth = {
        "true_click": rng.random(n),
        "true_watch_time": rng.random(n) * 100,
        "true_like": rng.random(n) * 0.3,
        "true_rating": 1 + 4 * rng.random(n),
    }
    preds = {t: truth[f"true_{t}"] for t in ("click", "watch_time", "like", "rating")}
    p = Predictions(
        preds=preds,
        labels={t: np.zeros(n) for t in preds},
        masks={t: np.ones(n, bool) for t in preds},
        users=np.arange(n) % 20,
        requests=np.arange(n) // 20,
        extra=truth | {"position": (np.arange(n) % 20).astype(float)},
    )
    formula = RankingFormula(
        RankingConfig(heads={"click": HeadWeight(weight=1.0), "like": HeadWeight(weight=2.0)}),
        list(preds),
    )
    m = truth_metrics(tiny_config, p, formula, k=10)
    assert m["click"]["pearson"] == pytest.approx(1.0)
    assert m["ranking_score"]["ndcg@10"] == pytest.approx(1.0)
    assert m["ranking_score"]["logged_policy_ndcg@10"] < 1.0
