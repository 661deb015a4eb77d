"""UPGrad: the unconflicting projection of gradients (Jacobian descent).

Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024
(https://arxiv.org/abs/2406.16232; official library TorchJD, https://github.com/TorchJD/torchjd).

Each task gradient ``g_i`` is projected onto the dual cone of the task gradients,
``C = {x : <g_t, x> >= 0 for every t}``, the directions that increase no task's loss to first
order: ``pi(g_i) = argmin_{x in C} ||x - g_i||^2``. The update is the mean of the projections,
``d = (1/T) sum_i pi(g_i)`` (the paper's UPGrad with uniform preference; ``pi`` is its
equation (3)). Properties the paper proves: ``d`` is in ``C`` (non-conflicting), ``d`` is the
mean gradient when no pair of gradients conflicts (every ``g_i`` is already in ``C``), and ``d``
is a non-negative combination of the gradients.

The projection in weights (the paper's Proposition 1): ``pi(g_i) = G^T v`` with
``v = argmin_{v >= e_i} v^T (G G^T) v``. The cone ``C`` does not change when a gradient is scaled
by a positive number, so the quadratic program is solved for the unit gradients, i.e. on the
correlation matrix ``K = D^-1 G G^T D^-1`` (``D = diag ||g_t||``, unit diagonal), whatever the
gradients' scales: ``v = ||g_i|| D^-1 u`` with ``u = argmin_{u >= e_i} u^T K u``. Writing
``K = R^T R`` and ``u = e_i + s``, that is the non-negative least-squares problem
``min_{s >= 0} ||R s + R e_i||``, solved exactly (finitely many steps) by the Lawson-Hanson
active-set method written here (TorchJD calls quadprog on the Gram matrix divided by its trace
plus a ridge of 1e-4; neither normalisation nor ridge is needed on ``K``).

No state: a resumed run is the same as an uninterrupted one.

The returned weights are the coefficients of ``d = sum_t w_t g_t``. A task whose gradient is
exactly zero this step (no labelled row in the batch: ``head_loss`` returns an attached 0) is left
out: its constraint is empty and its projection 0; the mean is over the other tasks.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ranker.weighting.base import (
    GradientConfigBase,
    GradientWeighting,
    combine_rows,
    gram_matrix,
    register,
)


class UpgradConfig(GradientConfigBase):
    name: Literal["upgrad"] = "upgrad"


def nnls(c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``argmin_{x >= 0} ||c x - d||`` by Lawson & Hanson's active-set method (Solving Least
    Squares Problems, 1974, chapter 23), for a small dense ``c (m, n)``; float64.

    Each outer step frees the variable with the largest positive ``c^T (d - c x)`` (the negative
    gradient), then the inner loop solves the least-squares problem on the free set and steps
    back to the feasible boundary while a free variable would go negative. A variable whose
    freeing cannot make progress (degenerate ties, rounding) is blocked until ``x`` changes, so
    the method cannot cycle.
    """
    m, n = c.shape
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    blocked = np.zeros(n, dtype=bool)
    tol = 10.0 * max(m, n) * np.finfo(float).eps * max(np.abs(c).sum(0).max(), 1e-300)
    tol *= max(float(np.linalg.norm(d)), 1e-300)
    for _ in range(3 * n + 10):
        grad = c.T @ (d - c @ x)
        candidates = ~passive & ~blocked & (grad > tol)
        if not candidates.any():
            break
        j = int(np.argmax(np.where(candidates, grad, -np.inf)))
        passive[j] = True
        before = x.copy()
        for _ in range(3 * n + 10):
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(c[:, passive], d, rcond=None)[0]
            if np.all(z[passive] > 0):
                x = z
                break
            neg = passive & (z <= 0)
            den = x[neg] - z[neg]  # >= 0: x >= 0 and z <= 0 there
            step = float(np.min(np.where(den > 0, x[neg] / np.where(den > 0, den, 1.0), 0.0)))
            x = x + step * (z - x)
            passive &= x > 0
            passive[neg & (x <= tol)] = False
            x[~passive] = 0.0
        if np.array_equal(x, before):
            blocked[j] = True  # no progress from freeing j: try the next candidate
        else:
            blocked[:] = False
    return x


def project_to_dual_cone(corr: np.ndarray, i: int) -> np.ndarray:
    """``u = argmin_{u >= e_i} u^T corr u`` for a PSD ``corr (T, T)``: the weights of the
    projection of the ``i``-th vector onto the dual cone of vectors with Gram matrix ``corr``."""
    lam, vec = np.linalg.eigh(corr)
    r = np.sqrt(np.clip(lam, 0.0, None))[:, None] * vec.T  # corr = r^T r
    e = np.zeros(corr.shape[0])
    e[i] = 1.0
    return e + nnls(r, -r[:, i])


def upgrad_weights(gram: np.ndarray) -> np.ndarray:
    """UPGrad's ``w (T,)`` with ``d = sum_t w_t g_t`` for the Gram matrix ``G G^T (T, T)``."""
    n = gram.shape[0]
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    present = norms > 0
    w = np.zeros(n)
    k = int(present.sum())
    if k == 0:
        return w
    np_ = norms[present]
    corr = gram[np.ix_(present, present)] / np.outer(np_, np_)
    acc = np.zeros(k)
    for i in range(k):
        acc += np_[i] * project_to_dual_cone(corr, i) / np_
    w[present] = acc / k
    return w


@register("upgrad")
class Upgrad(GradientWeighting):
    """Mean of the task gradients, each projected onto the cone of non-conflicting directions."""

    config_class = UpgradConfig
    config: UpgradConfig

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        w = torch.from_numpy(upgrad_weights(gram_matrix(grads).numpy()))
        return combine_rows(w, grads), w.to(device=grads.device, dtype=grads.dtype)
