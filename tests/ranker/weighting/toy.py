"""Shared toy models and checks for the weighting strategies' tests.

* :class:`TinyModel` and :func:`train_a_few_steps`: a shared layer with one head per task,
  trained a few steps through ``weighting.backward``; every step's weights and the model's
  gradients must be finite, and every task must get a weight.
* :class:`Linear3`: a linear shared layer and three linear heads on a fixed batch, for checking
  the exact gradients a strategy gives.
* :func:`assert_zero_gradient_task_is_left_out`: a task with an exact zero gradient (no labelled
  row in the batch) gets weight 0, and the others are combined as if it did not exist.
* :func:`build_from_raw`: a strategy built from a raw config mapping, as the trainer does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from pydantic import TypeAdapter
from torch import Tensor, nn

from ranker.weighting import (
    GradientWeighting,
    SharedPart,
    Weighting,
    WeightingConfig,
    build_weighting,
)

LossFn = Callable[[Tensor, dict[str, Tensor], torch.Generator], dict[str, Tensor]]
"""``(x, outputs, generator) -> losses``: one step's task losses from the model's input and
per-task outputs; targets that are not derived from ``x`` are drawn from ``generator``."""


class TinyModel(nn.Module):
    """Shared layer (the 'experts', output (B, E, H) = (B, 2, 4)) and one linear head per task."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        self.shared = nn.Linear(5, 8)
        self.heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in tasks})

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``x`` (B, 5) -> the shared representation (B, 2, 4) and each head's output (B,)."""
        rep = torch.relu(self.shared(x)).view(-1, 2, 4)
        return rep, {t: h(rep.flatten(1)).squeeze(-1) for t, h in self.heads.items()}


def ranking_losses(x: Tensor, out: dict[str, Tensor], gen: torch.Generator) -> dict[str, Tensor]:
    """Tasks ``click``, ``watch_time``, ``like``: two classifications of input signs and a
    large-scale regression on random targets (up to 50)."""
    return {
        "click": F.binary_cross_entropy_with_logits(out["click"], (x[:, 0] > 0).float()),
        "watch_time": F.mse_loss(out["watch_time"], 50 * torch.rand(len(x), generator=gen)),
        "like": F.binary_cross_entropy_with_logits(out["like"], (x[:, 1] > 1).float()),
    }


def click_watch_losses(
    x: Tensor, out: dict[str, Tensor], gen: torch.Generator
) -> dict[str, Tensor]:
    """Tasks ``click`` (random 30% positives) and ``watch_time`` (random targets up to 100)."""
    clicked = (torch.rand(len(x), generator=gen) < 0.3).float()
    watch = 100 * torch.rand(len(x), generator=gen)
    return {
        "click": F.binary_cross_entropy_with_logits(out["click"], clicked),
        "watch_time": F.mse_loss(out["watch_time"], watch),
    }


def train_a_few_steps(
    weighting: Weighting,
    tasks: Sequence[str],
    steps: int = 3,
    losses: LossFn = ranking_losses,
    batch_size: int = 16,
) -> list[dict[str, float]]:
    """Trains a fresh :class:`TinyModel` (seeded) ``steps`` Adam steps through
    ``weighting.backward`` (the weighting's own parameters in the same optimizer) and returns
    the weights logged at each step.

    Checks that every step's losses are finite, that every model parameter ends with a finite
    gradient, and that every step logs a finite weight for exactly the given ``tasks``.
    """
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = TinyModel(tasks)
    opt = torch.optim.Adam([*model.parameters(), *weighting.parameters()], lr=1e-2)
    logged = []
    for _ in range(steps):
        x = torch.randn(batch_size, 5, generator=gen)
        rep, out = model(x)
        step_losses = losses(x, out, gen)
        assert all(torch.isfinite(v) for v in step_losses.values())
        opt.zero_grad(set_to_none=True)
        shared = SharedPart(list(model.shared.parameters()), rep)
        logged.append(weighting.backward(step_losses, shared))
        opt.step()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    for w in logged:
        assert set(w) == set(tasks) and all(math.isfinite(v) for v in w.values())
    return logged


def build_from_raw(raw: Mapping[str, object], tasks: Sequence[str]) -> Weighting:
    """The strategy a raw config mapping (``{"name": ..., ...}``) names, validated through the
    :data:`WeightingConfig` union and built by the registry, as the trainer does."""
    config = TypeAdapter(WeightingConfig).validate_python(dict(raw))
    return build_weighting(config, list(tasks))


