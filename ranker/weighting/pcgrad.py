"""PCGrad: gradient surgery by projecting conflicting gradients.

Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task Learning", NeurIPS 2020
(https://arxiv.org/abs/2001.06782).

The paper's Algorithm 1: for every task ``i``, start from ``g_i^PC = g_i`` and visit the other
tasks ``j`` in a uniformly random order; whenever ``<g_i^PC, g_j> < 0`` (the gradients conflict),
project ``g_i^PC`` onto the normal plane of ``g_j``:
``g_i^PC <- g_i^PC - <g_i^PC, g_j> / ||g_j||^2 * g_j``. Projections are always against the
*original* ``g_j``. The shared update is the sum ``sum_i g_i^PC`` (the paper's Algorithm 1; some
re-implementations average instead).

Randomness is seeded: step ``k`` draws its orders from ``numpy.random.default_rng([seed, k])``, and
``k`` is a buffer, so a resumed run draws the same orders as an uninterrupted one. Every
projection subtracts a multiple of an original gradient, so the update is exactly
``sum_t w_t g_t``; those ``w_t`` are the returned weights (all 1 when nothing conflicts; 0 for
a task whose gradient is exactly zero, e.g. no labelled row in the batch, which conflicts with
nothing and changes nothing).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from ranker.weighting.base import (
    GradientConfigBase,
    GradientWeighting,
    combine_rows,
    gram_matrix,
    present_tasks,
    register,
)


class PcgradConfig(GradientConfigBase):
    name: Literal["pcgrad"] = "pcgrad"
    seed: int = Field(0, ge=0, description="seed of the random projection orders")


def projection_coefficients(gram: Tensor, orders: list[list[int]]) -> Tensor:
    """PCGrad's projections as coefficients on the original gradients, from their Gram matrix.

    Every projection subtracts a multiple of an original gradient, so ``g_i^PC = sum_k C[i, k]
    g_k`` and ``<g_i^PC, g_j> = (C M)[i, j]`` with ``M = G G^T``: the whole procedure runs on the
    ``T x T`` Gram matrix (float64), and the ``(T, N)`` gradients are touched once, by the final
    combination.

    Args:
        gram: ``G G^T (T, T)``.
        orders: for each task ``i``, the other tasks in the order ``g_i`` is projected against.

    Returns:
        ``C (T, T)``, float64.
    """
    m = gram.to(torch.float64).cpu()
    sq = torch.diagonal(m)
    n = m.shape[0]
    coef = torch.eye(n, dtype=torch.float64)
    for i, order in enumerate(orders):
        for j in order:
            if j == i or sq[j] <= 0:
                continue
            dot = coef[i] @ m[:, j]
            if dot < 0:
                coef[i, j] -= dot / sq[j]
    return coef


def project_conflicting(grads: Tensor, orders: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Applies PCGrad's projections.

    Args:
        grads: task gradients ``(T, N)``.
        orders: for each task ``i``, the other tasks in the order ``g_i`` is projected against.

    Returns:
        ``(projected (T, N), coef (T, T))`` with ``projected = coef @ grads``.
    """
    coef = projection_coefficients(gram_matrix(grads), orders)
    return coef.to(grads) @ grads, coef


def visiting_orders(seed: int, step: int, n: int) -> list[list[int]]:
    """A random order of the other tasks for each of ``n`` tasks, drawn from ``(seed, step)``
    alone, so that a resumed run visits them in the same orders (PCGrad, GradVac)."""
    rng = np.random.default_rng([seed, step])
    return [[int(j) for j in rng.permutation([k for k in range(n) if k != i])] for i in range(n)]


@register("pcgrad")
class Pcgrad(GradientWeighting):
    """Sum of the task gradients after projecting out their pairwise conflicts."""

    config_class = PcgradConfig
    config: PcgradConfig

    def __init__(self, tasks: list[str], config: PcgradConfig) -> None:
        super().__init__(tasks, config)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def orders(self, n: int) -> list[list[int]]:
        """This step's random visiting order of the other tasks, one list per task."""
        return visiting_orders(self.config.seed, int(self.step), n)

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        orders = self.orders(grads.shape[0])
        self.step += 1
        gram = gram_matrix(grads)
        weights = projection_coefficients(gram, orders).sum(0)
        weights[~present_tasks(gram)] = 0.0  # a task without labelled rows: no gradient
        return combine_rows(weights, grads), weights.to(grads)
