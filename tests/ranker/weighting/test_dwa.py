"""Tests for Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from ranker.weighting import SharedPart, WeightingConfig, build_weighting, registry
from ranker.weighting.dwa import DWA, DWAConfig
from tests.ranker.weighting.toy import click_watch_losses, train_a_few_steps

torch.set_num_threads(1)

TASKS = ["click", "watch_time"]


def dwa_by_hand(prev: list[float], prev2: list[float], temperature: float) -> list[float]:
    """w_t = T exp(r_t / temp) / sum_i exp(r_i / temp), r_t = L_t(e-1) / L_t(e-2)."""
    ratios = [a / b for a, b in zip(prev, prev2, strict=True)]
    exps = [math.exp(r / temperature) for r in ratios]
    return [len(exps) * e / sum(exps) for e in exps]


def test_registered() -> None:
    assert registry()["dwa"] is DWA
    config = TypeAdapter(WeightingConfig).validate_python({"name": "dwa", "temperature": 1.5})
    assert isinstance(config, DWAConfig) and config.temperature == 1.5
    assert isinstance(build_weighting(config, TASKS), DWA)
    assert DWAConfig().temperature == 2.0


@pytest.mark.parametrize("temperature", [2.0, 0.5])
def test_weights_follow_the_formula_on_a_loss_history(temperature: float) -> None:
    tasks = ["a", "b", "c"]
    history = [[1.0, 2.0, 4.0], [0.8, 1.0, 3.9], [0.7, 0.9, 3.0], [0.7, 0.3, 2.0]]
    w = DWA(tasks, DWAConfig(temperature=temperature))
    dummy = torch.ones(3)
    assert w.weights(dummy).tolist() == [1.0, 1.0, 1.0]  # epoch 1
    w.epoch_end(dict(zip(tasks, history[0], strict=True)))
    assert w.weights(dummy).tolist() == [1.0, 1.0, 1.0]  # epoch 2
    for e in range(1, len(history)):
        w.epoch_end(dict(zip(tasks, history[e], strict=True)))
        got = w.weights(dummy.double()).tolist()
        assert got == pytest.approx(dwa_by_hand(history[e], history[e - 1], temperature), rel=1e-12)
        assert sum(got) == pytest.approx(3.0)
    # the task whose loss fell least in the last epoch (a: ratio 1) gets the largest weight
    assert max(range(3), key=lambda i: got[i]) == 0


def test_backward_uses_and_reports_the_weights() -> None:
    w = DWA(TASKS, DWAConfig())
    w.epoch_end({"click": 0.5, "watch_time": 10.0})
    w.epoch_end({"click": 0.4, "watch_time": 9.0})
    expected = dwa_by_hand([0.4, 9.0], [0.5, 10.0], 2.0)
    losses = torch.tensor([0.3, 8.0], requires_grad=True)
    out = w.backward(dict(zip(TASKS, losses, strict=True)), SharedPart([]))
    assert [out[t] for t in TASKS] == pytest.approx(expected, rel=1e-6)
    assert losses.grad.tolist() == pytest.approx(expected, rel=1e-6)


def test_history_survives_a_resume() -> None:
    w = DWA(TASKS, DWAConfig())
    for losses in ([1.0, 2.0], [0.5, 1.9], [0.4, 1.5]):
        w.epoch_end(dict(zip(TASKS, losses, strict=True)))
    resumed = DWA(TASKS, DWAConfig())
    resumed.load_state_dict(w.state_dict())
    dummy = torch.ones(2)
    assert torch.equal(resumed.weights(dummy), w.weights(dummy))
    assert resumed.weights(dummy).tolist() != [1.0, 1.0]


def test_epoch_end_rejects_missing_or_non_finite_losses() -> None:
    w = DWA(TASKS, DWAConfig())
    with pytest.raises(KeyError, match="watch_time"):
        w.epoch_end({"click": 1.0})
    with pytest.raises(ValueError, match="finite"):
        w.epoch_end({"click": 1.0, "watch_time": float("nan")})
    assert int(w.epochs_seen) == 0


def test_integration_tiny_model() -> None:
    w = DWA(TASKS, DWAConfig())
    for epoch in range(3):
        logged = train_a_few_steps(w, TASKS, steps=3, losses=click_watch_losses)
        for entry in logged:
            assert set(entry) == set(TASKS)
            assert all(math.isfinite(v) and v > 0 for v in entry.values())
            assert sum(entry.values()) == pytest.approx(2.0)
        w.epoch_end({"click": 0.7 - 0.1 * epoch, "watch_time": 3000.0 - 10 * epoch})
    assert logged[0]["click"] != logged[0]["watch_time"]  # third epoch: DWA weights


@pytest.mark.parametrize("bad", [0.0, -2.0, float("nan")])
def test_config_rejects_non_positive_temperature(bad: float) -> None:
    with pytest.raises(ValidationError) as info:
        DWAConfig(temperature=bad)
    assert info.value.errors()[0]["loc"] == ("temperature",)
