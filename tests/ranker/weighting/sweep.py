"""Random cases for the numerical property tests of the weighting strategies.

Properties must hold on any CPU, so they are checked over hundreds of random cases rather than a
few seeds, ill-conditioned ones included: gradient rows scaled from 1e-3 to 1e2, nearly opposite
pairs (0 nearly in the convex hull: a nearly Pareto-stationary point), nearly parallel pairs,
and more tasks than dimensions (a rank-deficient Gram matrix).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


def gradient_cases(
    count: int, seed: int = 0, max_tasks: int = 6, max_dim: int = 10
) -> Iterator[Tensor]:
    """``count`` float64 gradient matrices ``(T, N)``, ``T`` in 2..``max_tasks``, ``N`` in
    2..``max_dim``. Rows are scaled by distinct factors from 1e-3 to 1e2 in random order; in
    every third case the second row is nearly opposite the first (``-0.9 g_0 + 1e-4 noise``),
    in the next nearly parallel (``g_0 + 1e-6 noise``), before scaling."""
    gen = torch.Generator().manual_seed(seed)
    for k in range(count):
        t = int(torch.randint(2, max_tasks + 1, (1,), generator=gen))
        n = int(torch.randint(2, max_dim + 1, (1,), generator=gen))
        g = torch.randn(t, n, generator=gen, dtype=torch.float64)
        if k % 3 == 1:
            g[1] = -0.9 * g[0] + 1e-4 * g[1]
        elif k % 3 == 2:
            g[1] = g[0] + 1e-6 * g[1]
        scales = torch.logspace(-3, 2, t, dtype=torch.float64)[torch.randperm(t, generator=gen)]
        yield g * scales[:, None]


def loss_cases(count: int, seed: int = 0, max_tasks: int = 6) -> Iterator[Tensor]:
    """``count`` float64 loss vectors ``(T,)``, log-uniform in 1e-3..1e2; one case in four has
    one loss exactly 0 (a task with no labelled row in the batch)."""
    gen = torch.Generator().manual_seed(seed)
    for k in range(count):
        t = int(torch.randint(2, max_tasks + 1, (1,), generator=gen))
        x = 10 ** (torch.rand(t, generator=gen, dtype=torch.float64) * 5 - 3)
        if k % 4 == 3:
            x[int(torch.randint(0, t, (1,), generator=gen))] = 0.0
        yield x
