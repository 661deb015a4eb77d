"""Tests for ExcessMTL (He et al., ICML 2024)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from ranker.weighting import SharedPart
from ranker.weighting.excess_mtl import ADAGRAD_EPS, ExcessMtl, ExcessMtlConfig
from tests.ranker.weighting.sweep import gradient_cases
from tests.ranker.weighting.toy import (
    Linear3,
    assert_zero_gradient_task_is_left_out,
    build_from_raw,
    train_a_few_steps,
)

torch.set_num_threads(1)

TASKS = ["click", "watch_time", "like"]


def reference(steps: list[torch.Tensor], eta: float) -> list[torch.Tensor]:
    """Algorithm 1 written out for a sequence of gradient sets: the weights after each step."""
    t = steps[0].shape[0]
    acc = torch.zeros_like(steps[0])
    w = torch.ones(t, dtype=torch.float64)
    first = None
    out = []
    for g in steps:
        acc = acc + g * g
        e = (g * g / torch.sqrt(acc + ADAGRAD_EPS)).sum(1)
        if first is None:
            first = e
        else:
            w = w * torch.exp(eta * e / first)
            w = t * w / w.sum()
        out.append(w.clone())
    return out


def test_weights_follow_algorithm_1() -> None:
    gen = torch.Generator().manual_seed(0)
    steps = [torch.randn(3, 7, generator=gen, dtype=torch.float64) * (k + 1) for k in range(5)]
    m = ExcessMtl(TASKS, ExcessMtlConfig(step_size=0.3))
    for g, want in zip(steps, reference(steps, 0.3), strict=True):
        d, w = m.combine(g, torch.ones(3))
        torch.testing.assert_close(w, want)
        torch.testing.assert_close(d, w @ g)


def test_weights_ignore_the_scale_of_each_task() -> None:
    """Each task's excess is measured against its own first step, so rescaling a task's loss
    (its gradients) by any factor leaves the weights unchanged: over the sweep's gradient
    sets, tasks rescaled by 1e-1..1e2 (AdaGrad's 1e-7 inside the root keeps it from being exact
    for small gradients: the sets are taken 1e4 times larger)."""
    gen = torch.Generator().manual_seed(1)
    for g in gradient_cases(200, seed=2):
        t = len(g)
        steps = [g * (1 + 0.5 * torch.randn(1, g.shape[1], generator=gen, dtype=torch.float64))
                 for _ in range(4)]  # fmt: skip
        scale = 10 ** (torch.rand(t, 1, generator=gen, dtype=torch.float64) * 3 - 1)
        a = ExcessMtl([f"t{i}" for i in range(t)], ExcessMtlConfig(step_size=1.0))
        b = ExcessMtl([f"t{i}" for i in range(t)], ExcessMtlConfig(step_size=1.0))
        for s in steps:
            _, wa = a.combine(s * 1e4, torch.ones(t))
            _, wb = b.combine(s * 1e4 * scale, torch.ones(t))
        torch.testing.assert_close(wa, wb, rtol=1e-4, atol=0)


def test_a_task_whose_excess_stays_high_gains_weight() -> None:
    """Exponentiated gradient: ``w_i / w_j`` grows by ``exp(eta (r_i - r_j))``. A task whose
    gradient keeps its size (excess risk left) gains weight over one whose gradient fades
    (converging)."""
    fading = [torch.tensor([[1.0, 1.0], [0.5**k, 0.5**k]], dtype=torch.float64) for k in range(6)]
    m = ExcessMtl(TASKS[:2], ExcessMtlConfig(step_size=0.5))
    ratios = []
    for g in fading:
        _, w = m.combine(g, torch.ones(2))
        ratios.append(float(w[0] / w[1]))
    assert ratios[0] == 1.0 and all(b > a for a, b in zip(ratios[1:], ratios[2:], strict=False))
    assert math.isclose(float(m.w.sum()), 2.0, rel_tol=1e-12)


def test_representation_mode_accumulates_per_feature_and_resumes() -> None:
    m = Linear3(TASKS)
    w = ExcessMtl(TASKS, ExcessMtlConfig(mode="representation"))
    for _ in range(2):
        rep, losses = m.losses()
        w.backward(losses, SharedPart(list(m.shared.parameters()), rep))
    assert w.acc.shape == (3, 6)  # one entry per feature, summed over the batch of 16
    resumed = ExcessMtl(TASKS, ExcessMtlConfig(mode="representation"))
    resumed.load_state_dict(w.state_dict())
    g = torch.randn(3, 16 * 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w._rows = resumed._rows = 16
    torch.testing.assert_close(w.combine(g, torch.ones(3)), resumed.combine(g, torch.ones(3)))


def test_a_task_without_labels_in_the_batch_is_left_out() -> None:
    assert_zero_gradient_task_is_left_out(lambda tasks: ExcessMtl(tasks, ExcessMtlConfig()), TASKS)


@pytest.mark.parametrize("mode", ["representation", "parameters"])
def test_integration_tiny_model(mode: str) -> None:
    weighting = build_from_raw({"name": "excess_mtl", "mode": mode}, TASKS)
    assert isinstance(weighting, ExcessMtl)
    logged = train_a_few_steps(weighting, TASKS, steps=4)
    assert logged[0] == dict.fromkeys(TASKS, 1.0) and logged[-1] != logged[0]


@pytest.mark.parametrize(("field", "value"), [("step_size", 0), ("step_size", float("inf"))])
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        ExcessMtlConfig(**{field: value})
    assert field in str(info.value)
