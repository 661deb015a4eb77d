"""MGDA-UB: the multiple-gradient descent algorithm with the Frank-Wolfe min-norm solver.

Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018
(https://arxiv.org/abs/1810.04650; official code
https://github.com/isl-org/MultiObjectiveOptimization).

The shared update is the minimum-norm point of the convex hull of the task gradients,
``d = sum_t alpha_t g_t`` with ``alpha`` on the simplex minimising ``||d||^2``. When it is not zero
it decreases every task's loss (a common descent direction); when it is zero the point is Pareto
stationary. ``alpha`` comes from the paper's Algorithm 2 (Frank-Wolfe from the uniform point, each
step's line search solved in closed form by Algorithm 1); with two tasks Algorithm 1 alone gives
the exact solution. MGDA-UB ("upper bound") is the ``representation`` mode of the base class: the
gradients are taken w.r.t. the shared representation rather than the shared parameters.

Choices where the paper leaves room:

* Scale: as in the paper and the official code, ``alpha`` sums to 1, so the direction is a convex
  combination of task gradients (about ``1/T`` of the equal-weighting sum's size). The returned
  weights are the ``alpha`` themselves.
* Gradient normalisation (``normalization``): the official code can divide each task gradient by
  its L2 norm (``l2``), its loss (``loss``) or both (``loss+``) before solving; its comments say
  this is "optional and not included in the paper", so the default is ``none`` (the paper's
  method; the repository's ``sample.json`` uses ``loss+``). As in the official training script, the
  solved ``alpha`` then weight the *unnormalised* gradients (``scale[t] * loss_t``), so only with
  ``none`` is the direction the min-norm point of the raw gradients.
* Line search: the paper's Algorithm 1 returns exactly 0 or 1 at the segment's ends; the official
  code clips to 0.001 / 0.999. We follow the paper.
* Solver accuracy: plain Frank-Wolfe (Algorithm 2) converges as O(1/k) when the min-norm point
  lies on a face of the simplex (common with 3+ tasks): after the official 250 iterations
  ``||d||^2`` can still be ~0.3% of ``max_t ||g_t||^2`` above the minimum. By default
  (``away_steps``) an iteration may also step *away* from the worst vertex in use, the standard
  Frank-Wolfe variant with a linear rate; it solves the same problem to ~1e-10 in the same
  budget. ``away_steps = false`` gives the paper's plain iteration.
* A task whose gradient is exactly zero this step (no labelled row in the batch: ``head_loss``
  returns an attached 0) is left out with weight 0; kept, it would put 0 in the hull and stop
  the shared update for the step.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ranker.weighting.base import GradientConfigBase, GradientWeighting, register


class MgdaConfig(GradientConfigBase):
    name: Literal["mgda"] = "mgda"
    normalization: Literal["none", "l2", "loss", "loss+"] = Field(
        "none", description="per-task gradient normaliser applied before solving (official code)"
    )
    max_iter: int = Field(250, ge=1, description="Frank-Wolfe iterations at most (official: 250)")
    tol: float = Field(
        1e-5, gt=0, description="stop when an iteration moves alpha by less (L1; official: 1e-5)"
    )
    away_steps: bool = Field(
        True, description="Frank-Wolfe with away steps (linear rate); false: the paper's plain FW"
    )


def line_solver(v1v1: float, v1v2: float, v2v2: float) -> float:
    """The paper's Algorithm 1: ``argmin_{gamma in [0, 1]} ||gamma x1 + (1 - gamma) x2||^2``.

    Args are the inner products ``<x1, x1>``, ``<x1, x2>``, ``<x2, x2>``; returns ``gamma``.
    """
    if v1v2 >= v1v1:
        return 1.0
    if v1v2 >= v2v2:
        return 0.0
    # v1v2 < min(v1v1, v2v2) implies ||x1 - x2||^2 = v1v1 + v2v2 - 2 v1v2 > 0.
    return (v2v2 - v1v2) / (v1v1 + v2v2 - 2.0 * v1v2)


def min_norm_weights(
    gram: Tensor, max_iter: int = 250, tol: float = 1e-5, away_steps: bool = True
) -> Tensor:
    """Simplex weights of the min-norm point of the convex hull of vectors with Gram ``gram``.

    Frank-Wolfe from the uniform point as in the paper's Algorithm 2 (float64 Gram ``(T, T)`` in,
    ``(T,)`` out), each toward-vertex line search solved by Algorithm 1. Plain Frank-Wolfe
    (``away_steps=False``) converges as O(1/k) when the min-norm point lies on a face of the
    simplex (it keeps a vanishing weight on the vertices off the face); with ``away_steps`` an
    iteration may instead move away from the worst vertex in use (Guelat & Marcotte 1986,
    Lacoste-Julien & Jaggi 2015), which converges linearly to the same point.
    Stops when an iteration moves ``alpha`` by less than ``tol`` (L1), or the duality gap is 0.
    """
    n = gram.shape[0]
    if n == 1:
        return torch.ones(1, dtype=gram.dtype)
    if n == 2:
        gamma = line_solver(float(gram[0, 0]), float(gram[0, 1]), float(gram[1, 1]))
        return torch.tensor([gamma, 1.0 - gamma], dtype=gram.dtype)
    alpha = torch.full((n,), 1.0 / n, dtype=gram.dtype)
    for _ in range(max_iter):
        m_alpha = gram @ alpha  # <g_r, x> for every vertex r, x = sum_r alpha_r g_r
        xx = float(alpha @ m_alpha)
        t = int(torch.argmin(m_alpha))
        fw_gap = xx - float(m_alpha[t])
        away_gap = -1.0
        if away_steps:
            used = alpha > 0
            v = int(torch.argmax(torch.where(used, m_alpha, torch.full_like(m_alpha, -torch.inf))))
            away_gap = float(m_alpha[v]) - xx
        if max(fw_gap, away_gap) <= 0.0:
            break  # x is the min-norm point: no vertex direction decreases ||x||
        if fw_gap >= away_gap:
            # Toward g_t: x1 = g_t, x2 = x, new x = gamma g_t + (1 - gamma) x.
            gamma = line_solver(float(gram[t, t]), float(m_alpha[t]), xx)
            new = (1.0 - gamma) * alpha
            new[t] += gamma
        else:
            # Away from g_v: new x = x + gamma (x - g_v), gamma in [0, alpha_v / (1 - alpha_v)].
            a_v = float(alpha[v])
            dist2 = xx - 2.0 * float(m_alpha[v]) + float(gram[v, v])
            gamma_max = a_v / (1.0 - a_v) if a_v < 1.0 else 0.0
            gamma = min(max((float(m_alpha[v]) - xx) / dist2, 0.0), gamma_max) if dist2 > 0 else 0.0
            new = (1.0 + gamma) * alpha
            new[v] -= gamma
            if gamma == gamma_max:
                new[v] = 0.0  # a drop step: g_v leaves the active set exactly
            new = new.clamp_min(0.0)
        change = float((new - alpha).abs().sum())
        alpha = new
        if change < tol:
            break
    return alpha


@register("mgda")
class Mgda(GradientWeighting):
    """Min-norm convex combination of the task gradients (MGDA-UB in ``representation`` mode)."""

    config_class = MgdaConfig
    config: MgdaConfig

    def normalizers(self, grads: Tensor, losses: Tensor) -> Tensor:
        """The official code's per-task gradient normalisers ``(T,)``, float64."""
        norms = grads.double().norm(dim=1)
        kind = self.config.normalization
        if kind == "none":
            return torch.ones_like(norms)
        if kind == "l2":
            gn = norms
        elif kind == "loss":
            gn = losses.double().to(norms.device)
        else:  # "loss+"
            gn = losses.double().to(norms.device) * norms
        return gn.clamp_min(1e-12)  # a zero normaliser means a zero gradient or a zero loss

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        # A task without labelled rows has an exact zero gradient: left out (else the hull
        # contains 0 and the update vanishes).
        present = grads.abs().amax(dim=1) > 0
        alpha = torch.zeros(grads.shape[0], dtype=torch.float64, device=grads.device)
        if bool(present.any()):
            gp, lp = grads[present], losses[present]
            g = gp.double() / self.normalizers(gp, lp)[:, None]
            cfg = self.config
            a = min_norm_weights((g @ g.T).cpu(), cfg.max_iter, cfg.tol, cfg.away_steps)
            alpha[present] = a.to(grads.device)
        direction = alpha @ grads.double()
        return direction.to(grads.dtype), alpha.to(grads.dtype)
