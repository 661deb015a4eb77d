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
* Solver: Frank-Wolfe (the paper's Algorithm 2) stops at a given accuracy, and on
  ill-conditioned Gram matrices (task gradients of very different sizes, near-stationary points)
  that accuracy is poor where it matters: on a sweep of 288 such cases the 250-iteration
  iteration (with or without away steps) returned points whose ``||d||^2`` was up to 1e11 times
  the minimum's, i.e. a different direction. The default ``solver = "active_set"`` is Wolfe's
  exact algorithm for the min-norm point of a polytope (Wolfe, "Finding the nearest point in a
  polytope", Math. Programming 11, 1976): it keeps a set of affinely independent gradients,
  jumps to the min-norm point of their affine hull and drops gradients whose weight would turn
  negative; it ends after finitely many steps at the exact minimum, up to rounding. ``solver =
  "frank_wolfe"`` gives the paper's iteration, by default (``away_steps``) with away steps
  (Guelat & Marcotte 1986), ``away_steps = false`` the paper's plain one. With two tasks
  every solver uses Algorithm 1, which is exact.
* A task whose gradient is exactly zero this step (no labelled row in the batch: ``head_loss``
  returns an attached 0) is left out with weight 0; kept, it would put 0 in the hull and stop
  the shared update for the step.
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


class MgdaConfig(GradientConfigBase):
    name: Literal["mgda"] = "mgda"
    normalization: Literal["none", "l2", "loss", "loss+"] = Field(
        "none", description="per-task gradient normaliser applied before solving (official code)"
    )
    max_iter: int = Field(250, ge=1, description="solver iterations at most (FW official: 250)")
    tol: float = Field(
        1e-5, gt=0, description="stop when an iteration moves alpha by less (L1; official: 1e-5)"
    )
    away_steps: bool = Field(
        True, description="Frank-Wolfe with away steps (linear rate); false: the paper's plain FW"
    )
    solver: Literal["active_set", "frank_wolfe"] = Field(
        "active_set", description="Wolfe's exact active-set algorithm, or the paper's Frank-Wolfe"
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


def min_norm_active_set(gram: Tensor, max_iter: int = 250) -> Tensor:
    """Simplex weights of the min-norm point of the convex hull, by Wolfe's algorithm (1976).

    Float64 Gram ``(T, T)`` in, ``(T,)`` out. Starts at the shortest vertex. A major step adds
    the vertex ``g_t`` with the smallest ``<g_t, x>`` while ``<g_t, x> < ||x||^2`` (``x`` not
    optimal); minor steps then move to the min-norm point of the affine hull of the active
    vertices (a ``(k + 1)``-square KKT system) and, while that point has a weight <= 0, stop at
    the boundary of the active simplex and drop the vertex that reached 0. Ends when no vertex
    improves ``x`` by more than ``1e-10 ||x||^2`` or 16 times the float64 rounding of
    ``<g_t, x>`` (``eps * max_t ||g_t|| * sum_s alpha_s ||g_s||``).
    """
    n = gram.shape[0]
    if n <= 2:
        return min_norm_weights(gram)
    m = gram.to(torch.float64).cpu().numpy()
    diag = np.clip(np.diag(m), 0.0, None)
    norms = np.sqrt(diag)
    eps = float(np.finfo(np.float64).eps)
    lam = np.zeros(n)
    active = [int(np.argmin(diag))]
    lam[active[0]] = 1.0
    for _ in range(max_iter):
        v = m @ lam
        q = float(lam @ v)
        t = int(np.argmin(v))
        floor = eps * float(norms.max()) * float(norms @ lam)
        if q - float(v[t]) <= max(1e-10 * q, 16.0 * floor) or t in active:
            break
        active.append(t)
        for _minor in range(n + 1):
            k = len(active)
            kkt = np.ones((k + 1, k + 1))
            kkt[:k, :k] = m[np.ix_(active, active)]
            kkt[k, k] = 0.0
            rhs = np.zeros(k + 1)
            rhs[k] = 1.0
            try:
                mu = np.linalg.solve(kkt, rhs)[:k]
            except np.linalg.LinAlgError:
                mu = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:k]
            if np.all(mu > 0):
                lam[:] = 0.0
                lam[active] = mu
                break
            cur = lam[active]
            neg = mu <= 0
            ratios = np.where(neg, cur / np.where(neg, cur - mu, 1.0), np.inf)
            blocking = int(np.argmin(ratios))
            new = cur + ratios[blocking] * (mu - cur)
            new[blocking] = 0.0
            keep = new > 0
            lam[:] = 0.0
            active = [a for a, kp in zip(active, keep, strict=True) if kp]
            lam[active] = new[keep] / new[keep].sum()
    return torch.from_numpy(lam).to(gram.dtype)


@register("mgda")
class Mgda(GradientWeighting):
    """Min-norm convex combination of the task gradients (MGDA-UB in ``representation`` mode)."""

    config_class = MgdaConfig
    config: MgdaConfig

    def normalizers(self, norms: Tensor, losses: Tensor) -> Tensor:
        """The official code's per-task gradient normalisers ``(T,)``, float64, from the
        gradients' norms and the losses."""
        norms = norms.double()
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

    def weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        """``alpha (T,)`` for the Gram matrix of the task gradients (float64, CPU)."""
        # A task without labelled rows has an exact zero gradient: left out (else the hull
        # contains 0 and the update vanishes).
        present = present_tasks(gram)
        alpha = torch.zeros(gram.shape[0], dtype=torch.float64)
        if bool(present.any()):
            gp = gram[present][:, present]
            lp = losses.detach().cpu()[present]
            gn = self.normalizers(torch.diagonal(gp).clamp_min(0.0).sqrt(), lp)
            gh = gp / (gn[:, None] * gn[None, :])  # Gram of the normalised gradients
            cfg = self.config
            if cfg.solver == "active_set":
                a = min_norm_active_set(gh, cfg.max_iter)
            else:
                a = min_norm_weights(gh, cfg.max_iter, cfg.tol, cfg.away_steps)
            alpha[present] = a
        return alpha

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        alpha = self.weights(gram_matrix(grads), losses)
        return combine_rows(alpha, grads), alpha.to(grads)
