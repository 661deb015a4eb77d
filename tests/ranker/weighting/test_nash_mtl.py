"""Tests for Nash-MTL (Navon et al., ICML 2022)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import TypeAdapter, ValidationError
from torch import Tensor, nn

from ranker.weighting import SharedPart, Weighting, WeightingConfig, build_weighting
from ranker.weighting.nash_mtl import NashMtl, NashMtlConfig, solve_bargaining

torch.set_num_threads(1)

TASKS = ["click", "watch_time", "like"]


def random_grads(t: int, seed: int, n: int = 8) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-3, 2, t, dtype=torch.float64)[:, None]  # 1e-3 .. 1e2
    g = torch.randn(t, n, generator=gen, dtype=torch.float64)
    if t > 2:
        g[1] = -0.7 * g[0] + 0.3 * g[1]  # a conflict
    return scales * g


@pytest.mark.parametrize("t", [2, 3, 4])
@pytest.mark.parametrize("seed", range(5))
def test_weights_solve_the_bargaining_equations(t: int, seed: int) -> None:
    g = random_grads(t, seed)
    d, alpha = NashMtl([f"task{i}" for i in range(t)], NashMtlConfig()).combine(g, torch.ones(t))
    gram = g @ g.T
    assert float(alpha.min()) > 0
    # (G G^T alpha)_t * alpha_t = 1 for every task, within 1e-6 (solver tolerance 1e-8).
    torch.testing.assert_close(
        alpha * (gram @ alpha), torch.ones(t, dtype=torch.float64), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(d, alpha @ g)
    # Consequence: ||d||^2 = alpha^T G G^T alpha = T, whatever the gradients' scale.
    assert math.isclose(float(d @ d), t, rel_tol=1e-5)


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


class Linear3:
    """A linear shared layer and three linear heads on a fixed batch."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 5, generator=gen)
        self.y = torch.randn(16, 3, generator=gen) * torch.tensor([1.0, 10.0, 0.1])
        torch.manual_seed(0)
        self.shared = nn.Linear(5, 6)
        self.heads = nn.ModuleList([nn.Linear(6, 1) for _ in TASKS])

    def losses(self) -> tuple[Tensor, dict[str, Tensor]]:
        rep = self.shared(self.x)
        return rep, {
            t: F.mse_loss(h(rep).squeeze(-1), self.y[:, i])
            for i, (t, h) in enumerate(zip(TASKS, self.heads, strict=True))
        }


@pytest.mark.parametrize("mode", ["representation", "parameters"])
def test_steps_between_solves_reuse_alpha_with_the_same_update_rule(mode: str) -> None:
    m = Linear3()
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
    m = Linear3()
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
    """A batch with no labelled row for a task gives it an exact zero gradient (``head_loss``
    returns an attached 0): weight 0, and the others are combined as if it did not exist."""
    g = torch.randn(3, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    g[1] = 0.0
    losses = torch.tensor([0.7, 0.0, 0.3], dtype=torch.float64)
    d3, w3 = NashMtl(TASKS, NashMtlConfig()).combine(g, losses)
    d2, w2 = NashMtl(["click", "like"], NashMtlConfig()).combine(g[[0, 2]], losses[[0, 2]])
    assert float(w3[1]) == 0.0
    torch.testing.assert_close(w3[[0, 2]], w2, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(d3, d2, rtol=1e-6, atol=1e-9)


# --- integration -------------------------------------------------------------------------------


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(5, 8)
        self.heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in TASKS})

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        rep = torch.relu(self.shared(x)).view(-1, 2, 4)
        return rep, {t: h(rep.flatten(1)).squeeze(-1) for t, h in self.heads.items()}


def train_a_few_steps(weighting: Weighting, steps: int = 3) -> list[dict[str, float]]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = TinyModel()
    opt = torch.optim.Adam([*model.parameters(), *weighting.parameters()], lr=1e-2)
    logged = []
    for _ in range(steps):
        x = torch.randn(16, 5, generator=gen)
        rep, out = model(x)
        losses = {
            "click": F.binary_cross_entropy_with_logits(out["click"], (x[:, 0] > 0).float()),
            "watch_time": F.mse_loss(out["watch_time"], 50 * torch.rand(16, generator=gen)),
            "like": F.binary_cross_entropy_with_logits(out["like"], (x[:, 1] > 1).float()),
        }
        assert all(torch.isfinite(v) for v in losses.values())
        opt.zero_grad(set_to_none=True)
        logged.append(weighting.backward(losses, SharedPart(list(model.shared.parameters()), rep)))
        opt.step()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    for w in logged:
        assert set(w) == set(TASKS) and all(math.isfinite(v) for v in w.values())
    return logged


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("mode", ["representation", "parameters"])
def test_integration_tiny_model(mode: str, every: int) -> None:
    config = TypeAdapter(WeightingConfig).validate_python(
        {"name": "nash_mtl", "mode": mode, "update_weights_every": every}
    )
    weighting = build_weighting(config, TASKS)
    assert isinstance(weighting, NashMtl)
    for w in train_a_few_steps(weighting):
        assert min(w.values()) > 0


@pytest.mark.parametrize(
    ("field", "value"),
    [("update_weights_every", 0), ("max_norm", -1.0), ("max_norm", math.inf), ("tol", 0.0)],
)
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        NashMtlConfig(**{field: value})
    assert field in str(info.value)
