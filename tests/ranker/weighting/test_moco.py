"""Tests for MoCo (Fernando et al., ICLR 2023)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from ranker.weighting.mgda import min_norm_weights
from ranker.weighting.moco import Moco, MocoConfig, project_to_simplex
from tests.ranker.weighting.sweep import gradient_cases
from tests.ranker.weighting.toy import (
    assert_zero_gradient_task_is_left_out,
    build_from_raw,
    train_a_few_steps,
)

torch.set_num_threads(1)

TASKS = ["click", "watch_time", "like"]


def test_simplex_projection_is_the_closest_point() -> None:
    """Over 500 vectors (scales 1e-3..1e3): ``x >= 0``, ``sum x = 1`` and the optimality
    conditions of the projection, ``v_t - x_t = theta`` on the support and ``v_t <= theta`` off
    it, for one ``theta``."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(500):
        t = int(torch.randint(1, 9, (1,), generator=gen))
        v = torch.randn(t, generator=gen, dtype=torch.float64) * 10 ** (
            torch.rand(1, generator=gen, dtype=torch.float64) * 6 - 3
        )
        x = project_to_simplex(v)
        assert bool((x >= 0).all())
        assert abs(float(x.sum()) - 1) <= 1e-12 * max(1.0, float(v.abs().max()))
        support = x > 0
        theta = (v - x)[support]
        tol = 1e-12 * max(1.0, float(v.abs().max()))
        assert float(theta.max() - theta.min()) <= tol
        assert bool((v[~support] <= theta[0] + tol).all())


def no_lag_config(step: float) -> MocoConfig:
    """``y_t = g_t`` (no tracking lag), no normalisation, a constant ``lambda`` step."""
    return MocoConfig(beta=1.0, beta_sigma=0.0, gamma=step, gamma_sigma=0.0, normalization="none")


def test_the_min_norm_weights_are_a_fixed_point() -> None:
    """``lambda`` takes a projected gradient step on ``||G^T lambda||^2 / 2`` over the simplex,
    whose fixed points are its minimisers: started at MGDA's min-norm weights, a step stays
    there. Over 300 gradient sets of the sweep (scales 1e-3..1e2, ill-conditioned)."""
    for g in gradient_cases(300, seed=7):
        t = len(g)
        gram = g @ g.T
        alpha = min_norm_weights(gram, max_iter=5000, tol=1e-15)
        m = Moco([f"t{i}" for i in range(t)], no_lag_config(1.0 / float(gram.diagonal().max())))
        m.lam.copy_(alpha)
        d, lam = m.combine(g, torch.ones(t))
        # The step moves lambda by gamma * (G G^T lambda - const) off the support only if the
        # min-norm point is not optimal; on the rounding scale of G G^T lambda it does not move.
        torch.testing.assert_close(lam, alpha, rtol=0, atol=1e-6)
        torch.testing.assert_close(d, lam @ g)


def test_weights_converge_to_the_min_norm_point_for_fixed_gradients() -> None:
    """From the uniform start, with a constant step ``1 / L``, the iterates reach MGDA's
    min-norm value (20 well-conditioned cases; projected gradient descent converges linearly)."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        t = int(torch.randint(2, 5, (1,), generator=gen))
        g = torch.randn(t, 8, generator=gen, dtype=torch.float64)
        gram = g @ g.T
        m = Moco(
            [f"t{i}" for i in range(t)],
            no_lag_config(1.0 / float(torch.linalg.eigvalsh(gram).max())),
        )
        for _ in range(400):
            d, _ = m.combine(g, torch.ones(t))
        alpha = min_norm_weights(gram, max_iter=2000, tol=1e-14)
        assert float(d @ d) <= float(alpha @ gram @ alpha) + 1e-6 * float(gram.diagonal().max())


def untracked_step_on_vectors(
    g: torch.Tensor, losses: torch.Tensor, lam: torch.Tensor, gamma: float, cfg: MocoConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: Algorithm 1's step with ``y_t = g_t`` normalised, on the gradient vectors in
    float64 (the implementation before the step moved to the Gram matrix); all tasks present."""
    norms = g.norm(dim=1)
    target = {"loss": losses, "l2": torch.ones_like(losses), "none": norms}[cfg.normalization]
    y = g * (target / norms)[:, None]
    lam = project_to_simplex(lam - gamma * ((y @ y.T) @ lam + cfg.rho * lam))
    return lam @ y, lam


