"""Tests for DB-MTL (Lin et al., 2023)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from ranker.weighting import SharedPart
from ranker.weighting.db_mtl import LOG_EPS, DbMtl, DbMtlConfig
from tests.ranker.weighting.toy import (
    Linear3,
    build_from_raw,
    sweep_grads,
    train_a_few_steps,
)

torch.set_num_threads(1)

TASKS = ["click", "watch_time", "like"]


@pytest.mark.parametrize(("beta", "sigma"), [(0.9, 0.0), (0.5, 0.0), (0.9, 0.5), (0.0, 0.0)])
def test_scaled_log_gradients_have_the_max_norm_with_the_ema(beta: float, sigma: float) -> None:
    """Constant log-loss gradients of very different sizes: after k steps the EMA is
    (1 - prod_i beta_i) g_t, and every task's scaled EMA has the largest EMA norm."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(3, 6, generator=gen, dtype=torch.float64) * torch.tensor(
        [[0.01], [1.0], [30.0]], dtype=torch.float64
    )
    weighting = DbMtl(TASKS, DbMtlConfig(beta=beta, beta_sigma=sigma))
    log_losses = torch.log(torch.tensor([0.5, 20.0, 1e-3], dtype=torch.float64))
    keep = 1.0
    for k in range(1, 6):
        d, w = weighting.combine(g, log_losses)
        keep *= beta / k**sigma
        m = weighting.grad_buffer
        torch.testing.assert_close(m, (1 - keep) * g)
        alpha = w * torch.exp(log_losses)  # returned weights are alpha_t / (L_t + eps)
        scaled = alpha[:, None] * m
        norms = scaled.norm(dim=1)
        torch.testing.assert_close(norms, m.norm(dim=1).max().expand(3), rtol=1e-7, atol=0)
        torch.testing.assert_close(d, scaled.sum(0))
    assert int(weighting.step) == 5


@pytest.mark.parametrize(("beta", "dtype"), [(0.9, torch.float64), (0.0, torch.float32)])
def test_scaled_emas_have_the_max_norm_on_a_sweep(beta: float, dtype: torch.dtype) -> None:
    """:func:`sweep_grads` (288 cases, gradients of very different sizes), three steps each with
    the gradients rescaled per step: every task's scaled EMA has the largest EMA norm, and the
    update is their sum (float64: to 1e-12; float32, the trainer's dtype: to 1e-5; both relative
    to the largest EMA norm)."""
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    failed = []
    cases = sweep_grads()
    for label, g in cases:
        t = g.shape[0]
        weighting = DbMtl([f"task{i}" for i in range(t)], DbMtlConfig(beta=beta))
        ema = torch.zeros_like(g)
        for k, factor in enumerate((1.0, 0.3, 2.0)):
            step = (factor * g).to(dtype)
            d, w = weighting.combine(step, torch.zeros(t, dtype=torch.float64))
            ema = beta * ema + (1 - beta) * step.double()
            norms = ema.norm(dim=1)
            scaled = w.double()[:, None] * ema
            got = scaled.norm(dim=1)
            if not torch.allclose(got, norms.max().expand(t), rtol=rtol, atol=0):
                failed.append(f"{label} step {k}: scaled norms {got.tolist()}")
                break
            # to the rounding of a sum of t vectors of norm max ||m_s|| (they may cancel)
            atol = rtol * t * float(norms.max()) / g.shape[1] ** 0.5
            if not torch.allclose(d.double(), scaled.sum(0), rtol=rtol, atol=atol):
                failed.append(f"{label} step {k}: update is not the scaled EMAs' sum")
                break
    assert not failed, f"{len(failed)} of {len(cases)} cases: " + "; ".join(failed[:10])


