"""Tests for GradVac (Wang et al., ICLR 2021)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from ranker.weighting.base import gram_matrix
from ranker.weighting.gradvac import Gradvac, GradvacConfig, vaccinate, vaccination_coefficients
from ranker.weighting.pcgrad import project_conflicting
from tests.ranker.weighting.sweep import gradient_cases
from tests.ranker.weighting.toy import (
    assert_zero_gradient_task_is_left_out,
    build_from_raw,
    train_a_few_steps,
)

torch.set_num_threads(1)

TASKS = ["click", "watch_time", "like"]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


def test_an_adjustment_lifts_the_cosine_exactly_to_its_goal() -> None:
    """The defining step: when ``cos(g_i, g_j)`` is below the goal, the adjusted ``g_i`` has
    cosine exactly the goal with ``g_j``; otherwise ``g_i`` is unchanged. Over the sweep's pairs
    (scales 1e-3..1e2, nearly opposite and nearly parallel) and goals in (-1, 1)."""
    gen = torch.Generator().manual_seed(0)
    lifted = 0
    for g in gradient_cases(400):
        pair = g[:2]
        goal = float(torch.rand(1, generator=gen, dtype=torch.float64)) * 1.98 - 0.99
        goals = torch.full((2, 2), goal, dtype=torch.float64)
        out, coef, _ = vaccinate(pair, [[1], [0]], goals, beta=0.0)
        torch.testing.assert_close(out, coef @ pair)
        for i, j in ((0, 1), (1, 0)):
            before = cosine(pair[i], pair[j])
            if before < goal:
                assert math.isclose(cosine(out[i], pair[j]), goal, rel_tol=0, abs_tol=1e-9)
                lifted += 1
            else:
                torch.testing.assert_close(out[i], pair[i], rtol=0, atol=0)
    assert lifted > 200


def vaccinate_vectors(
    grads: torch.Tensor, orders: list[list[int]], goals: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference: the paper's algorithm on the gradient vectors themselves, in float64 (the
    implementation before the rule moved to the Gram matrix)."""
    g = grads.double()
    norms = g.norm(dim=1)
    n = g.shape[0]
    coef = torch.eye(n, dtype=torch.float64)
    out = g.clone()
    new_goals = goals.clone()
    for i, order in enumerate(orders):
        if norms[i] == 0:
            continue
        gi = out[i]
        for j in order:
            if j == i or norms[j] == 0:
                continue
            gi_norm = float(gi.norm())
            if gi_norm == 0:
                break
            dot = float(gi @ g[j])
            phi = max(-1.0, min(1.0, dot / (gi_norm * float(norms[j]))))
            goal = float(goals[i, j])
            if phi < goal:
                root_goal = math.sqrt(max(1.0 - goal * goal, 0.0))
                if root_goal > 0:
                    rejection = gi - (dot / float(norms[j]) ** 2) * g[j]
                    root_phi = min(float(rejection.norm()) / gi_norm, 1.0)
                    c = gi_norm * (goal * root_phi - phi * root_goal)
                    c /= float(norms[j]) * root_goal
                    gi = gi + c * g[j]
                    coef[i, j] += c
            new_goals[i, j] = (1.0 - beta) * goal + beta * phi
        out[i] = gi
    return out, coef, new_goals


def test_the_gram_computation_matches_the_vector_algorithm() -> None:
    """The coefficients come from the Gram matrix (vectors only where it cancels); over the
    sweep (up to 6 tasks, scales 1e-3..1e2, nearly opposite and parallel pairs, more tasks than
    dimensions), random goals, orders and rates, they match the algorithm run on the vectors:
    every adjusted gradient to 1e-12 of the gradients it combines (rounding is ~1e-15), the
    goals to 1e-10."""
    gen = torch.Generator().manual_seed(5)
    lifts = 0
    for g in gradient_cases(600, seed=7):
        t = g.shape[0]
        goals = torch.rand(t, t, generator=gen, dtype=torch.float64) * 1.98 - 0.99
        orders = [[int(j) for j in torch.randperm(t, generator=gen) if j != i] for i in range(t)]
        beta = float(torch.rand(1, generator=gen, dtype=torch.float64))
        coef, new_goals = vaccination_coefficients(g, gram_matrix(g), orders, goals, beta)
        expected, expected_coef, expected_goals = vaccinate_vectors(g, orders, goals, beta)
        scale = expected_coef.abs() @ g.norm(dim=1)  # per row: sum_k |coef_ik| ||g_k||
        error = (coef @ g - expected).norm(dim=1) / scale
        assert float(error.max()) <= 1e-12
        torch.testing.assert_close(new_goals, expected_goals, rtol=0, atol=1e-10)
        lifts += int((expected_coef != torch.eye(t, dtype=torch.float64)).sum())
    assert lifts > 1000


def test_goals_of_zero_are_pcgrad() -> None:
    """With every goal at 0 (the first step) GradVac is PCGrad, order for order."""
    for g in gradient_cases(200, seed=1):
        t = len(g)
        orders = [[j for j in range(t) if j != i][::-1] for i in range(t)]
        out, coef, _ = vaccinate(g, orders, torch.zeros(t, t, dtype=torch.float64), beta=0.01)
        expected, expected_coef = project_conflicting(g, orders)
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-12 * float(g.abs().max()))
        torch.testing.assert_close(coef, expected_coef, rtol=1e-7, atol=1e-9)


def test_goals_are_an_ema_of_the_cosines_measured_before_adjusting() -> None:
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    goals = torch.tensor([[0.0, 0.2], [0.5, 0.0]], dtype=torch.float64)
    _, _, new = vaccinate(g, [[1], [0]], goals, beta=0.25)
    c = cosine(g[0], g[1])
    torch.testing.assert_close(new[0, 1], torch.tensor(0.75 * 0.2 + 0.25 * c, dtype=torch.float64))
    torch.testing.assert_close(new[1, 0], torch.tensor(0.75 * 0.5 + 0.25 * c, dtype=torch.float64))
    assert float(new[0, 0]) == 0.0 and float(new[1, 1]) == 0.0


def test_seeded_and_resumable() -> None:
    gen = torch.Generator().manual_seed(2)
    steps = [torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(6)]
    plain = Gradvac(TASKS, GradvacConfig(beta=0.5, seed=3))
    for g in steps[:3]:
        plain.combine(g, torch.ones(3))
    resumed = Gradvac(TASKS, GradvacConfig(beta=0.5, seed=3))
    resumed.load_state_dict(plain.state_dict())
    assert bool((resumed.goals != 0).any())
    for g in steps[3:]:
        da, wa = plain.combine(g, torch.ones(3))
        db, wb = resumed.combine(g, torch.ones(3))
        torch.testing.assert_close(da, db, rtol=0, atol=0)
        torch.testing.assert_close(wa, wb, rtol=0, atol=0)


def test_a_task_without_labels_in_the_batch_is_left_out() -> None:
    assert_zero_gradient_task_is_left_out(lambda tasks: Gradvac(tasks, GradvacConfig()), TASKS)


@pytest.mark.parametrize("mode", ["representation", "parameters"])
def test_integration_tiny_model(mode: str) -> None:
    weighting = build_from_raw({"name": "gradvac", "mode": mode, "beta": 0.5}, TASKS)
    assert isinstance(weighting, Gradvac)
    train_a_few_steps(weighting, TASKS)
    assert int(weighting.step) == 3 and bool((weighting.goals != 0).any())


@pytest.mark.parametrize(("field", "value"), [("beta", -0.1), ("beta", 1.5), ("seed", -1)])
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        GradvacConfig(**{field: value})
    assert field in str(info.value)
