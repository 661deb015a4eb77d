"""CAGrad: conflict-averse gradient descent.

Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
NeurIPS 2021 (https://arxiv.org/abs/2110.14048; official code
https://github.com/Cranial-XIX/CAGrad).

With ``g0`` the average task gradient, the update ``d`` maximises the worst local improvement
``min_t <g_t, d>`` over the ball ``||d - g0|| <= c ||g0||``. Its dual, over the simplex, is

    min_w  F(w) = <g_w, g0> + sqrt(phi) ||g_w||,   g_w = sum_t w_t g_t,   phi = c^2 ||g0||^2,

and the primal solution is ``d = g0 + sqrt(phi) / ||g_w|| * g_w``. The official code solves the
dual with ``scipy.optimize.minimize`` (SLSQP on the simplex); so did this module, and on
ill-conditioned Gram matrices (task gradients of very different sizes) SLSQP stopped where ``F``
could no longer resolve the small tasks: on a sweep of 864 cases its ``d`` missed the optimum
``min_t <g_t, d>`` by more than ``1e-8 ||g0|| max_t ||g_t||`` on 238, by up to 3e-3. The dual
is now solved by an active-set method on the faces of the simplex
(:func:`cagrad_dual_weights`), whose stopping test is the optimality condition itself:
``<g_t, d>`` (the gradient of ``F``) equal on the weights in use and not smaller elsewhere. It
works on the Gram matrix rescaled to unit diagonal maximum (the minimiser is invariant to a
common scale).

``c`` (default 0.4, the paper's value on NYUv2 and Cityscapes) trades average descent (``c = 0``
is plain gradient descent on the average loss) against the worst task. ``rescale`` divides ``d``
as the official code does: ``none``; ``1+c^2`` (the official default); ``1+c``. The scale of ``d``
is that of the *average* gradient (official code), i.e. ``1/T`` of the equal-weighting sum.
Returned weights: ``d = sum_t (1/T + lambda w_t) / rescale * g_t``, the coefficients of each task
gradient in ``d``.

A task whose gradient is exactly zero this step (no labelled row in the batch: ``head_loss``
returns an attached 0) is left out: it gets weight 0 and the rule runs on the other tasks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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


class CagradConfig(GradientConfigBase):
    name: Literal["cagrad"] = "cagrad"
    c: float = Field(0.4, ge=0, allow_inf_nan=False, description="ball radius, times ||g0||")
    rescale: Literal["none", "1+c^2", "1+c"] = Field(
        "1+c^2", description="divide the update by this (official code's rescale 0 / 1 / 2)"
    )


def cagrad_dual_weights(gram: np.ndarray, c: float, max_iter: int = 200) -> np.ndarray:
    """Simplex minimiser ``w`` of CAGrad's dual ``F(w)`` for the Gram matrix ``G G^T``.

    An active-set method: on the current face (the weights in use) a Newton step for the
    face's optimality condition (``grad F`` constant on the face, weights summing to 1), or the
    face's steepest descent where the Newton step is no descent direction (``F`` is linear along
    parallel gradients); an exact line search on the sign of ``F``'s slope (``F`` is convex, so
    the slope is increasing along the line, and the search needs no values of ``F``, which
    rounding makes useless for the small tasks when the gradients differ by decades); a step that
    reaches the face's boundary drops that weight. When the face is optimal (``grad F`` constant
    to ``1e-13 ||g0||``, or no descent left at float64 precision) a task with a smaller
    ``<g_t, d>`` than the face's joins, else the point is optimal. ``||g_w||`` is smoothed by
    ``(1e-12 ||g0||)^2`` under the root, which changes ``F`` by less than ``1e-12 c ||g0||^2``.
    """
    n = gram.shape[0]
    scale = float(np.max(np.diag(gram)))
    uniform = np.full(n, 1.0 / n)
    if n == 1 or scale <= 0.0 or c == 0.0:
        return uniform
    a = gram / scale
    b = a @ uniform  # <g_t, g0>, scaled
    g0_norm = math.sqrt(max(float(uniform @ b), 0.0))
    if g0_norm <= 1e-150:
        return uniform  # g0 = 0: d = g0 whatever w
    sqrt_phi = c * g0_norm
    smooth = (1e-12 * g0_norm) ** 2
    tol = 1e-13 * g0_norm

    def gradient(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        ax = a @ x
        norm = math.sqrt(max(float(x @ ax), 0.0) + smooth)
        return b + sqrt_phi * ax / norm, ax, norm

    x = uniform.copy()
    active = np.ones(n, dtype=bool)
    stuck = False
    for _ in range(max_iter):
        grad, ax, norm = gradient(x)
        idx = np.flatnonzero(active)
        gs = grad[idx]
        if gs.max() - gs.min() <= tol or stuck:
            stuck = False
            outside = np.where(active, np.inf, grad - float(x[idx] @ gs))
            t = int(np.argmin(outside))
            if outside[t] >= -tol:
                return x
            active[t] = True
            continue
        k = len(idx)
        kkt = np.ones((k + 1, k + 1))
        kkt[:k, :k] = sqrt_phi * (a[np.ix_(idx, idx)] / norm - np.outer(ax[idx], ax[idx]) / norm**3)
        kkt[k, k] = 0.0
        newton = np.linalg.lstsq(kkt, np.concatenate([-gs, [0.0]]), rcond=1e-13)[0][:k]
        projected = gs - gs.mean()
        stuck = True
        for p, full in ((newton, 1.0), (-projected, math.inf)):
            new = _face_step(x, idx, p, full, gs, projected, lambda y: gradient(y)[0])
            if new is not None:
                active = new > 0
                x = new / new.sum()
                stuck = False
                break
    return x


def _face_step(
    x: np.ndarray,
    idx: np.ndarray,
    p: np.ndarray,
    full: float,
    gs: np.ndarray,
    projected: np.ndarray,
    gradient: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray | None:
    """``x`` moved along ``p`` (on the coordinates ``idx``) to the minimum of ``F`` on the line,
    at most ``full`` and at most to the simplex's boundary (where that weight becomes exactly
    0); ``None`` when ``p`` is no descent direction or the line search cannot move."""
    d0 = float(gs @ p)
    if not (
        np.all(np.isfinite(p))
        and np.abs(p).max() > 1e-14
        and -d0 > 1e-8 * float(np.linalg.norm(p) * np.linalg.norm(projected))
    ):
        return None
    neg = p < 0
    ratios = np.where(neg, x[idx] / np.where(neg, -p, 1.0), np.inf)
    theta_max = float(ratios.min())
    hi = min(full, theta_max)
    if not math.isfinite(hi):
        return None

    def slope(theta: float) -> float:
        y = x.copy()
        y[idx] += theta * p
        return float(gradient(y)[idx] @ p)

    d_hi = slope(hi)
    if d_hi <= 1e-6 * -d0:
        theta = hi  # F decreases (up to rounding) all the way
    else:
        lo, d_lo = 0.0, d0  # d_lo < 0 < d_hi: the line minimum is in between
        for i in range(60):
            mid = lo - d_lo * (hi - lo) / (d_hi - d_lo)  # regula falsi, alternating with
            if i % 2 or not lo < mid < hi:  # bisection (regula falsi alone can stall)
                mid = 0.5 * (lo + hi)
            d_mid = slope(mid)
            if d_mid <= 0:
                lo, d_lo = mid, d_mid
            else:
                hi, d_hi = mid, d_mid
            if min(-d_lo, d_hi) <= 1e-6 * -d0 or hi - lo <= 1e-16 * hi:
                break
        theta = hi if d_hi <= 1e-6 * -d0 else lo
    if theta <= 0:
        return None
    new = x.copy()
    new[idx] += theta * p
    if theta == theta_max:
        new[idx[int(np.argmin(ratios))]] = 0.0
    return np.clip(new, 0.0, None)


@register("cagrad")
class Cagrad(GradientWeighting):
    """The update within ``c ||g0||`` of the average gradient with the best worst-task descent."""

    config_class = CagradConfig
    config: CagradConfig

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        gram_all = gram_matrix(grads)
        # A task without labelled rows has an exact zero gradient: left out (kept, it would pin
        # min_t <g_t, d> at 0 and dilute g0).
        present = present_tasks(gram_all)
        coef_all = torch.zeros(grads.shape[0], dtype=torch.float64)
        if not bool(present.any()):
            return torch.zeros_like(grads[0]), coef_all.to(grads)
        t = int(present.sum())
        c = self.config.c
        gram = gram_all[present][:, present]
        w = torch.from_numpy(cagrad_dual_weights(gram.numpy(), c))
        g0_norm = math.sqrt(max(float(gram.mean()), 0.0))  # ||g0||^2 = mean of G G^T
        gw_norm = math.sqrt(max(float(w @ gram @ w), 0.0))
        lam = c * g0_norm / gw_norm if gw_norm > 0 else 0.0
        coef = torch.full((t,), 1.0 / t, dtype=torch.float64) + lam * w
        divisor = {"none": 1.0, "1+c^2": 1.0 + c * c, "1+c": 1.0 + c}[self.config.rescale]
        coef_all[present] = coef / divisor
        return combine_rows(coef_all, grads), coef_all.to(grads)
