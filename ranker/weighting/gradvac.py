"""GradVac: gradient vaccine, adaptive gradient similarity goals.

Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating and Improving Multi-task
Optimization in Massively Multilingual Models", ICLR 2021 (https://arxiv.org/abs/2010.05874),
Section 3 and its algorithm.

PCGrad only acts when two gradients conflict (negative cosine) and then makes them orthogonal.
GradVac keeps, for every ordered pair of tasks, a goal ``phi_hat_ij`` for their cosine
similarity, an exponential moving average of the observed cosines (``phi_hat <- (1 - beta)
phi_hat + beta phi``, starting at 0), and whenever the current cosine ``phi_ij = cos(g_i', g_j)``
falls below the goal it adds the multiple of ``g_j`` that lifts the cosine exactly to the goal:

    g_i' <- g_i' + ||g_i'|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2))
                   / (||g_j|| sqrt(1 - phi_hat^2)) g_j.

As in PCGrad each ``g_i'`` starts at ``g_i`` and visits the other tasks in a uniformly random
order, always against the *original* ``g_j``; the update is ``sum_i g_i'``. With every goal at 0
(the first step, or ``beta = 0``) this is exactly PCGrad.

Choices where the paper leaves room:

* Granularity: the paper can keep goals per layer; here one goal per task pair for the whole
  shared part (LibMTL's ``whole_model`` group, its default), in either ``mode``. In
  ``representation`` mode the goals track cosines of gradients over different batches' samples:
  a goal is a statistic of the tasks' alignment, which stays meaningful from batch to batch.
* ``beta`` defaults to 0.01, the paper's value (LibMTL's default is 0.5).
* The EMA update uses the cosine measured before the adjustment, as in the paper's algorithm
  (and LibMTL).

State: the goals ``phi_hat (T, T)`` and the step count (which seeds the random orders,
``numpy.random.default_rng([seed, k])`` at step ``k``) are buffers, so a resumed run continues
exactly as an uninterrupted one.

The update is ``sum_t w_t g_t`` (every adjustment adds a multiple of an original gradient);
those ``w_t`` are the returned weights. A task whose gradient is exactly zero this step (no
labelled row in the batch: ``head_loss`` returns an attached 0) is left out: weight 0, no
adjustment against it, and its goals are left as they were.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ranker.weighting.base import GradientConfigBase, GradientWeighting, register
from ranker.weighting.pcgrad import visiting_orders


class GradvacConfig(GradientConfigBase):
    name: Literal["gradvac"] = "gradvac"
    beta: float = Field(0.01, ge=0, le=1, description="EMA rate of the cosine goals (paper: 1e-2)")
    seed: int = Field(0, ge=0, description="seed of the random visiting orders")


def vaccinate(
    grads: Tensor, orders: list[list[int]], goals: Tensor, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """GradVac's adjustments (module docstring).

    Args:
        grads: task gradients ``(T, N)``; rows that are exactly 0 are skipped.
        orders: for each task ``i``, the other tasks in the order ``g_i`` visits them.
        goals: the cosine goals ``phi_hat (T, T)``, float64.
        beta: the goals' EMA rate.

    Returns:
        ``(adjusted (T, N), coef (T, T), new_goals (T, T))`` with ``adjusted = coef @ grads``.
    """
    g = grads.double()
    norms = g.norm(dim=1)
    n = g.shape[0]
    coef = torch.eye(n, dtype=torch.float64, device=g.device)
    out = g.clone()
    new_goals = goals.clone()
    for i, order in enumerate(orders):
        if norms[i] == 0:
            continue
        gi = out[i]
        for j in order:
            if j == i or norms[j] == 0:
                continue
            gi_norm = float(gi.norm())
            if gi_norm == 0:
                break
            dot = float(gi @ g[j])
            phi = max(-1.0, min(1.0, dot / (gi_norm * float(norms[j]))))
            goal = float(goals[i, j])
            if phi < goal:
                root_goal = math.sqrt(max(1.0 - goal * goal, 0.0))
                if root_goal > 0:
                    # sqrt(1 - phi^2) from the part of g_i orthogonal to g_j: 1 - phi^2 loses
                    # all its digits when g_i and g_j are nearly opposite.
                    rejection = gi - (dot / float(norms[j]) ** 2) * g[j]
                    root_phi = min(float(rejection.norm()) / gi_norm, 1.0)
                    c = (
                        gi_norm
                        * (goal * root_phi - phi * root_goal)
                        / (float(norms[j]) * root_goal)
                    )
                    gi = gi + c * g[j]
                    coef[i, j] += c
            new_goals[i, j] = (1.0 - beta) * goal + beta * phi
        out[i] = gi
    return out.to(grads.dtype), coef, new_goals


@register("gradvac")
class Gradvac(GradientWeighting):
    """Sum of the task gradients, each lifted to its cosine goals with the others."""

    config_class = GradvacConfig
    config: GradvacConfig

    def __init__(self, tasks: list[str], config: GradvacConfig) -> None:
        super().__init__(tasks, config)
        n = len(self.tasks)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("goals", torch.zeros(n, n, dtype=torch.float64))

    def orders(self, n: int) -> list[list[int]]:
        """This step's random visiting order of the other tasks, one list per task."""
        return visiting_orders(self.config.seed, int(self.step), n)

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        orders = self.orders(grads.shape[0])
        self.step += 1
        goals = self.goals.to(grads.device)
        adjusted, coef, new_goals = vaccinate(grads, orders, goals, self.config.beta)
        self.goals.copy_(new_goals)
        weights = coef.sum(0)
        weights[grads.abs().amax(dim=1) == 0] = 0.0  # a task without labelled rows
        return adjusted.sum(0), weights.to(grads.dtype)
