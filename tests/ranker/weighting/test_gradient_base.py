"""Checks of :class:`GradientWeighting.backward` itself, with stand-in ``combine`` rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ranker.weighting import GradientConfigBase, GradientWeighting, SharedPart

torch.set_num_threads(1)

TASKS = ["click", "watch_time", "like"]


class PlainSum(GradientWeighting):
    """combine = the plain sum of the task gradients: must reproduce ``sum(losses).backward()``."""

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        return grads.sum(0), torch.ones_like(losses)


class Fixed(GradientWeighting):
    """combine = a given direction, whatever the gradients."""

    def __init__(self, tasks: list[str], config: GradientConfigBase, d: Tensor) -> None:
        super().__init__(tasks, config)
        self.d = d

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        assert grads.shape == (len(self.tasks), self.d.numel())
        return self.d, torch.ones_like(losses)


class Tiny(nn.Module):
    """Two shared layers -> representation (B, 2, 3) -> one head per task. The shared part is
    reached by the losses only through the representation."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6))
        self.heads = nn.ModuleDict({t: nn.Linear(6, 1) for t in TASKS})

    def losses(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        rep = self.shared(x).view(-1, 2, 3)
        flat = rep.flatten(1)
        out = {t: self.heads[t](flat).squeeze(-1) for t in TASKS}
        return rep, {
            "click": F.binary_cross_entropy_with_logits(out["click"], (y[:, 0] > 0).float()),
            "watch_time": F.mse_loss(out["watch_time"], 5 * y[:, 1]),
            "like": F.binary_cross_entropy_with_logits(out["like"], (y[:, 2] > 0.5).float()),
        }


def batch() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=gen), torch.randn(8, 3, generator=gen)


def grads_of(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["representation", "parameters"])
def test_plain_sum_matches_the_summed_loss_backward(mode: str) -> None:
    x, y = batch()
    model = Tiny()
    _, losses = model.losses(x, y)
    torch.stack(list(losses.values())).sum().backward()
    expected = grads_of(model)

    model.zero_grad(set_to_none=True)
    rep, losses = model.losses(x, y)
    weighting = PlainSum(TASKS, GradientConfigBase(mode=mode))
    logged = weighting.backward(losses, SharedPart(list(model.shared.parameters()), rep))
    got = grads_of(model)

    assert logged == dict.fromkeys(TASKS, 1.0)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_representation_mode_gives_the_shared_part_j_transpose_d() -> None:
    x, y = batch()
    model = Tiny()
    d = torch.randn(8 * 6, generator=torch.Generator().manual_seed(2))

    # Expected: shared params get J^T d, each head its own loss's gradient.
    rep, losses = model.losses(x, y)
    shared = list(model.shared.parameters())
    expected_shared = torch.autograd.grad(rep, shared, d.view_as(rep), retain_graph=True)
    expected_heads = {
        t: torch.autograd.grad(losses[t], list(model.heads[t].parameters()), retain_graph=True)
        for t in TASKS
    }

    model.zero_grad(set_to_none=True)
    rep, losses = model.losses(x, y)
    Fixed(TASKS, GradientConfigBase(mode="representation"), d).backward(
        losses, SharedPart(list(model.shared.parameters()), rep)
    )
    for p, e in zip(model.shared.parameters(), expected_shared, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-6)
    for t in TASKS:
        for p, e in zip(model.heads[t].parameters(), expected_heads[t], strict=True):
            torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-6)


def test_parameters_mode_gives_the_shared_params_d_itself() -> None:
    x, y = batch()
    model = Tiny()
    shared = list(model.shared.parameters())
    n = sum(p.numel() for p in shared)
    d = torch.randn(n, generator=torch.Generator().manual_seed(3))
    rep, losses = model.losses(x, y)
    Fixed(TASKS, GradientConfigBase(mode="parameters"), d).backward(losses, SharedPart(shared, rep))
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in shared]), d)
