"""FairGrad: fair resource allocation among tasks (alpha-fair utilities).

Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024
(https://arxiv.org/abs/2402.15638; official code https://github.com/OptMN-Lab/fairgrad).

The update ``d = G^T w`` maximises the sum of the tasks' alpha-fair utilities of their local
improvements ``<g_t, d>``. The paper's optimality condition (Section 4) is, for every task ``t``,

    (G G^T w)_t = w_t^(-1/alpha),   w > 0,

i.e. task ``t``'s improvement ``<g_t, d>`` is ``w_t^(-1/alpha)``. ``alpha = 1`` is proportional
fairness (Nash-MTL's bargaining equations), ``alpha -> inf`` approaches max-min fairness, and
``alpha -> 0`` the plain average. The official code solves the equations with
``scipy.optimize.least_squares``; here they are solved as what they are, the stationarity
conditions of the strictly convex function

    f(w) = 1/2 w^T (G G^T) w - sum_t phi(w_t),   phi' (w) = w^(-1/alpha)

(``phi = log`` for ``alpha = 1``, ``w^(1 - 1/alpha) / (1 - 1/alpha)`` otherwise; ``-phi`` is
convex), whose unique minimiser is the solution. :func:`fair_weights` minimises it by a damped
Newton method that keeps ``w > 0`` (see :func:`_newton`; at most 36 iterations over the test
sweep). The Gram matrix is divided by its mean diagonal first (the solution for ``c G G^T`` is
``c^(-alpha/(alpha+1))`` times that for ``G G^T``). The stopping test is the scale-free residual
``max_t |w_t^(1/alpha) (G G^T w)_t - 1| <= tol`` or, where rounding keeps that above ``tol``
(nearly Pareto-stationary gradients, see :func:`fair_backward_error`), a componentwise backward
error at the rounding level: ``w`` then solves the equations exactly for a Gram matrix within
rounding of the given one. When 0 is in the convex hull of the gradients (Pareto-stationary)
there is no exact solution: Newton's iterates grow without converging, and the equations are
solved for the Gram matrix with its diagonal raised by 1e-8 (then 1e-6) of itself, a ridge as
Nash-MTL uses here; the stationary combination then gets large weights and adds about nothing
to ``d``.

``alpha`` defaults to 1, the official code's and LibMTL's default (the paper also reports other
values). No state: a resumed run is the same as an uninterrupted one.

A task whose gradient is exactly zero this step (no labelled row in the batch: ``head_loss``
returns an attached 0) is left out: weight 0 (kept, its equation ``0 = w_t^(-1/alpha)`` would have
no solution), and the equations are solved for the other tasks.
"""

from __future__ import annotations

import math
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

RIDGES = (1e-8, 1e-6)
"""Relative increases of the Gram matrix's diagonal tried, in order, when there is no solution."""

BACKWARD_TOL = 1024 * float(np.finfo(float).eps)
"""Componentwise backward error at which ``w`` solves the equations for a Gram matrix within
rounding of the given one (see :func:`fair_backward_error`)."""


class FairgradConfig(GradientConfigBase):
    name: Literal["fairgrad"] = "fairgrad"
    alpha: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="fairness: 1 proportional, large max-min"
    )
    max_iter: int = Field(200, ge=1, description="Newton iterations at most (per ridge)")
    tol: float = Field(1e-9, gt=0, lt=1, description="max |w_t^(1/alpha) (G G^T w)_t - 1| accepted")


def fair_residual(gram: np.ndarray, w: np.ndarray, alpha: float) -> float:
    """``max_t |w_t^(1/alpha) (gram w)_t - 1|``: 0 exactly at FairGrad's solution."""
    return float(np.max(np.abs(w ** (1.0 / alpha) * (gram @ w) - 1.0)))


def fair_backward_error(gram: np.ndarray, w: np.ndarray, alpha: float) -> float:
    """``max_t |(gram w)_t - w_t^(-1/alpha)| / (sum_s |gram_ts| w_s + w_t^(-1/alpha))``.

    The residual of each equation relative to the size of the terms it sums: ``w`` is the exact
    solution for a Gram matrix whose entries differ from ``gram``'s by that relative amount. Near a
    Pareto-stationary point ``(gram w)_t`` is a small difference of large products, and the
    relative residual :func:`fair_residual` cannot get below this error times the ratio of the
    two (far above 1e-9 when the gradients' correlation matrix has a condition number of 1e8);
    the backward error can always get to the rounding level.
    """
    target = w ** (-1.0 / alpha)
    scale = np.abs(gram) @ w + target
    return float(np.max(np.abs(gram @ w - target) / scale))


