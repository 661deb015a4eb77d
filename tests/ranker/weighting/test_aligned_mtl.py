"""Tests for Aligned-MTL (Senushkin et al., CVPR 2023)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import TypeAdapter, ValidationError
from torch import Tensor, nn

from ranker.weighting import SharedPart, Weighting, WeightingConfig, build_weighting
from ranker.weighting.aligned_mtl import AlignedMtl, AlignedMtlConfig, alignment_matrix

torch.set_num_threads(1)

TASKS = ["click", "watch_time", "like"]


def random_grads(t: int, seed: int, n: int = 9) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, t, dtype=torch.float64)[:, None]
    return scales * torch.randn(t, n, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("t", [2, 3, 4])
@pytest.mark.parametrize("seed", range(5))
def test_aligned_matrix_has_condition_number_one(t: int, seed: int) -> None:
    g = random_grads(t, seed)
    sv = torch.linalg.svdvals(g)
    assert float(sv.max() / sv.min()) > 2  # the input is badly conditioned
    aligned = alignment_matrix(g) @ g
    sv_aligned = torch.linalg.svdvals(aligned)
    torch.testing.assert_close(sv_aligned, sv.min().expand(t), rtol=1e-9, atol=0)
    # Equivalently: aligned gradients are orthogonal with equal norms.
    torch.testing.assert_close(
        aligned @ aligned.T, sv.min() ** 2 * torch.eye(t, dtype=torch.float64), rtol=0, atol=1e-9
    )


@pytest.mark.parametrize(("scale", "pick"), [("median", "median"), ("rmse", "rmse")])
def test_other_scales_pick_the_common_singular_value(scale: str, pick: str) -> None:
    g = random_grads(4, 0)
    lam = torch.linalg.svdvals(g) ** 2
    target = lam.median() if pick == "median" else lam.mean()
    sv = torch.linalg.svdvals(alignment_matrix(g, scale) @ g)
    torch.testing.assert_close(sv, target.sqrt().expand(4), rtol=1e-9, atol=0)


def test_rank_deficient_gradients_are_aligned_on_their_span() -> None:
    g = random_grads(3, 1)
    g[2] = 2 * g[0] - g[1]  # rank 2
    sv = torch.linalg.svdvals(alignment_matrix(g.float()).float() @ g.float())
    torch.testing.assert_close(sv[:2], sv[0].expand(2), rtol=1e-4, atol=0)
    assert float(sv[2]) < 1e-4 * float(sv[0])


def test_direction_is_the_pre_weighted_sum_of_aligned_gradients() -> None:
    g = random_grads(3, 2)
    b = alignment_matrix(g)
    d, w = AlignedMtl(TASKS, AlignedMtlConfig()).combine(g, torch.ones(3))
    torch.testing.assert_close(d, (b @ g).sum(0))
    torch.testing.assert_close(d, w @ g)
    pre = {"click": 1.0, "watch_time": 0.5, "like": 2.0}
    d, w = AlignedMtl(TASKS, AlignedMtlConfig(task_weights=pre)).combine(g, torch.ones(3))
    torch.testing.assert_close(d, torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64) @ (b @ g))
    # All-zero gradients: nothing to align, zero update.
    d, w = AlignedMtl(TASKS, AlignedMtlConfig()).combine(torch.zeros(3, 4), torch.ones(3))
    assert torch.equal(d, torch.zeros(4)) and torch.isfinite(w).all()


def test_task_weights_must_name_every_task() -> None:
    with pytest.raises(ValueError, match="missing \\['like'\\]"):
        AlignedMtl(TASKS, AlignedMtlConfig(task_weights={"click": 1.0, "watch_time": 1.0}))


def test_a_task_without_labels_in_the_batch_is_left_out() -> None:
    """A batch with no labelled row for a task gives it an exact zero gradient (``head_loss``
    returns an attached 0): weight 0, and the others are combined as if it did not exist."""
    g = torch.randn(3, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    g[1] = 0.0
    losses = torch.tensor([0.7, 0.0, 0.3], dtype=torch.float64)
    d3, w3 = AlignedMtl(TASKS, AlignedMtlConfig()).combine(g, losses)
    d2, w2 = AlignedMtl(["click", "like"], AlignedMtlConfig()).combine(g[[0, 2]], losses[[0, 2]])
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
    config = TypeAdapter(WeightingConfig).validate_python({"name": "aligned_mtl", "mode": mode})
    weighting = build_weighting(config, TASKS)
    assert isinstance(weighting, AlignedMtl)
    train_a_few_steps(weighting)


@pytest.mark.parametrize(
    ("field", "value"),
    [("scale", "max"), ("task_weights", {"click": -1.0}), ("task_weights", {"a": math.nan})],
)
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        AlignedMtlConfig(**{field: value})
    assert field in str(info.value)
