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

from ranker.weighting.base import (
    GradientConfigBase,
    GradientWeighting,
    combine_rows,
    gram_matrix,
    present_tasks,
    register,
)
from ranker.weighting.pcgrad import visiting_orders

CANCELLATION = 1e-3
"""A squared norm of ``sum_k c_k g_k`` read off the Gram matrix carries an absolute rounding
error of about ``eps (sum_k |c_k| ||g_k||)^2``; below this fraction of that scale (a remainder of
cancelling gradients) it is formed from the vectors instead, so its relative error stays below
``eps / CANCELLATION``."""


class GradvacConfig(GradientConfigBase):
    name: Literal["gradvac"] = "gradvac"
    beta: float = Field(0.01, ge=0, le=1, description="EMA rate of the cosine goals (paper: 1e-2)")
    seed: int = Field(0, ge=0, description="seed of the random visiting orders")


def vaccination_coefficients(
    grads: Tensor, gram: Tensor, orders: list[list[int]], goals: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """GradVac's adjustments (module docstring) as coefficients on the original gradients.

    Every adjusted ``g_i'`` is ``sum_j coef_ij g_j``, so each quantity the rule reads (norms of
    ``g_i'``, its inner product with ``g_j``, the norm of its part orthogonal to ``g_j``) is a
    quadratic form in the Gram matrix ``G G^T``: the loop runs on the ``T x T`` matrix in
    float64. Where such a form is a small difference of large terms (:data:`CANCELLATION`):
    ``g_i'`` after a lift that left it much shorter than the gradients it combines, or its part
    orthogonal to ``g_j`` when the two are nearly opposite (``1 - phi^2`` would lose all its
    digits), the vector is formed by one matrix-vector product in the gradients' dtype and
    measured directly, as the reference computation does. Training gradients rarely get there.

    Args:
        grads: the task gradients ``G (T, N)``, read only in that case.
        gram: ``G G^T (T, T)`` (see :func:`~ranker.weighting.base.gram_matrix`); tasks with a
            zero diagonal entry (a gradient exactly 0) are skipped.
        orders: for each task ``i``, the other tasks in the order ``g_i`` visits them.
        goals: the cosine goals ``phi_hat (T, T)``, float64.
        beta: the goals' EMA rate.

    Returns:
        ``(coef (T, T), new_goals (T, T))``: the adjusted gradients are ``coef @ G``.
    """
    m = gram.to(device="cpu", dtype=torch.float64)
    sq = torch.diagonal(m).tolist()
    norms = torch.diagonal(m).clamp_min(0.0).sqrt()
    n = m.shape[0]
    coef = torch.eye(n, dtype=torch.float64)
    new_goals = goals.to(device="cpu", dtype=torch.float64).clone()
    for i, order in enumerate(orders):
        if sq[i] <= 0:
            continue
        ci = coef[i].clone()
        for j in order:
            if j == i or sq[j] <= 0:
                continue
            mci = m @ ci
            gi_sq, dot = float(ci @ mci), float(mci[j])
            if gi_sq < CANCELLATION * float(ci.abs() @ norms) ** 2:
                # g_i' is a small remainder of larger gradients (after a lift): from the vector
                gi = combine_rows(ci, grads)
                gi_sq = float(torch.linalg.vector_norm(gi, dtype=torch.float64)) ** 2
                dot = float(gi.double() @ grads[j].double())
            if gi_sq <= 0:
                break
            gi_norm = math.sqrt(gi_sq)
            norm_j = math.sqrt(sq[j])
            phi = max(-1.0, min(1.0, dot / (gi_norm * norm_j)))
            goal = float(new_goals[i, j])
            if phi < goal:
                root_goal = math.sqrt(max(1.0 - goal * goal, 0.0))
                if root_goal > 0:
                    # sqrt(1 - phi^2) from the part of g_i orthogonal to g_j (a quadratic form
                    # in the Gram matrix): 1 - phi^2 loses all its digits when g_i and g_j are
                    # nearly opposite.
                    r = ci.clone()
                    r[j] -= dot / sq[j]
                    rej_sq = float(r @ m @ r)
                    if rej_sq < CANCELLATION * float(r.abs() @ norms) ** 2:
                        rej = combine_rows(r, grads)
                        rej_sq = float(torch.linalg.vector_norm(rej, dtype=torch.float64)) ** 2
                    rej_sq = max(rej_sq, 0.0)
                    root_phi = min(math.sqrt(rej_sq) / gi_norm, 1.0)
                    c = gi_norm * (goal * root_phi - phi * root_goal) / (norm_j * root_goal)
                    ci[j] += c
            new_goals[i, j] = (1.0 - beta) * goal + beta * phi
        coef[i] = ci
    return coef, new_goals.to(goals.device)


def vaccinate(
    grads: Tensor, orders: list[list[int]], goals: Tensor, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`vaccination_coefficients` applied to the gradients ``grads (T, N)``.

    Returns:
        ``(adjusted (T, N), coef (T, T), new_goals (T, T))`` with ``adjusted = coef @ grads``.
    """
    coef, new_goals = vaccination_coefficients(grads, gram_matrix(grads), orders, goals, beta)
    return coef.to(grads) @ grads, coef, new_goals


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
        gram = gram_matrix(grads)
        beta = self.config.beta
        coef, new_goals = vaccination_coefficients(grads, gram, orders, self.goals, beta)
        self.goals.copy_(new_goals)
        weights = coef.sum(0)
        weights[~present_tasks(gram)] = 0.0  # a task without labelled rows
        return combine_rows(weights, grads), weights.to(grads)