def _newton(a: np.ndarray, alpha: float, max_iter: int, tol: float) -> tuple[np.ndarray, bool]:
    """Minimises ``f`` (module docstring) for a Gram ``a`` with a positive diagonal by Newton's
    method from the solution for orthogonal gradients; returns the last ``w`` and whether it
    converged: residual <= ``tol``, or the backward error at the rounding level.

    ``f`` is strictly convex and its Hessian ``a + diag(w^(-1/alpha - 1) / alpha)`` positive
    definite, so every Newton step is a descent direction; the step is cut to stay inside
    ``w > 0`` (at most 99% of the way to the boundary) and then by Armijo backtracking. Near a
    Pareto-stationary point ``f``'s quadratic term sums large cancelling products: changes of
    ``f`` below its rounding error are not trusted, and when backtracking finds no decrease ``f``
    can resolve, the step is taken if it lowers the residual (Newton's region), else the method
    stops. Newton's iterates do not depend on the scale of the variables, so tasks whose weights
    differ by many orders of magnitude cost nothing extra; the linear solves are Jacobi-scaled.
    """
    q = 1.0 / alpha

    def phi(w: np.ndarray) -> np.ndarray:
        return np.log(w) if alpha == 1.0 else w ** (1.0 - q) / (1.0 - q)

    def f(w: np.ndarray) -> float:
        if np.any(w <= 0):
            return math.inf
        value = float(0.5 * w @ a @ w - phi(w).sum())
        return value if math.isfinite(value) else math.inf

    w = np.diag(a) ** (-alpha / (alpha + 1.0))
    for _ in range(max_iter):
        res = fair_residual(a, w, alpha)
        if res <= tol or fair_backward_error(a, w, alpha) <= BACKWARD_TOL:
            return w, True
        grad = a @ w - w ** (-q)
        hess = a + np.diag(q * w ** (-q - 1.0))
        s = 1.0 / np.sqrt(np.diag(hess))
        try:
            step = -s * np.linalg.solve(s[:, None] * hess * s[None, :], s * grad)
        except np.linalg.LinAlgError:
            break
        decrement = -float(grad @ step)
        neg = step < 0
        t_max = min(1.0, 0.99 * float(np.min(-w[neg] / step[neg]))) if neg.any() else 1.0
        f0 = f(w)
        rounding = 64 * np.finfo(float).eps
        slack = rounding * float(w @ np.abs(a) @ w + np.abs(phi(w)).sum() + abs(f0))
        t = t_max
        while t > 1e-10 * t_max and f(w + t * step) > f0 - 1e-4 * t * decrement + slack:
            t *= 0.5
        if t <= 1e-10 * t_max:
            if fair_residual(a, w + t_max * step, alpha) >= res:
                break
            t = t_max
        w = w + t * step
    ok = fair_residual(a, w, alpha) <= tol or fair_backward_error(a, w, alpha) <= BACKWARD_TOL
    return w, ok


def fair_weights(
    gram: np.ndarray, alpha: float = 1.0, max_iter: int = 200, tol: float = 1e-9
) -> np.ndarray:
    """``w > 0`` with ``(gram w)_t = w_t^(-1/alpha)`` for a PSD ``gram (T, T)`` with a positive
    diagonal; float64. When there is no solution (0 in the convex hull of the gradients), solves
    the equations for ``gram`` with its diagonal raised by the first of :data:`RIDGES` that works
    (each task's squared gradient norm raised by that fraction: a perturbation of the given
    size, whatever the scales); failing all, returns the best finite iterate."""
    n = gram.shape[0]
    scale = float(np.trace(gram)) / n
    a = gram / scale
    best, best_res = None, math.inf
    for ridge in (0.0, *RIDGES):
        w, converged = _newton(a + ridge * np.diag(np.diag(a)), alpha, max_iter, tol)
        if np.all(np.isfinite(w)) and np.all(w > 0):
            if converged:
                best = w
                break
            r0 = fair_residual(a, w, alpha)
            if r0 < best_res:
                best, best_res = w, r0
    if best is None:
        best = np.diag(a) ** (-alpha / (alpha + 1.0))
    return best * scale ** (-alpha / (alpha + 1.0))


@register("fairgrad")
class Fairgrad(GradientWeighting):
    """The update ``G^T w`` whose per-task improvements are ``w_t^(-1/alpha)`` (alpha-fair)."""

    config_class = FairgradConfig
    config: FairgradConfig

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        gram = gram_matrix(grads)
        present = present_tasks(gram)
        w = torch.zeros(grads.shape[0], dtype=torch.float64)
        if bool(present.any()):
            cfg = self.config
            sub = gram[present][:, present].numpy()
            w[present] = torch.from_numpy(fair_weights(sub, cfg.alpha, cfg.max_iter, cfg.tol))
        return combine_rows(w, grads), w.to(device=grads.device, dtype=grads.dtype)
