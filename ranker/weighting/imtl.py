"""IMTL-G: impartial multi-task learning, gradient balance.

Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning", ICLR 2021
(https://openreview.net/forum?id=IMPnRXEWpvr).

IMTL-G picks weights ``alpha`` (summing to 1) so that the aggregated gradient ``g = sum_t alpha_t
g_t`` has the same projection onto every task's unit gradient ``u_t = g_t / ||g_t||``: no task is
favoured. With ``D = [g_1 - g_2, ..., g_1 - g_T]`` and ``U = [u_1 - u_2, ..., u_1 - u_T]`` (rows),
the closed form (paper, Eq. 8 / Algorithm 1) is

    alpha_{2:T} = g_1 U^T (D U^T)^{-1},   alpha_1 = 1 - sum(alpha_{2:T}).

It is the elimination of ``c`` from the defining equations ``<u_t, g> = c`` for every ``t`` and
``sum_t alpha_t = 1``, which are linear in ``(alpha, c)``: with ``M = G G^T`` and ``n_t =
||g_t||``, ``<u_t, g> = (M alpha)_t / n_t``. They are solved as that ``(T + 1)``-square system on
the Gram matrix (:func:`imtl_weights_from_gram`; same solution, no ``(T - 1, N)`` differences
of the gradients to form).

Only IMTL-G is implemented here (the paper's IMTL-L learned loss scales are a separate loss-based
idea, and the hybrid "IMTL" combines both). The paper computes the gradients w.r.t. the shared
feature ``z``: the ``representation`` mode of the base class. The weights sum to 1 (paper), so
the update is about ``1/T`` of the equal-weighting sum's size; they are returned as computed
(they can be negative for strongly conflicting tasks; the paper does not clip them). When the
system is singular (e.g. two identical gradients) the least-squares solution is used.

A task whose gradient is exactly zero this step (no labelled row in the batch: ``head_loss``
returns an attached 0) is left out: it gets weight 0 and the rule runs on the other tasks.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ranker.weighting.base import (
    GradientConfigBase,
    GradientWeighting,
    combine_rows,
    gram_matrix,
    present_tasks,
    register,
)


class ImtlConfig(GradientConfigBase):
    name: Literal["imtl"] = "imtl"


def imtl_weights_from_gram(gram: Tensor) -> Tensor:
    """IMTL-G's ``alpha (T,)`` (float64) for the Gram matrix ``G G^T (T, T)`` of nonzero
    gradients: the solution of ``(M alpha)_t / n_t = c`` for every ``t``, ``sum_t alpha_t = 1``."""
    m = gram.to(torch.float64).cpu()
    t = m.shape[0]
    if t == 1:
        return torch.ones(1, dtype=torch.float64)
    norms = torch.diagonal(m).clamp_min(1e-300).sqrt()
    system = torch.zeros(t + 1, t + 1, dtype=torch.float64)
    system[:t, :t] = m / norms[:, None]
    system[:t, t] = -1.0
    system[t, :t] = 1.0
    rhs = torch.zeros(t + 1, dtype=torch.float64)
    rhs[t] = 1.0
    try:
        sol = torch.linalg.solve(system, rhs)
        if not torch.isfinite(sol).all():
            raise RuntimeError("non-finite solution")
    except RuntimeError:
        sol = torch.linalg.lstsq(system, rhs[:, None], driver="gelsd").solution[:, 0]
    return sol[:t]


def imtl_weights(grads: Tensor) -> Tensor:
    """IMTL-G's ``alpha (T,)`` (float64) for gradients ``(T, N)``."""
    return imtl_weights_from_gram(gram_matrix(grads))


@register("imtl")
class Imtl(GradientWeighting):
    """Weights that give the update equal projections onto every task's gradient direction."""

    config_class = ImtlConfig
    config: ImtlConfig

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        gram = gram_matrix(grads)
        # A task without labelled rows has an exact zero gradient, with no direction: left out.
        present = present_tasks(gram)
        alpha = torch.zeros(grads.shape[0], dtype=torch.float64)
        if bool(present.any()):
            alpha[present] = imtl_weights_from_gram(gram[present][:, present])
        return combine_rows(alpha, grads), alpha.to(grads)
