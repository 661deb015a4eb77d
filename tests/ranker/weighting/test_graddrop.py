"""Tests for GradDrop, gradient sign dropout (Chen et al., NeurIPS 2020)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from ranker.weighting import SharedPart
from ranker.weighting.graddrop import Graddrop, GraddropConfig, drop_masks, sign_purity
from tests.ranker.weighting.sweep import gradient_cases
from tests.ranker.weighting.toy import (
    Linear3,
    assert_zero_gradient_task_is_left_out,
    build_from_raw,
    train_a_few_steps,
)

torch.set_num_threads(1)

TASKS = ["click", "watch_time", "like"]


def test_kept_gradients_agree_in_sign_at_every_entry() -> None:
    """Pure GradDrop (leak 0): at every entry the gradients that pass all have the sign that
    was picked, and every gradient of that sign passes. Over the sweep's gradient sets."""
    for k, g in enumerate(gradient_cases(300)):
        t = len(g)
        w = Graddrop([f"t{i}" for i in range(t)], GraddropConfig(seed=k))
        d, _ = w.combine(g, torch.ones(t))
        for e in range(g.shape[1]):
            pos, neg = g[:, e] > 0, g[:, e] < 0
            candidates = torch.stack(
                [g[pos, e].sum(), g[neg, e].sum(), torch.zeros((), dtype=g.dtype)]
            )
            # all the gradients of one sign, or nothing
            assert bool(torch.isclose(d[e], candidates, rtol=1e-12, atol=0).any()), (k, e)


def test_where_all_tasks_agree_nothing_is_dropped() -> None:
    gen = torch.Generator().manual_seed(1)
    for k in range(100):
        g = (
            torch.rand(4, 50, generator=gen, dtype=torch.float64)
            * torch.logspace(-3, 2, 4)[:, None]
        )
        g = g * torch.where(torch.rand(50, generator=gen) < 0.5, -1.0, 1.0)  # one sign per entry
        d, w = Graddrop([f"t{i}" for i in range(4)], GraddropConfig(seed=k)).combine(
            g, torch.ones(4)
        )
        torch.testing.assert_close(d, g.sum(0))
        torch.testing.assert_close(w, torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_the_positive_sign_is_kept_with_probability_p(p: float) -> None:
    """Sign purity ``P = 1/2 (1 + sum G / sum |G|)``; the positive gradients pass with
    probability ``P``. 20000 entries with the same ``P``: the observed frequency is within four
    standard deviations."""
    n = 20000
    g = torch.stack([torch.full((n,), p), torch.full((n,), -(1 - p))]).double()
    purity = sign_purity(g)
    torch.testing.assert_close(purity, torch.full((n,), p, dtype=torch.float64))
    d, _ = Graddrop(TASKS[:2], GraddropConfig(seed=3)).combine(g, torch.ones(2))
    freq = float((d > 0).double().mean())
    assert abs(freq - p) <= 4 * (p * (1 - p) / n) ** 0.5
    one_sign = torch.isclose(d, g[0]) | torch.isclose(d, g[1])
    assert bool(one_sign.all())  # exactly one sign at every entry


def test_masks_follow_algorithm_1() -> None:
    signed = torch.tensor([[1.0, -2.0, 0.0, 3.0], [-1.0, -1.0, 0.0, 1.0]])
    purity = sign_purity(signed)
    torch.testing.assert_close(purity, torch.tensor([0.5, 0.0, 0.5, 1.0]))
    masks = drop_masks(signed, purity, torch.tensor([0.4, 0.3, 0.2, 0.99]))
    # entry 0: P = 0.5 > U keeps the positive; 1: P = 0 keeps both negatives; 2: no gradient;
    # 3: all positive, P = 1 keeps both
    assert masks.tolist() == [[1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0]]


def test_representation_mode_signs_by_the_activations_and_sums_over_the_batch() -> None:
    """At the representation, ``G_i = sum_batch sign(A) dL_i/dA`` decides a feature's mask,
    and the mask applies to every sample's gradient of that feature (Algorithm 1)."""
    m = Linear3(TASKS)
    rep, losses = m.losses()
    w = Graddrop(TASKS, GraddropConfig(mode="representation", seed=5))
    grads = w.task_gradients(w.stack(losses), [rep])  # (T, B * F)
    per_sample = grads.view(3, *rep.shape)
    signed = (per_sample * rep.detach().sign()).sum(1).double()
    masks = drop_masks(signed, sign_purity(signed), w.uniform(rep.shape[1]))
    expected = (per_sample * masks[:, None, :]).sum(0).to(rep.dtype)
    params = list(m.shared.parameters())
    want = torch.autograd.grad(rep, params, expected, retain_graph=True)
    w.backward(losses, SharedPart(params, rep))
    for p, g in zip(params, want, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_full_leak_is_the_plain_sum_and_draws_are_seeded() -> None:
    g = torch.randn(3, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d, _ = Graddrop(TASKS, GraddropConfig(leak=1.0)).combine(g, torch.ones(3))
    torch.testing.assert_close(d, g.sum(0))
    a = Graddrop(TASKS, GraddropConfig(seed=9))
    a.combine(g, torch.ones(3))
    resumed = Graddrop(TASKS, GraddropConfig(seed=9))
    resumed.load_state_dict(a.state_dict())
    torch.testing.assert_close(a.combine(g, torch.ones(3))[0], resumed.combine(g, torch.ones(3))[0])
    seen = {tuple(a.combine(g, torch.ones(3))[0].sign().tolist()) for _ in range(5)}
    assert len(seen) > 1  # new draws every step


def test_a_task_without_labels_in_the_batch_is_left_out() -> None:
    assert_zero_gradient_task_is_left_out(lambda tasks: Graddrop(tasks, GraddropConfig()), TASKS)


@pytest.mark.parametrize("mode", ["representation", "parameters"])
def test_integration_tiny_model(mode: str) -> None:
    weighting = build_from_raw({"name": "graddrop", "mode": mode}, TASKS)
    assert isinstance(weighting, Graddrop)
    train_a_few_steps(weighting, TASKS)
    assert int(weighting.step) == 3


@pytest.mark.parametrize(("field", "value"), [("leak", -0.1), ("leak", 2.0), ("seed", -1)])
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        GraddropConfig(**{field: value})
    assert field in str(info.value)