class Linear3:
    """A linear shared layer (5 -> 6) and three linear heads on a fixed batch of 16, with
    regression targets of very different scales (1, 10, 0.1)."""

    def __init__(self, tasks: Sequence[str]) -> None:
        assert len(tasks) == 3, "Linear3 has three heads"
        self.tasks = list(tasks)
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 5, generator=gen)
        self.y = torch.randn(16, 3, generator=gen) * torch.tensor([1.0, 10.0, 0.1])
        torch.manual_seed(0)
        self.shared = nn.Linear(5, 6)
        self.heads = nn.ModuleList([nn.Linear(6, 1) for _ in self.tasks])

    def losses(self) -> tuple[Tensor, dict[str, Tensor]]:
        """The shared representation (16, 6) and each task's MSE loss."""
        rep = self.shared(self.x)
        return rep, {
            t: F.mse_loss(h(rep).squeeze(-1), self.y[:, i])
            for i, (t, h) in enumerate(zip(self.tasks, self.heads, strict=True))
        }


def assert_zero_gradient_task_is_left_out(
    make_strategy: Callable[[list[str]], GradientWeighting], tasks: Sequence[str]
) -> None:
    """A batch with no labelled row for a task gives it an exact zero gradient (``head_loss``
    returns an attached 0): weight 0, and the others are combined as if it did not exist.

    ``make_strategy(tasks)`` builds a fresh strategy for the given task names; ``tasks`` are
    three names, the middle one is the task without labels. Compares ``combine`` on the three
    tasks with ``combine`` on the other two.
    """
    assert len(tasks) == 3, "the check uses three tasks, the middle one empty"
    g = torch.randn(3, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    g[1] = 0.0
    losses = torch.tensor([0.7, 0.0, 0.3], dtype=torch.float64)
    d3, w3 = make_strategy(list(tasks)).combine(g, losses)
    d2, w2 = make_strategy([tasks[0], tasks[2]]).combine(g[[0, 2]], losses[[0, 2]])
    assert float(w3[1]) == 0.0
    torch.testing.assert_close(w3[[0, 2]], w2, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(d3, d2, rtol=1e-6, atol=1e-9)


SWEEP_TASKS = (2, 3, 4, 5, 6, 8)
"""Task counts of :func:`sweep_grads`."""

SWEEP_KINDS = ("random", "conflict", "near_stationary", "aligned")
"""Kinds of gradient matrices :func:`sweep_grads` draws (see there)."""


def sweep_grads(per_cell: int = 12, n: int = 8, seed: int = 0) -> list[tuple[str, Tensor]]:
    """Many small task-gradient matrices ``(T, n)`` (float64) for property sweeps of the
    strategies' ``T x T`` solvers: ``per_cell`` of each kind for every ``T`` in
    :data:`SWEEP_TASKS` (``4 * 6 * per_cell`` cases), each labelled ``"kind T=.. #.."``.

    Every task's gradient gets its own scale ``10^u``, ``u`` uniform in ``[-3, 2]``, so the Gram
    matrices span up to ten decades (ill-conditioned). Kinds:

    * ``random``: independent Gaussian directions;
    * ``conflict``: ``g_1 = -0.7 g_0 + 0.3 z`` (two tasks pulling against each other);
    * ``near_stationary``: the last gradient is ``-sum_t c_t g_t`` (``c_t`` in ``[0.2, 1]``) plus
      a perturbation of relative size ``10^-4 .. 10^-2``: 0 is almost in the convex hull of the
      gradients (close to Pareto stationary), the hardest case for Nash-MTL and MGDA;
    * ``aligned``: the last gradient is a positive combination of the others (rank-deficient
      Gram matrix, no conflict).

    The draw is seeded, but a solver's result may still differ between CPUs (different SIMD
    paths round differently): the sweep is wide so that a solver that is wrong on some inputs
    fails on every CPU.
    """
    gen = torch.Generator().manual_seed(seed)

    def uniform(lo: float, hi: float, *shape: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)

    out: list[tuple[str, Tensor]] = []
    for kind in SWEEP_KINDS:
        for t in SWEEP_TASKS:
            for i in range(per_cell):
                g = torch.randn(t, n, generator=gen, dtype=torch.float64)
                if kind == "conflict":
                    g[1] = -0.7 * g[0] + 0.3 * g[1]
                elif kind == "near_stationary":
                    c = uniform(0.2, 1.0, t - 1)
                    rest = c @ g[:-1]
                    eps = 10.0 ** float(uniform(-4.0, -2.0, 1))
                    g[-1] = -rest + eps * float(rest.norm()) * g[-1] / g[-1].norm()
                elif kind == "aligned":
                    g[-1] = uniform(0.2, 1.0, t - 1) @ g[:-1]
                scales = 10.0 ** uniform(-3.0, 2.0, t, 1)
                out.append((f"{kind} T={t} #{i}", scales * g))
    return out
