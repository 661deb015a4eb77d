"""Tests for FairGrad (Ban & Ji, ICML 2024)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from ranker.weighting.fairgrad import (
    BACKWARD_TOL,
    RIDGES,
    Fairgrad,
    FairgradConfig,
    fair_backward_error,
    fair_residual,
    fair_weights,
)
from ranker.weighting.nash_mtl import bargaining_residual, solve_bargaining
from tests.ranker.weighting.sweep import gradient_cases
from tests.ranker.weighting.toy import (
    assert_zero_gradient_task_is_left_out,
    build_from_raw,
    train_a_few_steps,
)

torch.set_num_threads(1)

TASKS = ["click", "watch_time", "like"]


def condition(gram: np.ndarray) -> float:
    """Condition number of the gradients' correlation matrix (scale-free)."""
    d = np.sqrt(np.diag(gram))
    return float(np.linalg.cond(gram / np.outer(d, d)))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_solver_solves_the_fairness_equations_on_every_case(alpha: float) -> None:
    """Over 300 gradient sets (scales 1e-3..1e2, nearly opposite and nearly parallel pairs,
    more tasks than dimensions): ``w > 0`` solves ``(G G^T w)_t = w_t^(-1/alpha)`` to a relative
    residual of 1e-8 wherever rounding allows it (correlation condition number <= 1e6), and
    elsewhere to a backward error at the rounding level (the exact solution for a Gram matrix
    within rounding of the given one). Where there is no solution (0 in the convex hull: here,
    more tasks than dimensions) it is the solution for the diagonal raised by the first ridge,
    a backward error of that size."""
    for g in gradient_cases(300, seed=4):
        gram = (g @ g.T).numpy()
        w = fair_weights(gram, alpha)
        assert np.all(np.isfinite(w)) and np.all(w > 0)
        res, back = fair_residual(gram, w, alpha), fair_backward_error(gram, w, alpha)
        if g.shape[0] > g.shape[1]:
            assert back <= 1.01 * RIDGES[0], (res, back)
        else:
            assert res <= 1e-9 or back <= BACKWARD_TOL, (res, back)
        if condition(gram) <= 1e6:
            assert res <= 1e-8, (res, condition(gram))


def test_alpha_one_is_the_nash_bargaining_solution() -> None:
    """``alpha = 1``: the equations are Nash-MTL's, solved there by a different method (compared
    where that solver reaches its tolerance)."""
    compared = 0
    for g in gradient_cases(150, seed=5):
        gram = (g @ g.T).numpy()
        nash = solve_bargaining(gram)
        if condition(gram) > 1e6 or bargaining_residual(gram, nash) > 1e-8:
            continue
        np.testing.assert_allclose(fair_weights(gram, 1.0), nash, rtol=1e-6)
        compared += 1
    assert compared >= 30


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_closed_forms_and_scaling(alpha: float) -> None:
    # Orthogonal gradients: w_t = ||g_t||^(-2 alpha / (alpha + 1)).
    gram = np.diag([1e-4, 1.0, 25.0])
    np.testing.assert_allclose(
        fair_weights(gram, alpha), np.diag(gram) ** (-alpha / (alpha + 1)), rtol=1e-10
    )
    # c G G^T -> c^(-alpha / (alpha + 1)) w.
    g = next(gradient_cases(1, seed=6))
    gram = (g @ g.T).numpy()
    np.testing.assert_allclose(
        fair_weights(7.0 * gram, alpha), 7.0 ** (-alpha / (alpha + 1)) * fair_weights(gram, alpha),
        rtol=1e-7,
    )  # fmt: skip


def test_improvements_follow_the_fairness_level() -> None:
    """The update improves task ``t`` by ``<g_t, d> = w_t^(-1/alpha)``: the larger ``alpha``, the
    more equal the improvements (max-min fairness in the limit)."""
    g = torch.tensor([[1.0, 0.2, 0.0], [0.0, 10.0, 1.0], [0.3, -2.0, 0.05]], dtype=torch.float64)
    spreads = []
    for alpha in (0.5, 1.0, 2.0, 8.0):
        d, w = Fairgrad(TASKS, FairgradConfig(alpha=alpha)).combine(g, torch.ones(3))
        improvement = g @ d
        torch.testing.assert_close(improvement, w ** (-1 / alpha), rtol=1e-7, atol=0)
        spreads.append(float(improvement.max() / improvement.min()))
    assert spreads == sorted(spreads, reverse=True)


def test_pareto_stationary_pair_is_finite() -> None:
    g = torch.tensor([[1.0, 2.0, 0.0], [-1.0, -2.0, 0.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    for alpha in (0.5, 1.0, 5.0):
        d, w = Fairgrad(TASKS, FairgradConfig(alpha=alpha)).combine(g, torch.ones(3))
        assert bool(torch.isfinite(w).all()) and bool((w > 0).all())
        # The stationary pair adds (about) nothing; the third task gets its own solution.
        torch.testing.assert_close(d[:2], torch.zeros(2, dtype=torch.float64), atol=1e-4, rtol=0)
        torch.testing.assert_close(float(w[2]), 9.0 ** (-alpha / (alpha + 1)), rtol=1e-6, atol=0)


def test_a_task_without_labels_in_the_batch_is_left_out() -> None:
    assert_zero_gradient_task_is_left_out(lambda tasks: Fairgrad(tasks, FairgradConfig()), TASKS)


@pytest.mark.parametrize("mode", ["representation", "parameters"])
def test_integration_tiny_model(mode: str) -> None:
    weighting = build_from_raw({"name": "fairgrad", "mode": mode, "alpha": 2.0}, TASKS)
    assert isinstance(weighting, Fairgrad)
    train_a_few_steps(weighting, TASKS)


@pytest.mark.parametrize(
    ("field", "value"), [("alpha", 0), ("alpha", float("nan")), ("max_iter", 0), ("tol", 1)]
)
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        FairgradConfig(**{field: value})
    assert field in str(info.value)
