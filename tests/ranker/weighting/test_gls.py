"""Tests for GLS, the geometric loss strategy (Chennupati et al., CVPR Workshops 2019)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from ranker.weighting import SharedPart
from ranker.weighting.gls import Gls, GlsConfig, geometric_mean_weights
from tests.ranker.weighting.sweep import loss_cases
from tests.ranker.weighting.toy import Linear3, build_from_raw, train_a_few_steps

torch.set_num_threads(1)

TASKS = ["click", "watch_time", "like"]


def test_weights_give_the_gradient_of_the_geometric_mean() -> None:
    """Over hundreds of loss vectors (1e-3..1e2, some with a zero loss): ``sum_t w_t L_t`` is the
    geometric mean of the positive losses and ``w_t`` is its derivative w.r.t. ``L_t``."""
    for losses in loss_cases(400):
        present = losses > 0
        x = losses.clone().requires_grad_(True)
        gm = torch.exp(torch.log(x[present]).mean())
        (grad,) = torch.autograd.grad(gm, x)
        w = geometric_mean_weights(losses)
        torch.testing.assert_close(w, grad, rtol=1e-12, atol=0)
        torch.testing.assert_close((w * losses).sum(), gm.detach(), rtol=1e-12, atol=0)
        assert bool((w[~present] == 0).all())


@pytest.mark.parametrize("c", [1e-3, 0.5, 7.0, 1e2])
def test_scaling_one_loss_scales_the_update_by_its_t_th_root(c: float) -> None:
    """The defining property: multiplying ``L_t`` by ``c`` multiplies every gradient by
    ``c^(1/T)``; the direction does not change."""

    def grads(scale: float) -> list[torch.Tensor]:
        m = Linear3(TASKS)
        rep, losses = m.losses()
        losses["watch_time"] = scale * losses["watch_time"]
        Gls(TASKS, GlsConfig()).backward(losses, SharedPart(list(m.shared.parameters()), rep))
        return [p.grad.clone() for p in [*m.shared.parameters(), *m.heads.parameters()]]

    for a, b in zip(grads(1.0), grads(c), strict=True):
        torch.testing.assert_close(b, a * c ** (1 / 3), rtol=1e-4, atol=1e-7)


def test_negative_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="negative for \\['like'\\]"):
        Gls(TASKS, GlsConfig()).weights(torch.tensor([1.0, 2.0, -0.1]))


def test_integration_tiny_model() -> None:
    weighting = build_from_raw({"name": "gls"}, TASKS)
    assert isinstance(weighting, Gls)
    logged = train_a_few_steps(weighting, TASKS)
    assert all(v > 0 for w in logged for v in w.values())


def test_config_rejects_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="mode"):
        GlsConfig(mode="parameters")  # type: ignore[call-arg]
