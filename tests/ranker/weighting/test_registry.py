"""Registry-wide checks: every weighting strategy is reachable from config, trains through the
real trainer on the tiny world, and bad weighting config stops with a ``ConfigError`` naming the
key.

Each training run is 2 epochs x 3 steps of the tiny model (``tiny_overrides``), so that DWA's
epoch hook runs, in about a second: every strategy, and every gradient strategy in both modes,
fits in well under a minute on two cores.
"""

from __future__ import annotations

import importlib
import json
import math
import pkgutil
import typing
from pathlib import Path
from typing import Any

import pytest
import torch

import ranker.weighting as weighting_pkg
from ranker.config import Config, load_config, parse_config
from ranker.errors import ConfigError
from ranker.weighting import WeightingConfig, build_weighting, registry
from tests.conftest import DEFAULT_CONFIG, tiny_overrides
from tests.ranker.test_config import base

TASKS = ["click", "watch_time", "like", "rating"]  # the tasks of configs/default.toml
STATIC_WEIGHTS = {"click": 1.0, "watch_time": 0.5, "like": 2.0, "rating": 0.25}

# Config a strategy needs beyond its defaults, per (name, mode); mode None: the default mode.
EXTRA: dict[tuple[str, str | None], dict[str, Any]] = {
    ("static", None): {"weights": STATIC_WEIGHTS},
    # DB-MTL's gradient EMA is refused over representations unless beta = 0 (see its module).
    ("db_mtl", "representation"): {"beta": 0.0},
    # MoCo's gradient tracking likewise (see its module): no tracking over representations.
    ("moco", "representation"): {"beta": 1.0, "beta_sigma": 0.0},
}


def has_mode(name: str) -> bool:
    """Whether the strategy takes per-task gradients in a configurable ``mode``."""
    return "mode" in registry()[name].config_class.model_fields


def training_cases() -> list[Any]:
    """Every registered strategy; gradient ones in both modes."""
    out = []
    for name in sorted(registry()):
        for mode in ("representation", "parameters") if has_mode(name) else (None,):
            out.append(pytest.param(name, mode, id=name if mode is None else f"{name}-{mode}"))
    return out


def union_names() -> set[str]:
    """The ``name`` tags of the members of the config union."""
    union = typing.get_args(WeightingConfig)[0]  # Annotated[Union[...], Field] -> Union[...]
    names = set()
    for member in typing.get_args(union):
        (tag,) = typing.get_args(member.model_fields["name"].annotation)
        names.add(tag)
    return names


def toml_value(v: Any) -> str:
    """A TOML literal for an override value (numbers, strings, tables of them)."""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def test_config_union_and_registry_hold_the_same_names() -> None:
    assert union_names() == set(registry())
    for name, cls in registry().items():
        assert cls.name == name
        assert cls.config_class.model_fields["name"].default == name


def test_every_module_registers_exactly_one_strategy() -> None:
    modules = sorted(
        m.name
        for m in pkgutil.iter_modules(weighting_pkg.__path__)
        if m.name != "base" and not m.name.startswith("_")
    )
    by_module: dict[str, list[str]] = {}
    for name, cls in registry().items():
        by_module.setdefault(cls.__module__, []).append(name)
    for m in modules:
        importlib.import_module(f"ranker.weighting.{m}")
        assert len(by_module.get(f"ranker.weighting.{m}", [])) == 1, (m, by_module)
    assert set(by_module) == {f"ranker.weighting.{m}" for m in modules}


@pytest.mark.parametrize("name", sorted(registry()))
def test_every_name_validates_to_its_own_config_class(name: str) -> None:
    d = base() | {"weighting": {"name": name} | EXTRA.get((name, None), {})}
    if name == "static":  # base() has two tasks
        d["weighting"]["weights"] = {"click": 1.0, "watch_time": 2.0}
    cfg = parse_config(d)
    assert type(cfg.weighting) is registry()[name].config_class
    w = build_weighting(cfg.weighting, cfg.task_names)
    assert type(w) is registry()[name]


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_tiny(world: Path, tmp: Path, weighting: dict[str, Any], epochs: int = 2) -> Config:
    """Trains the tiny model for ``epochs`` x 3 steps with ``weighting``; returns its config."""
    from training.loop import train

    cfg = load_config(
        DEFAULT_CONFIG,
        [
            *tiny_overrides(world, tmp),
            "training.max_steps_per_epoch=3",
            f"training.epochs={epochs}",
            f"weighting={toml_value(weighting)}",
        ],
    )
    torch.set_num_threads(1)
    train(cfg, progress=False, export=False)
    return cfg