@pytest.mark.parametrize("normalization", ["loss", "l2", "none"])
def test_the_untracked_step_matches_the_vector_algorithm(normalization: str) -> None:
    """Without tracking (``beta = 1``, the representation mode) the step runs on the Gram matrix
    and keeps no copy of the gradients; over the sweep (scales 1e-3..1e2, nearly opposite and
    parallel pairs, more tasks than dimensions), random losses (1e-3..1e2), starting weights
    and steps up to ``2 / max ||y_t||^2``, it matches the algorithm on the vectors: ``lambda`` to 1e-12 and the
    update to 1e-12 of ``sum_t lambda_t ||y_t||`` (rounding is ~1e-15)."""
    gen = torch.Generator().manual_seed(3)
    for g in gradient_cases(300, seed=4):
        t = g.shape[0]
        losses = 10 ** (torch.rand(t, generator=gen, dtype=torch.float64) * 5 - 3)  # 1e-3..1e2
        start = torch.rand(t, generator=gen, dtype=torch.float64)
        cfg = MocoConfig(beta=1.0, beta_sigma=0.0, normalization=normalization, rho=0.01)
        norms = g.norm(dim=1)
        y_sq = {"loss": losses**2, "l2": torch.ones(t, dtype=g.dtype), "none": norms**2}
        gamma = 2 * float(torch.rand(1, generator=gen)) / float(y_sq[normalization].max())
        m = Moco([f"t{i}" for i in range(t)], cfg.model_copy(update={"gamma": gamma}))
        m.lam.copy_(start / start.sum())
        d, lam = m.combine(g, losses)
        expected_d, expected_lam = untracked_step_on_vectors(
            g, losses, start / start.sum(), gamma, cfg
        )
        torch.testing.assert_close(lam, expected_lam, rtol=0, atol=1e-12)
        scale = float(expected_lam @ y_sq[normalization].sqrt())
        assert float((d - expected_d).norm()) <= 1e-12 * scale
        assert m.y.numel() == 0  # no (T, N) buffer: y_t is this step's gradient


def test_tracking_follows_a_fixed_gradient() -> None:
    """``y <- y - beta_k (y - g)`` from 0: after ``k`` steps ``y = (1 - prod_j (1 - beta_j)) g``."""
    g = torch.tensor([[3.0, -4.0], [0.5, 0.5]], dtype=torch.float64)
    m = Moco(TASKS[:2], MocoConfig(normalization="none"))
    remaining = 1.0
    for k in range(1, 6):
        m.combine(g, torch.ones(2))
        remaining *= 1 - 0.5 / k**0.5
        torch.testing.assert_close(m.y, (1 - remaining) * g)


def test_loss_normalisation_and_resume() -> None:
    g = torch.randn(3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    losses = torch.tensor([0.5, 900.0, 0.05], dtype=torch.float64)
    a = Moco(TASKS, MocoConfig())
    a.combine(g, losses)
    torch.testing.assert_close(a.y.norm(dim=1), 0.5 * losses)  # beta_1 = 0.5, ||y_t|| = L_t / 2
    resumed = Moco(TASKS, MocoConfig())
    resumed.load_state_dict(a.state_dict())
    da, wa = a.combine(2 * g, losses)
    dr, wr = resumed.combine(2 * g, losses)
    torch.testing.assert_close(da, dr)
    torch.testing.assert_close(wa, wr)


def test_representation_mode_needs_no_tracking() -> None:
    with pytest.raises(ValidationError, match="beta: must be 1"):
        MocoConfig(mode="representation")
    MocoConfig(mode="representation", beta=1.0, beta_sigma=0.0)


def test_a_task_without_labels_in_the_batch_is_left_out() -> None:
    assert_zero_gradient_task_is_left_out(lambda tasks: Moco(tasks, MocoConfig()), TASKS)


@pytest.mark.parametrize(
    "raw",
    [
        {"mode": "parameters"},
        {"mode": "representation", "beta": 1.0, "beta_sigma": 0.0, "normalization": "l2"},
    ],
)
def test_integration_tiny_model(raw: dict[str, object]) -> None:
    weighting = build_from_raw({"name": "moco"} | raw, TASKS)
    assert isinstance(weighting, Moco)
    train_a_few_steps(weighting, TASKS)
    assert int(weighting.step) == 3


@pytest.mark.parametrize(
    ("field", "value"),
    [("beta", 0), ("beta", 1.5), ("gamma", 0), ("rho", -1), ("normalization", "loss+")],
)
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        MocoConfig(**{field: value})
    assert field in str(info.value)
