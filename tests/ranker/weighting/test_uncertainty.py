"""Tests for uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from ranker.weighting import SharedPart, WeightingConfig, build_weighting, registry
from ranker.weighting.uncertainty import Uncertainty, UncertaintyConfig
from tests.ranker.weighting.toy import click_watch_losses, train_a_few_steps

torch.set_num_threads(1)

TASKS = ["click", "watch_time"]


def test_registered() -> None:
    assert registry()["uncertainty"] is Uncertainty
    config = TypeAdapter(WeightingConfig).validate_python({"name": "uncertainty"})
    assert isinstance(config, UncertaintyConfig)
    assert isinstance(build_weighting(config, TASKS), Uncertainty)


def test_starts_at_unit_weights_and_objective_is_the_simplified_form() -> None:
    w = Uncertainty(TASKS, UncertaintyConfig())
    losses = torch.tensor([0.5, 3.0], requires_grad=True)
    assert w.weights(losses).tolist() == [1.0, 1.0]
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([0.3, -0.7]))
    out = w.backward(dict(zip(TASKS, losses, strict=True)), SharedPart([]))
    assert out == pytest.approx({"click": math.exp(-0.3), "watch_time": math.exp(0.7)})
    # d/dL_t = exp(-s_t); d/ds_t = -exp(-s_t) L_t + 1
    assert losses.grad.tolist() == pytest.approx([math.exp(-0.3), math.exp(0.7)])
    expected = [-math.exp(-0.3) * 0.5 + 1, -math.exp(0.7) * 3.0 + 1]
    assert w.log_vars.grad.tolist() == pytest.approx(expected, rel=1e-5)


def test_log_variances_converge_to_log_of_constant_losses() -> None:
    """With fixed losses, sum_t exp(-s_t) L_t + s_t is minimised at s_t = log L_t."""
    constant = torch.tensor([0.05, 1.0, 20.0])
    tasks = ["a", "b", "c"]
    w = Uncertainty(tasks, UncertaintyConfig())
    opt = torch.optim.SGD(w.parameters(), lr=0.05)
    for _ in range(1500):
        opt.zero_grad(set_to_none=True)
        w.backward(dict(zip(tasks, constant, strict=True)), SharedPart([]))
        opt.step()
    assert w.log_vars.detach().tolist() == pytest.approx(constant.log().tolist(), abs=1e-3)
    # the weights reach 1 / L_t: every weighted loss becomes 1
    weighted = torch.exp(-w.log_vars.detach()) * constant
    assert weighted.tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-3)


def test_integration_tiny_model() -> None:
    w = Uncertainty(TASKS, UncertaintyConfig())
    logged = train_a_few_steps(w, TASKS, steps=4, losses=click_watch_losses)
    for entry in logged:
        assert set(entry) == set(TASKS)
        assert all(math.isfinite(v) and v > 0 for v in entry.values())
    assert w.log_vars.grad is not None
    assert not torch.equal(w.log_vars.detach(), torch.zeros(2))  # learned by the optimizer
    assert "log_vars" in w.state_dict()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e6])
def test_config_rejects_bad_initial_log_variance(bad: float) -> None:
    with pytest.raises(ValidationError) as info:
        UncertaintyConfig(init_log_variance=bad)
    assert info.value.errors()[0]["loc"] == ("init_log_variance",)


def test_config_rejects_unknown_key() -> None:
    with pytest.raises(ValidationError, match="temperature"):
        UncertaintyConfig(temperature=2.0)
