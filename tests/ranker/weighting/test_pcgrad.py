"""Tests for PCGrad (Yu et al., NeurIPS 2020)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import TypeAdapter, ValidationError
from torch import Tensor, nn

from ranker.weighting import SharedPart, Weighting, WeightingConfig, build_weighting
from ranker.weighting.pcgrad import Pcgrad, PcgradConfig, project_conflicting

torch.set_num_threads(1)

TASKS = ["click", "watch_time", "like"]
EPS = 1e-9


def test_two_tasks_closed_form() -> None:
    g1 = torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64)
    g2 = torch.tensor([-1.0, 2.0, 1.0], dtype=torch.float64)
    assert float(g1 @ g2) < 0
    d, w = Pcgrad(TASKS[:2], PcgradConfig()).combine(torch.stack([g1, g2]), torch.ones(2))
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    torch.testing.assert_close(d, p1 + p2)
    # Each projected gradient is orthogonal to the other original one: no conflict left.
    projected, _ = project_conflicting(torch.stack([g1, g2]), [[1], [0]])
    assert abs(float(projected[0] @ g2)) < EPS and abs(float(projected[1] @ g1)) < EPS
    torch.testing.assert_close(
        w, torch.tensor([1 - (g2 @ g1) / (g1 @ g1), 1 - (g1 @ g2) / (g2 @ g2)])
    )


def test_non_conflicting_gradients_are_left_unchanged() -> None:
    gen = torch.Generator().manual_seed(0)
    g = torch.rand(3, 5, generator=gen, dtype=torch.float64)  # all positive: every dot > 0
    for _ in range(3):
        d, w = Pcgrad(TASKS, PcgradConfig()).combine(g, torch.ones(3))
        torch.testing.assert_close(d, g.sum(0))
        assert w.tolist() == [1.0, 1.0, 1.0]
    # Only the conflicting pair is touched: task 2 is orthogonal-free of conflicts here.
    g = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    projected, _ = project_conflicting(g, [[1, 2], [0, 2], [0, 1]])
    torch.testing.assert_close(projected[2], g[2])
    torch.testing.assert_close(projected[0], torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("seed", range(8))
def test_no_conflict_with_the_gradient_last_projected_against(seed: int) -> None:
    """After the projection onto the normal plane of g_j, <g_i^PC, g_j> = 0; a later projection
    (against g_k) can re-introduce a conflict with g_j in general, so the invariant that always
    holds is with the last gradient visited; with two tasks that is the whole property."""
    gen = torch.Generator().manual_seed(seed)
    t = 2 + seed % 3
    g = torch.randn(t, 6, generator=gen, dtype=torch.float64)
    weighting = Pcgrad([f"task{i}" for i in range(t)], PcgradConfig(seed=seed))
    orders = weighting.orders(t)
    projected, coef = project_conflicting(g, orders)
    scale = float((g * g).sum(1).max())
    for i, order in enumerate(orders):
        assert sorted(order) == [j for j in range(t) if j != i]
        assert float(projected[i] @ g[order[-1]]) >= -EPS * scale
        if t == 2:
            assert float(projected[i] @ g[1 - i]) >= -EPS * scale
    torch.testing.assert_close(projected, coef @ g)
    # Each single projection step removes exactly the conflict with the gradient it used.
    for i, order in enumerate(orders):
        gi = g[i].clone()
        for j in order:
            if gi @ g[j] < 0:
                gi = gi - (gi @ g[j]) / (g[j] @ g[j]) * g[j]
                assert abs(float(gi @ g[j])) <= EPS * scale
        torch.testing.assert_close(gi, projected[i])


def test_seeded_and_resumable() -> None:
    g = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a, b = Pcgrad(TASKS, PcgradConfig(seed=7)), Pcgrad(TASKS, PcgradConfig(seed=7))
    assert a.orders(3) == b.orders(3)
    a.combine(g, torch.ones(3))
    a.combine(g, torch.ones(3))
    resumed = Pcgrad(TASKS, PcgradConfig(seed=7))
    resumed.load_state_dict(a.state_dict())
    assert int(resumed.step) == 2 and resumed.orders(3) == a.orders(3)
    # Over many steps the orders differ (they are random).
    seen = set()
    for _ in range(20):
        seen.add(tuple(map(tuple, b.orders(3))))
        b.combine(g, torch.ones(3))
    assert len(seen) > 1


def test_a_task_without_labels_in_the_batch_is_left_out() -> None:
    """A batch with no labelled row for a task gives it an exact zero gradient (``head_loss``
    returns an attached 0): weight 0, and the others are combined as if it did not exist."""
    g = torch.randn(3, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    g[1] = 0.0
    losses = torch.tensor([0.7, 0.0, 0.3], dtype=torch.float64)
    d3, w3 = Pcgrad(TASKS, PcgradConfig()).combine(g, losses)
    d2, w2 = Pcgrad(["click", "like"], PcgradConfig()).combine(g[[0, 2]], losses[[0, 2]])
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


@pytest.mark.parametrize("mode", ["representation", "parameters"])
def test_integration_tiny_model(mode: str) -> None:
    config = TypeAdapter(WeightingConfig).validate_python({"name": "pcgrad", "mode": mode})
    weighting = build_weighting(config, TASKS)
    assert isinstance(weighting, Pcgrad)
    train_a_few_steps(weighting)
    assert int(weighting.step) == 3


@pytest.mark.parametrize(("field", "value"), [("seed", -1), ("seed", "x"), ("mode", "both")])
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        PcgradConfig(**{field: value})
    assert field in str(info.value)
