"""Tests for UPGrad (Quinton & Rey, Jacobian descent, 2024)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from ranker.weighting.upgrad import Upgrad, UpgradConfig, nnls, project_to_dual_cone, upgrad_weights
from tests.ranker.weighting.sweep import gradient_cases
from tests.ranker.weighting.toy import (
    assert_zero_gradient_task_is_left_out,
    build_from_raw,
    train_a_few_steps,
)

torch.set_num_threads(1)

TASKS = ["click", "watch_time", "like"]


def brute_force_nnls(c: np.ndarray, d: np.ndarray) -> float:
    """The optimal value of ``min_{x >= 0} ||c x - d||^2`` by trying every support."""
    n = c.shape[1]
    best = float(d @ d)
    for k in range(1, n + 1):
        for support in itertools.combinations(range(n), k):
            cols = list(support)
            z = np.linalg.lstsq(c[:, cols], d, rcond=None)[0]
            if np.all(z >= 0):
                r = c[:, cols] @ z - d
                best = min(best, float(r @ r))
    return best


def test_nnls_finds_the_optimum_on_every_case() -> None:
    """Lawson-Hanson against trying every support, over hundreds of problems: square and
    rectangular, rank-deficient, columns scaled 1e-3..1e2; KKT conditions hold."""
    rng = np.random.default_rng(0)
    for k in range(400):
        n = int(rng.integers(1, 7))
        m = int(rng.integers(1, 9))
        c = rng.standard_normal((m, n)) * np.logspace(-3, 2, n)[rng.permutation(n)]
        if k % 4 == 1 and n > 1:
            c[:, 1] = c[:, 0] * 3.0  # parallel columns
        d = rng.standard_normal(m) * 10 ** rng.uniform(-3, 2)
        x = nnls(c, d)
        r = c @ x - d
        value = float(r @ r)
        assert np.all(x >= 0)
        best = brute_force_nnls(c, d)
        assert value <= best + 1e-9 * max(float(d @ d), 1e-300), (k, value, best)
        grad = c.T @ r  # KKT: >= 0 everywhere, 0 on the support
        scale = np.abs(c).sum(0) * np.linalg.norm(d)
        assert np.all(grad >= -1e-9 * scale), k
        assert np.all(np.abs(grad[x > 0]) <= 1e-9 * scale[x > 0]), k


def test_each_projection_is_the_projection_onto_the_dual_cone() -> None:
    """For every task ``i`` of every case: ``pi(g_i) = G^T v`` is the Euclidean projection of
    ``g_i`` onto ``{x : G x >= 0}``, i.e. (necessary and sufficient for a polyhedral cone)
    ``pi - g_i = G^T mu`` with ``mu >= 0``, ``G pi >= 0`` and ``mu_t <G pi>_t = 0``."""
    for g in gradient_cases(400):
        norms = g.norm(dim=1).numpy()
        gram = (g @ g.T).numpy()
        corr = gram / np.outer(norms, norms)
        gu = g.numpy() / norms[:, None]  # unit rows: the same cone
        for i in range(len(g)):
            u = project_to_dual_cone(corr, i)
            mu = u.copy()
            mu[i] -= 1.0
            assert np.all(mu >= 0)
            pi = gu.T @ u  # the projection of the unit g_i
            slack = gu @ pi
            assert np.all(slack >= -1e-9), (i, slack)
            assert np.all(np.abs(mu * slack) <= 1e-9 * (1 + mu)), (i, mu, slack)


def test_update_does_not_conflict_with_any_task() -> None:
    """The paper's non-conflicting property ``<g_t, d> >= 0`` for every task, and ``w_t >= 1/T``
    (each projection adds non-negative multiples of the gradients to ``g_i``)."""
    for g in gradient_cases(400, seed=1):
        t = len(g)
        d, w = Upgrad([f"t{i}" for i in range(t)], UpgradConfig()).combine(g, torch.ones(t))
        torch.testing.assert_close(d, w @ g)
        norms = g.norm(dim=1)
        # d can be 0 (no non-conflicting direction, e.g. more tasks than dimensions): measure
        # against the size of the terms that d sums, the rounding scale of d.
        assert bool(((g @ d) / norms >= -1e-9 * (w.abs() @ norms)).all())
        assert bool((w >= 1 / t - 1e-12).all())


def test_without_conflict_the_update_is_the_mean() -> None:
    gen = torch.Generator().manual_seed(3)
    for _ in range(200):
        t = int(torch.randint(2, 7, (1,), generator=gen))
        g = torch.rand(t, 5, generator=gen, dtype=torch.float64) * torch.logspace(-3, 2, t)[:, None]
        w = torch.from_numpy(upgrad_weights((g @ g.T).numpy()))
        torch.testing.assert_close(w, torch.full((t,), 1 / t, dtype=torch.float64))


def test_two_tasks_closed_form() -> None:
    """Two conflicting gradients: each is projected onto the other's normal plane (as PCGrad),
    and the update is the mean of the two projections."""
    g1 = torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64)
    g2 = 10 * torch.tensor([-1.0, 2.0, 1.0], dtype=torch.float64)
    d, _ = Upgrad(TASKS[:2], UpgradConfig()).combine(torch.stack([g1, g2]), torch.ones(2))
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    torch.testing.assert_close(d, (p1 + p2) / 2)


def test_a_task_without_labels_in_the_batch_is_left_out() -> None:
    assert_zero_gradient_task_is_left_out(lambda tasks: Upgrad(tasks, UpgradConfig()), TASKS)


@pytest.mark.parametrize("mode", ["representation", "parameters"])
def test_integration_tiny_model(mode: str) -> None:
    weighting = build_from_raw({"name": "upgrad", "mode": mode}, TASKS)
    assert isinstance(weighting, Upgrad)
    train_a_few_steps(weighting, TASKS)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValidationError, match="mode"):
        UpgradConfig(mode="both")  # type: ignore[arg-type]
