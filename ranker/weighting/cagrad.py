"""CAGrad: conflict-averse gradient descent.

Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
NeurIPS 2021 (https://arxiv.org/abs/2110.14048; official code
https://github.com/Cranial-XIX/CAGrad).

With ``g0`` the average task gradient, the update ``d`` maximises the worst local improvement
``min_t <g_t, d>`` over the ball ``||d - g0|| <= c ||g0||``. Its dual, over the simplex, is

    min_w  F(w) = <g_w, g0> + sqrt(phi) ||g_w||,   g_w = sum_t w_t g_t,   phi = c^2 ||g0||^2,

and the primal solution is ``d = g0 + sqrt(phi) / ||g_w|| * g_w``. We solve the dual, as the
official code does, with ``scipy.optimize.minimize`` (SLSQP on the simplex), here with the analytic
gradient and on the Gram matrix rescaled to unit diagonal maximum (the minimiser is invariant to a
common scale; unscaled, tiny gradients would stop SLSQP's absolute tolerance at the start point).

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
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from scipy.optimize import minimize
from torch import Tensor

from ranker.weighting.base import GradientConfigBase, GradientWeighting, register


class CagradConfig(GradientConfigBase):
    name: Literal["cagrad"] = "cagrad"
    c: float = Field(0.4, ge=0, allow_inf_nan=False, description="ball radius, times ||g0||")
    rescale: Literal["none", "1+c^2", "1+c"] = Field(
        "1+c^2", description="divide the update by this (official code's rescale 0 / 1 / 2)"
    )


def cagrad_dual_weights(gram: np.ndarray, c: float) -> np.ndarray:
    """Simplex minimiser ``w`` of CAGrad's dual ``F(w)`` for the Gram matrix ``G G^T``."""
    n = gram.shape[0]
    scale = float(np.max(np.diag(gram)))
    uniform = np.full(n, 1.0 / n)
    if n == 1 or scale <= 0.0 or c == 0.0:
        return uniform
    a = gram / scale
    ab = a @ uniform  # <g_t, g0>, scaled
    sqrt_phi = c * math.sqrt(max(float(uniform @ ab), 0.0))

    def fun(w: np.ndarray) -> tuple[float, np.ndarray]:
        aw = a @ w
        norm = math.sqrt(max(float(w @ aw), 0.0) + 1e-12)
        return float(w @ ab) + sqrt_phi * norm, ab + sqrt_phi * aw / norm

    res = minimize(
        fun,
        uniform,
        jac=True,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * n,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(n)}],
        options={"ftol": 1e-12, "maxiter": 200},
    )
    w = np.clip(res.x, 0.0, None)
    total = w.sum()
    return w / total if total > 0 and np.all(np.isfinite(w)) else uniform


@register("cagrad")
class Cagrad(GradientWeighting):
    """The update within ``c ||g0||`` of the average gradient with the best worst-task descent."""

    config_class = CagradConfig
    config: CagradConfig

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        # A task without labelled rows has an exact zero gradient: left out (kept, it would pin
        # min_t <g_t, d> at 0 and dilute g0).
        present = grads.abs().amax(dim=1) > 0
        coef_all = torch.zeros(grads.shape[0], dtype=torch.float64, device=grads.device)
        if not bool(present.any()):
            return torch.zeros_like(grads[0]), coef_all.to(grads.dtype)
        t = int(present.sum())
        c = self.config.c
        g = grads[present].double()
        gram = (g @ g.T).cpu()
        w = torch.from_numpy(cagrad_dual_weights(gram.numpy(), c))
        g0_norm = math.sqrt(max(float(gram.mean()), 0.0))  # ||g0||^2 = mean of G G^T
        gw_norm = math.sqrt(max(float(w @ gram @ w), 0.0))
        lam = c * g0_norm / gw_norm if gw_norm > 0 else 0.0
        coef = torch.full((t,), 1.0 / t, dtype=torch.float64) + lam * w
        divisor = {"none": 1.0, "1+c^2": 1.0 + c * c, "1+c": 1.0 + c}[self.config.rescale]
        coef_all[present] = (coef / divisor).to(grads.device)
        direction = coef_all @ grads.double()
        return direction.to(grads.dtype), coef_all.to(grads.dtype)
