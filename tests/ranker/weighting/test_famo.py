"""Tests for FAMO (Liu et al., NeurIPS 2023)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import TypeAdapter, ValidationError
from torch import Tensor, nn

from ranker.weighting import SharedPart, Weighting, WeightingConfig, build_weighting, registry
from ranker.weighting.equal import Equal, EqualConfig
from ranker.weighting.famo import FAMO, FAMOConfig
from tests.ranker.weighting.toy import click_watch_losses, train_a_few_steps

torch.set_num_threads(1)

TASKS = ["click", "watch_time"]


def scalar_losses(values: list[float]) -> tuple[Tensor, dict[str, Tensor]]:
    """Losses ``values[t] * p_t`` of a parameter ``p = 1``: their gradient shows the weights."""
    p = torch.ones(len(values), requires_grad=True)
    return p, dict(zip(TASKS, p * torch.tensor(values), strict=True))


def log_decrease_on_two_quadratics(strategy: Weighting, steps: int = 80) -> list[float]:
    """Two quadratics of very different scales on a shared 2-d parameter, directions not aligned
    with the axes (so Adam's per-coordinate scaling cannot balance them by itself). Returns each
    task's ``log L(0) - log L(steps)``."""
    u = torch.tensor([1.0, 1.0]) / math.sqrt(2.0)
    v = torch.tensor([1.0, -0.5])
    theta = nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([theta], lr=0.01)

    def losses() -> dict[str, Tensor]:
        return {"big": 100.0 * (u @ theta - 1) ** 2, "small": 0.01 * (v @ theta - 1) ** 2}

    start = {k: math.log(val.item()) for k, val in losses().items()}
    for _ in range(steps):
        current = losses()
        opt.zero_grad(set_to_none=True)
        strategy.backward(current, SharedPart([theta]))
        opt.step()
    return [start[k] - math.log(val.item()) for k, val in losses().items()]


def balance(decrease: list[float]) -> float:
    """min / max of the tasks' log-loss decreases: 1 is perfectly balanced."""
    assert all(d > 0 for d in decrease)
    return min(decrease) / max(decrease)


def test_registered() -> None:
    assert registry()["famo"] is FAMO
    config = TypeAdapter(WeightingConfig).validate_python({"name": "famo", "xi_lr": 0.1})
    assert isinstance(config, FAMOConfig) and config.xi_lr == 0.1
    assert isinstance(build_weighting(config, TASKS), FAMO)


def test_direction_is_c_z_over_loss_and_first_call_does_not_update_logits() -> None:
    famo = FAMO(TASKS, FAMOConfig())
    with torch.no_grad():
        famo.xi.copy_(torch.tensor([0.4, -0.4]))
    z = torch.softmax(torch.tensor([0.4, -0.4]), 0)
    p, losses = scalar_losses([2.0, 50.0])
    out = famo.backward(losses, SharedPart([p]))
    values = torch.tensor([2.0, 50.0])
    c = 1 / (z / values).sum()
    expected = c * z / values  # weight of L_t: d/dL_t (c z_t log L_t)
    assert [out[t] for t in TASKS] == pytest.approx(expected.tolist(), rel=1e-5)
    assert sum(out.values()) == pytest.approx(1.0)
    torch.testing.assert_close(p.grad, expected * values)  # dL_t/dp_t = values[t]
    torch.testing.assert_close(famo.xi, torch.tensor([0.4, -0.4]))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_logits_update_from_the_change_in_log_losses(optimizer: str) -> None:
    config = FAMOConfig(xi_optimizer=optimizer, xi_lr=0.1, weight_decay=0.5)
    famo = FAMO(TASKS, config)
    famo.backward(scalar_losses([2.0, 4.0])[1], SharedPart([]))
    famo.backward(scalar_losses([1.0, 3.5])[1], SharedPart([]))
    # delta_log = log L(before) - log L(after); d = J_softmax(0)^T delta_log, xi starts at 0
    delta_log = torch.tensor([math.log(2.0), math.log(4.0 / 3.5)])
    z = torch.tensor([0.5, 0.5])
    d = z * (delta_log - (z * delta_log).sum())
    # sgd, Algorithm 1: xi <- xi - beta (d + gamma xi); Adam's first step: lr * g / (|g| + eps)
    step = d if optimizer == "sgd" else d / (d.abs() + 1e-8)
    expected = -0.1 * step
    torch.testing.assert_close(famo.xi, expected)
    # the task whose loss fell faster (click) loses weight
    assert famo.task_weights()[0] < famo.task_weights()[1]


def test_sgd_logits_step_includes_the_decay() -> None:
    famo = FAMO(TASKS, FAMOConfig(xi_optimizer="sgd", xi_lr=0.1, weight_decay=0.5))
    for values in ([2.0, 4.0], [1.0, 3.5]):
        famo.backward(scalar_losses(values)[1], SharedPart([]))
    xi = famo.xi.clone()
    famo.backward(scalar_losses([0.9, 2.0])[1], SharedPart([]))
    z = torch.softmax(xi, 0)
    delta_log = torch.tensor([math.log(1.0 / 0.9), math.log(3.5 / 2.0)])
    d = z * (delta_log - (z * delta_log).sum())
    torch.testing.assert_close(famo.xi, xi - 0.1 * (d + 0.5 * xi))


def test_a_non_finite_loss_does_not_poison_the_logits() -> None:
    famo = FAMO(TASKS, FAMOConfig())
    famo.backward(scalar_losses([2.0, 4.0])[1], SharedPart([]))
    famo.backward(scalar_losses([float("inf"), 4.0])[1], SharedPart([]))
    assert torch.isfinite(famo.xi).all()
    famo.backward(scalar_losses([1.0, 3.0])[1], SharedPart([]))
    assert torch.isfinite(famo.xi).all() and not torch.equal(famo.xi, torch.zeros(2))


def test_a_task_without_labels_in_the_batch_is_left_out() -> None:
    """A head with no labelled row has loss exactly 0: it must not stall the other tasks (via
    c = 1 / sum z_t / L_t) nor feed a spurious log-loss change into the logits."""
    famo = FAMO(TASKS, FAMOConfig())
    famo.backward(scalar_losses([2.0, 4.0])[1], SharedPart([]))
    p, losses = scalar_losses([1.0, 0.0])
    out = famo.backward(losses, SharedPart([]))
    assert out == {"click": pytest.approx(1.0), "watch_time": 0.0}
    assert p.grad.tolist() == pytest.approx([1.0, 0.0])
    torch.testing.assert_close(famo.xi, torch.zeros(2))  # no update from the empty step
    famo.backward(scalar_losses([1.5, 3.0])[1], SharedPart([]))
    reference = FAMO(TASKS, FAMOConfig())
    for values in ([2.0, 4.0], [1.5, 3.0]):
        reference.backward(scalar_losses(values)[1], SharedPart([]))
    torch.testing.assert_close(famo.xi, reference.xi)


def test_balances_the_log_loss_decrease_better_than_equal_weighting() -> None:
    tasks = ["big", "small"]
    equal = log_decrease_on_two_quadratics(Equal(tasks, EqualConfig()))
    famo = log_decrease_on_two_quadratics(FAMO(tasks, FAMOConfig()))
    # the same direction with logits frozen at 0: the balance comes from the logits' update
    frozen = log_decrease_on_two_quadratics(FAMO(tasks, FAMOConfig(xi_lr=1e-12)))
    assert balance(famo) > 0.5
    assert balance(famo) > 2 * balance(equal)
    assert balance(famo) > 2 * balance(frozen)
    assert famo[1] > 2 * equal[1]  # the small-scale task is no longer left behind


def test_state_survives_a_resume() -> None:
    famo = FAMO(TASKS, FAMOConfig())
    for values in ([2.0, 4.0], [1.5, 3.9], [1.0, 3.5]):
        famo.backward(scalar_losses(values)[1], SharedPart([]))
    resumed = FAMO(TASKS, FAMOConfig())
    resumed.load_state_dict(famo.state_dict())
    outs = [w.backward(scalar_losses([0.8, 3.0])[1], SharedPart([])) for w in (famo, resumed)]
    assert outs[0] == outs[1]
    torch.testing.assert_close(resumed.xi, famo.xi)
    assert list(famo.parameters()) == []  # the trainer's optimizer does not touch the logits


def test_integration_tiny_model() -> None:
    w = FAMO(TASKS, FAMOConfig())
    logged = train_a_few_steps(w, TASKS, steps=5, losses=click_watch_losses)
    for entry in logged:
        assert set(entry) == set(TASKS)
        assert all(math.isfinite(v) and v > 0 for v in entry.values())
        assert sum(entry.values()) == pytest.approx(1.0, rel=1e-5)
    assert not torch.equal(w.xi, torch.zeros(2))


@pytest.mark.parametrize(("field", "bad"), [("xi_lr", 0.0), ("weight_decay", -0.1), ("eps", 0)])
def test_config_rejects_bad_parameters(field: str, bad: float) -> None:
    with pytest.raises(ValidationError) as info:
        FAMOConfig(**{field: bad})
    assert info.value.errors()[0]["loc"] == (field,)