@pytest.mark.parametrize(("name", "mode"), training_cases())
def test_every_strategy_trains_with_finite_losses_and_weights(
    name: str, mode: str | None, tiny_world: Path, tmp_path: Path
) -> None:
    weighting: dict[str, Any] = {"name": name} | EXTRA.get((name, None), {})
    if mode is not None:
        weighting |= {"mode": mode} | EXTRA.get((name, mode), {})
    cfg = train_tiny(tiny_world, tmp_path, weighting)
    assert cfg.task_names == TASKS
    records = read_log(cfg.training.run_dir / "train_log.jsonl")
    steps = [r for r in records if "weights" in r]
    epochs = [r for r in records if "train_loss" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert {r["epoch"] for r in steps} == {1, 2}
    for r in steps:
        for what in ("losses", "weights"):
            assert set(r[what]) == set(TASKS), (what, r)
            bad = {t: v for t, v in r[what].items() if v is None or not math.isfinite(v)}
            assert not bad, f"step {r['step']}: non-finite {what} {bad}"
    for r in epochs:
        assert all(v is not None and math.isfinite(v) for v in r["train_loss"].values()), r
    if name == "static":
        assert all(r["weights"] == STATIC_WEIGHTS for r in steps)


def test_dwa_reweights_from_the_third_epoch_in_the_trainer(
    tiny_world: Path, tmp_path: Path
) -> None:
    cfg = train_tiny(tiny_world, tmp_path, {"name": "dwa"}, epochs=3)
    steps = [r for r in read_log(cfg.training.run_dir / "train_log.jsonl") if "weights" in r]
    by_epoch = {r["epoch"]: r["weights"] for r in steps}  # the last logged step of each epoch
    assert by_epoch[1] == by_epoch[2] == dict.fromkeys(TASKS, 1.0)
    assert by_epoch[3] != by_epoch[2]
    assert sum(by_epoch[3].values()) == pytest.approx(len(TASKS))


# --- bad config stops with a ConfigError naming the key -----------------------------------

TWO_TASKS = {"click": 1.0, "watch_time": 1.0}

BAD_PARAMETER: dict[str, tuple[dict[str, Any], str]] = {
    # one out-of-range (or misspelt) parameter per strategy -> the key the error must name
    "equal": ({"weights": TWO_TASKS}, "weighting.weights: unknown key"),
    "static": ({"weights": {"click": 1.0, "watch_time": -1.0}}, "weighting.weights"),
    "uncertainty": ({"init_log_variance": 100.0}, "weighting.init_log_variance"),
    "dwa": ({"temperature": 0}, "weighting.temperature"),
    "gradnorm": ({"alpha": -1.0}, "weighting.alpha"),
    "rlw": ({"seed": -1}, "weighting.seed"),
    "famo": ({"xi_lr": 0}, "weighting.xi_lr"),
    "mgda": ({"max_iter": 0}, "weighting.max_iter"),
    "pcgrad": ({"mode": "both"}, "weighting.mode"),
    "cagrad": ({"c": -1}, "weighting.c"),
    "imtl": ({"mode": "layers"}, "weighting.mode"),
    "nash_mtl": ({"update_weights_every": 0}, "weighting.update_weights_every"),
    "db_mtl": ({"beta": 1.0}, "weighting.beta"),
    "aligned_mtl": ({"scale": "max"}, "weighting.scale"),
    "gls": ({"weights": TWO_TASKS}, "weighting.weights: unknown key"),
    "stch": ({"mu": 0}, "weighting.mu"),
    "upgrad": ({"mode": "layers"}, "weighting.mode"),
    "fairgrad": ({"alpha": -1.0}, "weighting.alpha"),
    "gradvac": ({"beta": 2.0}, "weighting.beta"),
    "graddrop": ({"leak": 1.5}, "weighting.leak"),
    "moco": ({"gamma": 0}, "weighting.gamma"),
    "excess_mtl": ({"step_size": -0.01}, "weighting.step_size"),
}


def test_every_strategy_has_a_bad_parameter_case() -> None:
    assert set(BAD_PARAMETER) == set(registry())


@pytest.mark.parametrize("name", sorted(BAD_PARAMETER))
def test_out_of_range_parameter_names_its_key(name: str) -> None:
    params, key = BAD_PARAMETER[name]
    d = base() | {"weighting": {"name": name} | params}
    with pytest.raises(ConfigError) as err:
        parse_config(d)
    assert key in str(err.value), str(err.value)


def test_unknown_weighting_lists_every_registered_name() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(base() | {"weighting": {"name": "gradnrom"}})
    msg = str(err.value)
    assert "weighting:" in msg and "'gradnrom'" in msg
    for name in registry():
        assert f"'{name}'" in msg, (name, msg)


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ({"click": 1.0}, r"weighting\.weights: .*missing \['watch_time'\]"),
        (TWO_TASKS | {"clicks": 1.0}, r"weighting\.weights: .*unknown \['clicks'\]"),
        ({"click": 1.0, "watch_time": -0.5}, r"weighting\.weights: .*finite and >= 0"),
        ({"click": 1.0, "watch_time": float("nan")}, r"weighting\.weights: .*finite and >= 0"),
    ],
    ids=["missing-task", "unknown-task", "negative", "nan"],
)
def test_bad_static_weights_name_the_key(weights: dict[str, float], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(base() | {"weighting": {"name": "static", "weights": weights}})


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ('weighting.name="gradnrom"', "weighting:"),
        ('weighting={name = "cagrad", c = -1}', "weighting.c"),
        ('weighting={name = "dwa", temperature = 0}', "weighting.temperature"),
        ('weighting={name = "static", weights = {click = 1.0}}', "weighting.weights"),
        (
            'weighting={name = "aligned_mtl", task_weights = {click = 1.0}}',
            "weighting.task_weights",
        ),
        ('weighting={name = "db_mtl", mode = "representation", beta = 0.5}', "beta: must be 0"),
        ('weighting={name = "moco", mode = "representation"}', "beta: must be 1"),
    ],
)
def test_bad_weighting_override_stops_load_config(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(DEFAULT_CONFIG, [override])
    assert key in str(err.value), str(err.value)
