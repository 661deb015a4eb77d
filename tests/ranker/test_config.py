from pathlib import Path

import pytest

from ranker.config import load_config, parse_config
from ranker.errors import ConfigError
from tests.conftest import DEFAULT_CONFIG


def base() -> dict:
    return {
        "data": {"log": "l", "users": "u", "videos": "v"},
        "features": [{"name": "user_id", "source": "user", "kind": "categorical"}],
        "tasks": [
            {"name": "click", "kind": "binary", "label": "click", "loss": "bce"},
            {
                "name": "watch_time",
                "kind": "regression",
                "label": "watch_time",
                "loss": "mse_log1p",
            },
        ],
    }


def test_default_config_loads() -> None:
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.task_names == ["click", "watch_time", "like", "rating"]
    assert cfg.model.architecture == "mmoe"


def test_misspelt_key_names_its_path(tmp_path: Path) -> None:
    text = DEFAULT_CONFIG.read_text().replace("num_experts", "num_expert")
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(ConfigError, match=r"model\.num_expert: unknown key"):
        load_config(tmp_path / "c.toml")


def test_bad_value_names_its_path() -> None:
    d = base()
    d["tasks"][1]["loss"] = "bce"
    with pytest.raises(ConfigError, match=r"tasks\[1\]: loss 'bce' does not fit a regression task"):
        parse_config(d)


def test_unknown_weighting_lists_known_names() -> None:
    d = base() | {"weighting": {"name": "gradnrom"}}
    with pytest.raises(ConfigError, match=r"weighting: .*'gradnrom'.*'equal'.*'static'"):
        parse_config(d)


def test_static_weights_missing_a_task_is_named() -> None:
    d = base() | {"weighting": {"name": "static", "weights": {"click": 1.0}}}
    with pytest.raises(ConfigError, match=r"weighting\.weights: .*missing \['watch_time'\]"):
        parse_config(d)


def test_negative_static_weight_is_refused() -> None:
    d = base() | {"weighting": {"name": "static", "weights": {"click": 1.0, "watch_time": -1}}}
    with pytest.raises(ConfigError, match="finite and >= 0"):
        parse_config(d)


def test_duplicate_task_names_are_refused() -> None:
    d = base()
    d["tasks"].append(dict(d["tasks"][0]))
    with pytest.raises(ConfigError, match=r"tasks: duplicate names \['click'\]"):
        parse_config(d)


def test_overrides_use_toml_values(tmp_path: Path) -> None:
    cfg = load_config(DEFAULT_CONFIG, ["training.epochs=3", "model.expert_hidden=[8, 4]"])
    assert cfg.training.epochs == 3 and cfg.model.expert_hidden == [8, 4]


def test_missing_file_and_bad_toml_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[data\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")


def test_config_json_round_trip() -> None:
    cfg = load_config(DEFAULT_CONFIG)
    again = type(cfg).model_validate_json(cfg.model_dump_json())
    assert again == cfg


@pytest.mark.parametrize("mode", ["none", "feature"])
def test_position_tasks_are_checked_only_where_the_tower_uses_them(
    tmp_path: Path, mode: str
) -> None:
    """A config without a ``click`` task loads unless the shallow tower would add to it."""
    text = (
        DEFAULT_CONFIG.read_text()
        .replace('name = "click"', 'name = "clicked"')
        .replace("[ranking.heads.click]", "[ranking.heads.clicked]")
    )
    assert 'mode = "shallow_tower"' in text
    text = text.replace('mode = "shallow_tower"', f'mode = "{mode}"')
    (tmp_path / "c.toml").write_text(text)
    assert "click" not in load_config(tmp_path / "c.toml").task_names
    (tmp_path / "t.toml").write_text(text.replace(f'"{mode}"', '"shallow_tower"'))
    with pytest.raises(ConfigError, match=r"position\.tasks: unknown task\(s\) \['click'\]"):
        load_config(tmp_path / "t.toml")
