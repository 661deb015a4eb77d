"""IMTL-G: impartial multi-task learning, gradient balance.

Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning", ICLR 2021
(https://openreview.net/forum?id=IMPnRXEWpvr).

IMTL-G picks weights ``alpha`` (summing to 1) so that the aggregated gradient ``g = sum_t alpha_t
g_t`` has the same projection onto every task's unit gradient ``u_t = g_t / ||g_t||``: no task is
favoured. With ``D = [g_1 - g_2, ..., g_1 - g_T]`` and ``U = [u_1 - u_2, ..., u_1 - u_T]`` (rows),
the closed form (paper, Eq. 8 / Algorithm 1) is

    alpha_{2:T} = g_1 U^T (D U^T)^{-1},   alpha_1 = 1 - sum(alpha_{2:T}).

Only IMTL-G is implemented here (the paper's IMTL-L learned loss scales are a separate loss-based
idea, and the hybrid "IMTL" combines both). The paper computes the gradients w.r.t. the shared
feature ``z``: the ``representation`` mode of the base class. The weights sum to 1 (paper), so
the update is about ``1/T`` of the equal-weighting sum's size; they are returned as computed
(they can be negative for strongly conflicting tasks; the paper does not clip them). When
``D U^T`` is singular (e.g. two identical gradients) the least-squares solution is used.

A task whose gradient is exactly zero this step (no labelled row in the batch: ``head_loss``
returns an attached 0) is left out: it gets weight 0 and the rule runs on the other tasks.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ranker.weighting.base import GradientConfigBase, GradientWeighting, register


class ImtlConfig(GradientConfigBase):
    name: Literal["imtl"] = "imtl"


def imtl_weights(grads: Tensor) -> Tensor:
    """IMTL-G's closed-form ``alpha (T,)`` (float64) for gradients ``(T, N)``."""
    g = grads.double()
    t = g.shape[0]
    if t == 1:
        return torch.ones(1, dtype=torch.float64, device=g.device)
    u = g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
    d = g[:1] - g[1:]  # (T-1, N)
    uu = u[:1] - u[1:]  # (T-1, N)
    a = d @ uu.T  # (T-1, T-1)
    r = g[0] @ uu.T  # (T-1,)
    # alpha_{2:T} A = r  <=>  A^T alpha_{2:T}^T = r^T
    try:
        rest = torch.linalg.solve(a.T, r)
        if not torch.isfinite(rest).all():
            raise RuntimeError("non-finite solution")
    except RuntimeError:
        rest = torch.linalg.lstsq(a.T.cpu(), r.cpu()[:, None], driver="gelsd").solution[:, 0]
        rest = rest.to(g.device)
    return torch.cat([(1.0 - rest.sum()).reshape(1), rest])


@register("imtl")
class Imtl(GradientWeighting):
    """Weights that give the update equal projections onto every task's gradient direction."""

    config_class = ImtlConfig
    config: ImtlConfig

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        # A task without labelled rows has an exact zero gradient, with no direction: left out.
        present = grads.abs().amax(dim=1) > 0
        alpha = torch.zeros(grads.shape[0], dtype=torch.float64, device=grads.device)
        if bool(present.any()):
            alpha[present] = imtl_weights(grads[present])
        direction = alpha @ grads.double()
        return direction.to(grads.dtype), alpha.to(grads.dtype)
