"""Nash-MTL: multi-task learning as a bargaining game.

Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task Learning as a
Bargaining Game", ICML 2022 (https://arxiv.org/abs/2202.01017; official code
https://github.com/AvivNavon/nash-mtl).

The Nash bargaining solution for the update is ``d = sum_t alpha_t g_t`` with ``alpha > 0``
solving the bargaining equations ``(G G^T alpha)_t = 1 / alpha_t`` for every task ``t``
(the paper's Claim 3.1). The paper (and its cvxpy code) reaches them through a sequence of convex
approximations. cvxpy is not available here, so we use that these equations are exactly the
stationarity conditions of the strictly convex function

    f(alpha) = 1/2 alpha^T (G G^T) alpha - sum_t log(alpha_t),   alpha > 0,

(``grad f = G G^T alpha - 1/alpha``), whose unique minimiser is therefore the bargaining
solution. ``f`` is a quadratic plus a log barrier, hence self-concordant (Nesterov & Nemirovski;
Boyd & Vandenberghe, *Convex Optimization*, 9.6), and it is minimised by Newton's method with a
backtracking line search that never takes less than the damped step ``1 / (1 + lambda)``
(``lambda`` the Newton decrement): from any ``alpha > 0`` that step stays in ``alpha > 0`` and
decreases ``f`` by at least ``lambda - log(1 + lambda)``, so the iteration converges whenever a
solution exists, whatever the CPU's rounding (the ``trust-exact`` solve used before could stop
far from it: residuals near 1 on some inputs, which ones depending on the CPU). The stopping test
is the residual ``max_t |alpha_t (G G^T alpha)_t - 1|`` itself, down to ``tol`` or to the
rounding floor of float64 for that Gram matrix. The solution exists when 0 is not in the convex
hull of the gradients (not Pareto stationary); for the stationary case a tiny ridge on ``G G^T``
keeps it finite. As in the official code the Gram matrix is divided by its Frobenius norm for
conditioning and the previous ``alpha`` warm-starts the solve.

Scale: the paper's ``alpha`` (returned by default) makes ``||d||^2 = alpha^T G G^T alpha = T``
whatever the gradients' size (the paper's scale invariance). The official code instead uses the
solution for the *normalised* Gram matrix, i.e. ``alpha * ||G G^T||_F^(1/2)``, which shrinks
with the gradients; ``official_scale = true`` reproduces that.

Options from the paper's code: ``update_weights_every`` (solve every k-th step; the steps between
reuse the last ``alpha`` and cost one extra backward instead of one per task) and ``max_norm``
(after the backward, clip the total gradient norm of the shared parameters, as the official code
does with ``clip_grad_norm_``; 0 disables). Both modes clip the shared *parameters'* gradient. As
everywhere in this package, task-specific parameters get their own task's plain gradient (the
official code's weighted-loss backward scales them by ``alpha_t``).

A task whose gradient is exactly zero at a solve (no labelled row in the batch: ``head_loss``
returns an attached 0) is left out: weight 0, the equations are solved for the other tasks, and
its last ``alpha`` is kept for the steps that reuse the weights.
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
    SharedPart,
    combine_rows,
    gram_matrix,
    present_tasks,
    register,
)


class NashMtlConfig(GradientConfigBase):
    name: Literal["nash_mtl"] = "nash_mtl"
    update_weights_every: int = Field(1, ge=1, description="solve for alpha every k-th step")
    max_norm: float = Field(
        1.0, ge=0, allow_inf_nan=False, description="clip the shared gradient norm (0: off)"
    )
    max_iter: int = Field(100, ge=1, description="solver iterations at most")
    tol: float = Field(1e-8, gt=0, lt=1, description="max |alpha_t (G G^T alpha)_t - 1| accepted")
    official_scale: bool = Field(
        False, description="return alpha for the Frobenius-normalised Gram (official code's scale)"
    )


def bargaining_residual(gram: np.ndarray, alpha: np.ndarray) -> float:
    """``max_t |alpha_t (gram alpha)_t - 1|``: 0 exactly at the bargaining solution."""
    return float(np.max(np.abs(alpha * (gram @ alpha) - 1.0)))


def rounding_floor(gram: np.ndarray, alpha: np.ndarray) -> float:
    """The size of float64 rounding in :func:`bargaining_residual` at ``alpha``:
    ``eps * max_t alpha_t (|gram| alpha)_t``. Close to Pareto stationarity ``alpha`` is large and
    ``gram @ alpha`` a sum of large terms that cancel, so no solver can get the residual below
    this."""
    return float(np.finfo(np.float64).eps * np.max(alpha * (np.abs(gram) @ alpha)))


FLOOR_FACTOR = 16.0
"""A residual within this many rounding floors (:func:`rounding_floor`) is accepted."""

MAX_FLOOR = 1e-4
"""... as long as that floor is below this: when ``f`` is unbounded (0 in the hull) ``alpha``
grows without bound and so does the floor, which must then not pass for convergence."""


def newton_bargaining(
    gram: np.ndarray, start: np.ndarray, max_iter: int = 100, tol: float = 1e-8
) -> tuple[np.ndarray, bool]:
    """Minimises ``f(alpha) = 1/2 alpha^T gram alpha - sum_t log(alpha_t)`` from ``start > 0``.

    Newton's method on ``f`` (self-concordant, see the module docstring). In the variable
    ``u = delta / alpha`` the Newton system is ``(D gram D + I) u = -r`` with ``D = diag(alpha)``
    and ``r = alpha * (gram alpha) - 1`` the residual: symmetric positive definite with every
    eigenvalue >= 1 whatever the scale of ``alpha``, solved by Cholesky; the Newton decrement is
    ``lambda^2 = -r.u``. The line search starts at the full step and halves it while it leaves
    ``alpha > 0`` or fails Armijo's test, down to the damped step ``1 / (1 + lambda)``, which is
    always feasible and always decreases ``f``.

    Returns ``(alpha, converged)``, ``converged`` when the residual is within ``tol`` or within
    the rounding floor (:func:`rounding_floor`).
    """
    n = gram.shape[0]
    alpha = np.array(start, dtype=np.float64)
    eye = np.eye(n)

    def f(a: np.ndarray) -> float:
        return float(0.5 * a @ gram @ a - np.log(a).sum())

    fa = f(alpha)
    for _ in range(max_iter + 1):
        r = alpha * (gram @ alpha) - 1.0
        res = float(np.max(np.abs(r)))
        floor = rounding_floor(gram, alpha)
        if res <= tol or (res <= FLOOR_FACTOR * floor and floor <= MAX_FLOOR):
            return alpha, True
        if not np.isfinite(res):
            return alpha, False
        h = alpha[:, None] * gram * alpha[None, :] + eye
        try:
            c = np.linalg.cholesky(h)
            u = -np.linalg.solve(c.T, np.linalg.solve(c, r))
        except np.linalg.LinAlgError:
            u = -np.linalg.lstsq(h, r, rcond=None)[0]
        slope = float(r @ u)  # directional derivative of f along alpha * u: -lambda^2
        if not slope < 0:
            return alpha, False  # no descent left at float64 precision
        damped = 1.0 / (1.0 + np.sqrt(-slope))
        step = 1.0
        while step > damped:
            new = alpha * (1.0 + step * u)
            if np.all(new > 0):
                fn = f(new)
                if fn <= fa + 0.25 * step * slope:
                    break
            step *= 0.5
        else:
            step = damped
            new = alpha * (1.0 + step * u)
            fn = f(new)
        alpha, fa = new, fn
    return alpha, False


def solve_bargaining(
    gram: np.ndarray, start: np.ndarray | None = None, max_iter: int = 100, tol: float = 1e-8
) -> np.ndarray:
    """``alpha > 0`` with ``gram @ alpha = 1 / alpha`` for a PSD ``gram (T, T)``, float64.

    :func:`newton_bargaining` from the warm ``start`` (the last solution), then from the solution
    for orthogonal gradients, ``1 / ||g_t||``. When there is no solution (0 in the convex hull of
    the gradients: ``f`` is unbounded below) it solves ``(gram + r I) alpha = 1 / alpha`` for the
    first ``r`` in 1e-8, 1e-6 (relative to a unit Frobenius norm) that works, so
    ``||sum_t alpha_t g_t||^2 = T - r ||alpha||^2`` stays below ``T``. Failing all, the best
    iterate found is returned.
    """
    n = gram.shape[0]
    diag = np.diag(gram)
    starts = [s for s in (start,) if s is not None and np.all(s > 0) and np.all(np.isfinite(s))]
    starts.append(1.0 / np.sqrt(np.where(diag > 0, diag, 1.0)))
    best, best_res = starts[0], bargaining_residual(gram, starts[0])
    for ridge in (0.0, 1e-8, 1e-6):
        m = gram + ridge * np.eye(n)
        for x0 in starts:
            alpha, converged = newton_bargaining(m, x0, max_iter, tol)
            if not np.all(np.isfinite(alpha)) or not np.all(alpha > 0):
                continue
            if converged:
                return alpha  # solves the (ridged, if it had to be) equations
            r = bargaining_residual(gram, alpha)
            if r < best_res:
                best, best_res = alpha, r
    return best


@register("nash_mtl")
class NashMtl(GradientWeighting):
    """The Nash bargaining update ``sum_t alpha_t g_t`` with ``alpha_t (G G^T alpha)_t = 1``."""

    config_class = NashMtlConfig
    config: NashMtlConfig

    def __init__(self, tasks: list[str], config: NashMtlConfig) -> None:
        super().__init__(tasks, config)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        # The last solution (returned scale), used between solves and to warm-start the next.
        self.register_buffer("alpha", torch.ones(len(self.tasks), dtype=torch.float64))

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        gram_all = gram_matrix(grads)
        # A task without labelled rows has an exact zero gradient: left out (kept, it would make
        # the equations unsolvable: alpha_t * 0 = 1).
        present = present_tasks(gram_all)
        weights = torch.zeros(grads.shape[0], dtype=torch.float64)
        gram = gram_all[present][:, present].numpy()
        norm = float(np.linalg.norm(gram))
        if norm > 0 and math.isfinite(norm):
            # Solve for the normalised Gram, gram / norm: its solution is alpha * sqrt(norm).
            prev = self.alpha.cpu()[present].numpy()
            start = prev if self.config.official_scale else prev * math.sqrt(norm)
            a_hat = solve_bargaining(gram / norm, start, self.config.max_iter, self.config.tol)
            alpha = a_hat if self.config.official_scale else a_hat / math.sqrt(norm)
            weights[present] = torch.from_numpy(np.asarray(alpha, dtype=np.float64))
            self.alpha[present.to(self.alpha.device)] = weights[present].to(self.alpha)
        return combine_rows(weights, grads), weights.to(grads)

    def backward(self, losses: dict[str, Tensor], shared: SharedPart) -> dict[str, float]:
        solve = int(self.step) % self.config.update_weights_every == 0
        self.step += 1
        if solve:
            weights = super().backward(losses, shared)
        else:
            weights = self._backward_fixed(self.stack(losses), shared)
        if self.config.max_norm > 0:
            params = [p for p in shared.params if p.grad is not None]
            if params:
                torch.nn.utils.clip_grad_norm_(params, self.config.max_norm)
        return weights

    def _backward_fixed(self, stacked: Tensor, shared: SharedPart) -> dict[str, float]:
        """The base class's update with the last ``alpha`` instead of a new solve: shared part
        gets ``sum_t alpha_t g_t``, task-specific parameters their own task's gradient; one extra
        backward of ``sum_t (alpha_t - 1) L_t`` replaces the per-task ones."""
        alpha = self.alpha.to(stacked)
        use_rep = self.config.mode == "representation" and shared.representation is not None
        if use_rep:
            rep = shared.representation
            assert rep is not None
            (corr,) = torch.autograd.grad(
                ((alpha - 1.0) * stacked).sum(), [rep], retain_graph=True, allow_unused=True
            )
            corr = torch.zeros_like(rep) if corr is None else corr
            total = stacked.sum()
            torch.autograd.backward([total, rep], [torch.ones_like(total), corr])
        else:
            params = list(shared.params)
            gs = torch.autograd.grad(
                (alpha * stacked).sum(), params, retain_graph=True, allow_unused=True
            )
            stacked.sum().backward()
            for p, gp in zip(params, gs, strict=True):
                p.grad = torch.zeros_like(p) if gp is None else gp.clone()
        return dict(zip(self.tasks, alpha.detach().tolist(), strict=True))