@pytest.mark.parametrize("mode", ["representation", "parameters"])
def test_backward_balances_gradients_of_the_log_losses(mode: str) -> None:
    """beta = 0: shared params get sum_t alpha_t grad log L_t with alpha_t = max / ||grad log
    L_t|| (norms on the mode's target), heads get grad log L_t (the whole objective is log)."""
    m = Linear3(TASKS)
    rep, losses = m.losses()
    shared = list(m.shared.parameters())
    target = [rep] if mode == "representation" else shared
    logs = [torch.log(losses[t] + LOG_EPS) for t in TASKS]
    per_task = [
        torch.cat([x.reshape(-1) for x in torch.autograd.grad(lg, target, retain_graph=True)])
        for lg in logs
    ]
    norms = torch.stack([p.norm() for p in per_task])
    alpha = norms.max() / norms
    d = sum(a * p for a, p in zip(alpha, per_task, strict=True))
    if mode == "representation":
        expected_shared = torch.autograd.grad(rep, shared, d.view_as(rep), retain_graph=True)
    else:
        expected_shared = [d[:30].view(6, 5), d[30:]]
    expected_heads = torch.autograd.grad(sum(logs), list(m.heads.parameters()), retain_graph=True)

    weighting = DbMtl(TASKS, DbMtlConfig(mode=mode, beta=0.0))
    logged = weighting.backward(losses, SharedPart(shared, rep))
    for p, e in zip(shared, expected_shared, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-6)
    for p, e in zip(m.heads.parameters(), expected_heads, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-6)
    raw = torch.stack([losses[t].detach() for t in TASKS])
    torch.testing.assert_close(torch.tensor(list(logged.values())), alpha / (raw + LOG_EPS))


def test_negative_losses_are_refused() -> None:
    m = Linear3(TASKS)
    rep, losses = m.losses()
    losses["like"] = -losses["like"]
    with pytest.raises(ValueError, match="needs them >= 0"):
        DbMtl(TASKS, DbMtlConfig()).backward(losses, SharedPart(list(m.shared.parameters()), rep))


def test_ema_survives_a_resume() -> None:
    g = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    a = DbMtl(TASKS, DbMtlConfig())
    a.combine(g, torch.zeros(3))
    a.combine(2 * g, torch.zeros(3))
    b = DbMtl(TASKS, DbMtlConfig())
    b.load_state_dict(a.state_dict())
    assert int(b.step) == 2
    torch.testing.assert_close(b.grad_buffer, a.grad_buffer)
    da, _ = a.combine(g, torch.zeros(3))
    db, _ = b.combine(g, torch.zeros(3))
    torch.testing.assert_close(da, db)


def test_a_task_without_labels_in_the_batch_is_left_out() -> None:
    """A batch with no labelled row for a task gives it an exact zero gradient: weight 0, its
    EMA is left as it was, and the others are balanced among themselves."""
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    weighting = DbMtl(TASKS, DbMtlConfig(beta=0.5))
    weighting.combine(g, torch.zeros(3, dtype=torch.float64))
    before = weighting.grad_buffer.clone()
    g2 = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    g2[1] = 0.0
    d, w = weighting.combine(g2, torch.zeros(3, dtype=torch.float64))
    m = weighting.grad_buffer
    torch.testing.assert_close(m[1], before[1])
    torch.testing.assert_close(m[[0, 2]], 0.5 * before[[0, 2]] + 0.5 * g2[[0, 2]])
    assert float(w[1]) == 0.0
    top = m[[0, 2]].norm(dim=1).max()
    torch.testing.assert_close((w[[0, 2], None] * m[[0, 2]]).norm(dim=1), top.expand(2))
    torch.testing.assert_close(d, (w[:, None] * m).sum(0))


# --- integration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw", [{"mode": "parameters"}, {"mode": "representation", "beta": 0.0}], ids=str
)
def test_integration_tiny_model(raw: dict[str, object]) -> None:
    weighting = build_from_raw({"name": "db_mtl", **raw}, TASKS)
    assert isinstance(weighting, DbMtl)
    for w in train_a_few_steps(weighting, TASKS):
        assert min(w.values()) > 0


def test_default_mode_is_parameters_and_representation_needs_beta_zero() -> None:
    assert DbMtlConfig().mode == "parameters"
    with pytest.raises(ValidationError, match="beta: must be 0 with mode .representation."):
        DbMtlConfig(mode="representation")


@pytest.mark.parametrize(
    ("field", "value"),
    [("beta", 1.0), ("beta", -0.1), ("beta_sigma", -1.0), ("beta_sigma", math.nan)],
)
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        DbMtlConfig(**{field: value})
    assert field in str(info.value)
