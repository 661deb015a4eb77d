"""Tests for Nash-MTL (Navon et al., ICML 2022)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import Tensor

from ranker.weighting import SharedPart
from ranker.weighting.nash_mtl import (
    FLOOR_FACTOR,
    NashMtl,
    NashMtlConfig,
    bargaining_residual,
    rounding_floor,
    solve_bargaining,
)
from tests.ranker.weighting.toy import (
    SWEEP_TASKS,
    Linear3,
    assert_zero_gradient_task_is_left_out,
    build_from_raw,
    sweep_grads,
    train_a_few_steps,
)

torch.set_num_threads(1)

TASKS = ["click", "watch_time", "like"]


def random_grads(t: int, seed: int, n: int = 8) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-3, 2, t, dtype=torch.float64)[:, None]  # 1e-3 .. 1e2
    g = torch.randn(t, n, generator=gen, dtype=torch.float64)
    if t > 2:
        g[1] = -0.7 * g[0] + 0.3 * g[1]  # a conflict
    return scales * g


def bargaining_failures(cases: list[tuple[str, Tensor]]) -> list[str]:
    """The cases where ``combine``'s weights do not solve the bargaining equations, with why."""
    failed = []
    for label, g in cases:
        t = g.shape[0]
        d, alpha = NashMtl([f"task{i}" for i in range(t)], NashMtlConfig()).combine(
            g, torch.ones(t)
        )
        gram = (g @ g.T).numpy()
        a = alpha.numpy()
        if not float(alpha.min()) > 0:
            failed.append(f"{label}: alpha {a}")
            continue
        # (G G^T alpha)_t * alpha_t = 1 for every task, within 1e-6 (solver tolerance 1e-8) or,
        # close to Pareto stationarity (huge alpha, cancelling sums), within float64 rounding.
        res = bargaining_residual(gram, a)
        allowed = max(1e-6, FLOOR_FACTOR * rounding_floor(gram, a))
        # Consequence: ||d||^2 = alpha^T G G^T alpha = T, whatever the gradients' scale.
        if res > allowed or not math.isclose(float(d @ d), t, rel_tol=1e-5):
            failed.append(f"{label}: residual {res:.2e} > {allowed:.1e}, |d|^2 {float(d @ d):.6g}")
        elif not torch.allclose(d, alpha @ g):
            failed.append(f"{label}: direction is not alpha @ g")
    return failed


def test_weights_solve_the_bargaining_equations_on_a_sweep() -> None:
    """588 cases: :func:`sweep_grads` (T = 2..8, per-task scales 1e-3..1e2, conflicts,
    near-Pareto-stationary and rank-deficient gradients) and this file's own draw for 50 seeds
    per task count. The scipy ``trust-exact`` solve used before failed 74 of them on an AMD EPYC
    (and the [4-4] seed of the former 15-case test on an Intel Xeon) with residuals near 1.
    """
    cases = sweep_grads()
    cases += [
        (f"random_grads T={t} seed={s}", random_grads(t, s)) for t in SWEEP_TASKS for s in range(50)
    ]
    failed = bargaining_failures(cases)
    assert not failed, f"{len(failed)} of {len(cases)} cases: " + "; ".join(failed[:10])


def test_scale_invariance_and_official_scale() -> None:
    g = random_grads(3, 0)
    d1, a1 = NashMtl(TASKS, NashMtlConfig()).combine(g, torch.ones(3))
    d2, a2 = NashMtl(TASKS, NashMtlConfig()).combine(10 * g, torch.ones(3))
    torch.testing.assert_close(d1, d2, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(a1, 10 * a2, rtol=1e-6, atol=0)
    _, official = NashMtl(TASKS, NashMtlConfig(official_scale=True)).combine(g, torch.ones(3))
    norm = float(torch.linalg.matrix_norm(g @ g.T))
    torch.testing.assert_close(official, a1 * math.sqrt(norm), rtol=1e-6, atol=0)


def test_solver_survives_a_pareto_stationary_point() -> None:
    gram = np.array([[1.0, -1.0], [-1.0, 1.0]])  # g2 = -g1: 0 is in the hull, no exact solution
    alpha = solve_bargaining(gram)
    assert np.all(np.isfinite(alpha)) and np.all(alpha > 0)
    d, alpha = NashMtl(TASKS, NashMtlConfig()).combine(torch.zeros(3, 4), torch.ones(3))
    assert torch.equal(d, torch.zeros(4)) and torch.isfinite(alpha).all()


@pytest.mark.parametrize("mode", ["representation", "parameters"])
def test_steps_between_solves_reuse_alpha_with_the_same_update_rule(mode: str) -> None:
    m = Linear3(TASKS)
    w = NashMtl(TASKS, NashMtlConfig(mode=mode, update_weights_every=2, max_norm=0.0))
    rep, losses = m.losses()
    w.backward(losses, SharedPart(list(m.shared.parameters()), rep))
    alpha = w.alpha.float().clone()

    # Second step: no solve, alpha reused. Shared params get grad of sum_t alpha_t L_t (the
    # shared part's update is linear in the task gradients), heads their own loss's gradient.
    m.shared.zero_grad(set_to_none=True)
    m.heads.zero_grad(set_to_none=True)
    rep, losses = m.losses()
    stacked = torch.stack([losses[t] for t in TASKS])
    expected_shared = torch.autograd.grad(
        (alpha * stacked).sum(), list(m.shared.parameters()), retain_graph=True
    )
    expected_heads = torch.autograd.grad(
        stacked.sum(), list(m.heads.parameters()), retain_graph=True
    )
    logged = w.backward(losses, SharedPart(list(m.shared.parameters()), rep))
    assert int(w.step) == 2
    torch.testing.assert_close(torch.tensor(list(logged.values())), alpha)
    for p, e in zip(m.shared.parameters(), expected_shared, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-6)
    for p, e in zip(m.heads.parameters(), expected_heads, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["representation", "parameters"])
def test_max_norm_clips_the_shared_gradient(mode: str) -> None:
    m = Linear3(TASKS)
    w = NashMtl(TASKS, NashMtlConfig(mode=mode, max_norm=0.05))
    rep, losses = m.losses()
    w.backward(losses, SharedPart(list(m.shared.parameters()), rep))
    total = torch.cat([p.grad.reshape(-1) for p in m.shared.parameters()]).norm()
    assert float(total) <= 0.05 * (1 + 1e-5)


def test_state_survives_a_resume() -> None:
    g = random_grads(3, 1)
    a = NashMtl(TASKS, NashMtlConfig())
    a.combine(g, torch.ones(3))
    b = NashMtl(TASKS, NashMtlConfig())
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.alpha, a.alpha)


def test_a_task_without_labels_in_the_batch_is_left_out() -> None:
    assert_zero_gradient_task_is_left_out(lambda tasks: NashMtl(tasks, NashMtlConfig()), TASKS)


# --- integration -------------------------------------------------------------------------------


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("mode", ["representation", "parameters"])
def test_integration_tiny_model(mode: str, every: int) -> None:
    weighting = build_from_raw(
        {"name": "nash_mtl", "mode": mode, "update_weights_every": every}, TASKS
    )
    assert isinstance(weighting, NashMtl)
    for w in train_a_few_steps(weighting, TASKS):
        assert min(w.values()) > 0


@pytest.mark.parametrize(
    ("field", "value"),
    [("update_weights_every", 0), ("max_norm", -1.0), ("max_norm", math.inf), ("tol", 0.0)],
)
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        NashMtlConfig(**{field: value})
    assert field in str(info.value)
