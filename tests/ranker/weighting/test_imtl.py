"""Tests for IMTL-G (Liu et al., ICLR 2021)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import TypeAdapter, ValidationError
from torch import Tensor, nn

from ranker.weighting import SharedPart, Weighting, WeightingConfig, build_weighting
from ranker.weighting.imtl import Imtl, ImtlConfig, imtl_weights

torch.set_num_threads(1)

TASKS = ["click", "watch_time", "like"]


@pytest.mark.parametrize("t", [2, 3, 4])
@pytest.mark.parametrize("seed", range(5))
def test_aggregated_gradient_has_equal_projections_on_every_unit_gradient(
    t: int, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, 2, t, dtype=torch.float64)[:, None]  # very unequal magnitudes
    g = scales * torch.randn(t, 7, generator=gen, dtype=torch.float64)
    d, alpha = Imtl([f"task{i}" for i in range(t)], ImtlConfig()).combine(g, torch.ones(t))
    u = g / g.norm(dim=1, keepdim=True)
    proj = u @ d
    torch.testing.assert_close(proj, proj.mean().expand(t), rtol=1e-9, atol=1e-12)
    assert math.isclose(float(alpha.sum()), 1.0, rel_tol=1e-12)
    torch.testing.assert_close(d, alpha @ g)


def test_two_tasks_by_hand() -> None:
    # g1 = (2, 0), g2 = (0, 1): equal projections need alpha1 * 2 = alpha2 * 1, alpha1 + alpha2 = 1.
    g = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    d, alpha = Imtl(TASKS[:2], ImtlConfig()).combine(g, torch.ones(2))
    torch.testing.assert_close(alpha, torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    torch.testing.assert_close(d, torch.tensor([2 / 3, 2 / 3], dtype=torch.float64))


def test_degenerate_inputs() -> None:
    assert imtl_weights(torch.randn(1, 3)).tolist() == [1.0]
    g = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.5, -1.0]])  # two identical gradients
    d, alpha = Imtl(TASKS, ImtlConfig()).combine(g, torch.ones(3))
    assert torch.isfinite(d).all() and torch.isfinite(alpha).all()
    u = g / g.norm(dim=1, keepdim=True)
    proj = (u @ d).double()
    torch.testing.assert_close(proj, proj.mean().expand(3), rtol=1e-5, atol=1e-6)


def test_a_task_without_labels_in_the_batch_is_left_out() -> None:
    """A batch with no labelled row for a task gives it an exact zero gradient (``head_loss``
    returns an attached 0): weight 0, and the others are combined as if it did not exist."""
    g = torch.randn(3, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    g[1] = 0.0
    losses = torch.tensor([0.7, 0.0, 0.3], dtype=torch.float64)
    d3, w3 = Imtl(TASKS, ImtlConfig()).combine(g, losses)
    d2, w2 = Imtl(["click", "like"], ImtlConfig()).combine(g[[0, 2]], losses[[0, 2]])
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
    config = TypeAdapter(WeightingConfig).validate_python({"name": "imtl", "mode": mode})
    weighting = build_weighting(config, TASKS)
    assert isinstance(weighting, Imtl)
    for w in train_a_few_steps(weighting):
        assert math.isclose(sum(w.values()), 1.0, rel_tol=1e-4)


@pytest.mark.parametrize(("field", "value"), [("mode", "both"), ("alpha", 1.0)])
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        ImtlConfig(**{field: value})
    assert field in str(info.value)
