from pathlib import Path

import numpy as np
import pytest

from ranker.config import load_config
from ranker.errors import ConfigError
from ranker.scoring import HeadWeight, RankingConfig, RankingFormula, load_ranking_config
from tests.conftest import DEFAULT_CONFIG, RANKING_CONFIG

PREDS = {
    "click": np.array([0.5, 0.2]),
    "watch_time": np.array([10.0, 100.0]),
    "like": np.array([0.1, 0.3]),
}


def test_weighted_sum_applies_transforms() -> None:
    cfg = RankingConfig(
        heads={
            "click": HeadWeight(weight=2.0),
            "watch_time": HeadWeight(weight=0.5, transform="log1p"),
        }
    )
    s = RankingFormula(cfg, list(PREDS)).score(PREDS)
    assert np.allclose(s, 2 * PREDS["click"] + 0.5 * np.log1p(PREDS["watch_time"]))


def test_weighted_product() -> None:
    cfg = RankingConfig(
        formula="weighted_product",
        heads={"click": HeadWeight(weight=1.0), "like": HeadWeight(weight=0.5)},
    )
    s = RankingFormula(cfg, list(PREDS)).score(PREDS)
    assert np.allclose(s, PREDS["click"] * PREDS["like"] ** 0.5)


def test_unknown_head_is_refused_naming_it() -> None:
    cfg = RankingConfig(heads={"clicks": HeadWeight(weight=1.0)})
    with pytest.raises(ConfigError, match=r"\['clicks'\]"):
        RankingFormula(cfg, list(PREDS))


def test_shipped_ranking_config_loads_and_has_a_version() -> None:
    cfg = load_ranking_config(RANKING_CONFIG)
    assert len(cfg.version) == 12
    assert cfg.version == load_ranking_config(RANKING_CONFIG).version


def test_bad_ranking_config_names_the_key(tmp_path: Path) -> None:
    p = tmp_path / "r.toml"
    p.write_text('[heads.click]\nweight = 1.0\ntransfrom = "log1p"\n')
    with pytest.raises(ConfigError, match=r"heads\.click\.transfrom: unknown key"):
        load_ranking_config(p)
    p.write_text("[heads.click]\nweight = 0.0\n")
    with pytest.raises(ConfigError, match="non-zero"):
        load_ranking_config(p)


def test_the_default_training_config_carries_the_shipped_ranking_weights() -> None:
    """configs/default.toml's [ranking] (what its artifacts carry) is configs/ranking.toml."""
    assert load_config(DEFAULT_CONFIG).ranking == load_ranking_config(RANKING_CONFIG)
