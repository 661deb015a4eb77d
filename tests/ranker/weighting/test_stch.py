"""Tests for STCH, smooth Tchebycheff scalarisation (Lin et al., ICML 2024)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from ranker.weighting.stch import LOG_EPS, Stch, StchConfig, stch_weights
from tests.ranker.weighting.sweep import loss_cases
from tests.ranker.weighting.toy import build_from_raw, train_a_few_steps

torch.set_num_threads(1)

TASKS = ["click", "watch_time", "like"]


def objectives(x: torch.Tensor, nadir: torch.Tensor, kind: str) -> torch.Tensor:
    return torch.log(x / nadir + LOG_EPS) if kind == "log" else x / nadir


@pytest.mark.parametrize("kind", ["log", "raw"])
@pytest.mark.parametrize("mu", [1e-2, 1.0, 10.0])
def test_weights_give_the_gradient_of_the_smoothed_max(kind: str, mu: float) -> None:
    """Over hundreds of loss vectors and nadir vectors (1e-3..1e2): ``w`` is the gradient of
    ``T mu log sum_t exp(f_t / mu)`` w.r.t. the losses, over the tasks with a positive loss."""
    gen = torch.Generator().manual_seed(1)
    for losses in loss_cases(300):
        nadir = 10 ** (torch.rand(len(losses), generator=gen, dtype=torch.float64) * 5 - 3)
        present = losses > 0
        x = losses.clone().requires_grad_(True)
        f = objectives(x[present], nadir[present], kind)
        value = int(present.sum()) * mu * torch.logsumexp(f / mu, dim=0)
        (grad,) = torch.autograd.grad(value, x)
        w = stch_weights(losses, mu, kind, nadir)
        torch.testing.assert_close(w, grad, rtol=1e-9, atol=1e-300)  # denormals: underflow
        assert bool((w[~present] == 0).all())


@pytest.mark.parametrize("kind", ["log", "raw"])
def test_bounds_and_limits_of_the_smoothing(kind: str) -> None:
    """The paper's Proposition 3.3: ``max_t f_t <= g_mu <= max_t f_t + mu log T``; as ``mu -> 0``
    the weight goes to the worst task alone (Tchebycheff), as ``mu -> inf`` the softmax is
    uniform (the sum of the objectives)."""
    for losses in loss_cases(300, seed=2):
        x = losses[losses > 0]
        t = len(x)
        f = objectives(x, torch.ones_like(x), kind)
        for mu in (1e-3, 0.1, 1.0, 100.0):
            g = mu * torch.logsumexp(f / mu, 0)
            assert float(f.max()) <= float(g) + 1e-12 * abs(float(g))
            assert float(g) <= float(f.max()) + mu * math.log(t) + 1e-12 * abs(float(g))
        df = 1 / (x + LOG_EPS) if kind == "log" else torch.ones_like(x)
        p_small = stch_weights(x, 1e-6, kind) / (t * df)  # the softmax itself
        gap = torch.sort(f, descending=True).values
        if t > 1 and float(gap[0] - gap[1]) > 1e-3:
            assert float(p_small[int(f.argmax())]) > 1 - 1e-12
        p_large = stch_weights(x, 1e9, kind) / (t * df)
        torch.testing.assert_close(p_large, torch.full_like(p_large, 1 / t), rtol=1e-6, atol=0)


def test_warmup_sets_the_nadir_and_is_resumable() -> None:
    w = Stch(TASKS, StchConfig(warmup_epochs=2))
    losses = torch.tensor([0.5, 800.0, 0.05], dtype=torch.float64)
    # Warm-up: the sum of log-losses, weights 1 / (L_t + eps).
    torch.testing.assert_close(w.weights(losses), 1 / (losses + LOG_EPS))
    w.epoch_end({"click": 0.7, "watch_time": 900.0, "like": 0.1})
    torch.testing.assert_close(w.weights(losses), 1 / (losses + LOG_EPS))
    w.epoch_end({"click": 0.6, "watch_time": 850.0, "like": 0.0})  # like never labelled
    assert w.nadir.tolist() == [0.6, 850.0, 1.0]
    resumed = Stch(TASKS, StchConfig(warmup_epochs=2))
    resumed.load_state_dict(w.state_dict())
    nadir = torch.tensor([0.6, 850.0, 1.0], dtype=torch.float64)
    expected = stch_weights(losses, 1.0, "log", nadir)
    torch.testing.assert_close(resumed.weights(losses), expected)
    # mu = 1 on log objectives: equal weighting of the normalised losses, w_t ~ 1 / n_t.
    torch.testing.assert_close(expected * nadir, (expected * nadir)[:1].expand(3))
    w.epoch_end({"click": 0.1, "watch_time": 1.0, "like": 1.0})  # later epochs: nadir kept
    assert w.nadir.tolist() == [0.6, 850.0, 1.0]


def test_negative_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="negative for \\['click'\\]"):
        Stch(TASKS, StchConfig()).weights(torch.tensor([-1.0, 2.0, 0.1]))


@pytest.mark.parametrize("raw", [{}, {"objectives": "raw", "warmup_epochs": 0, "mu": 0.5}])
def test_integration_tiny_model(raw: dict[str, object]) -> None:
    weighting = build_from_raw({"name": "stch"} | raw, TASKS)
    assert isinstance(weighting, Stch)
    train_a_few_steps(weighting, TASKS)
    weighting.epoch_end({"click": 0.7, "watch_time": 900.0, "like": 0.7})
    train_a_few_steps(weighting, TASKS)


@pytest.mark.parametrize(
    ("field", "value"),
    [("mu", 0), ("mu", float("inf")), ("objectives", "exp"), ("warmup_epochs", -1)],
)
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        StchConfig(**{field: value})
    assert field in str(info.value)
