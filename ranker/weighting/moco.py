"""MoCo: multi-objective gradient correction with tracked gradients.

Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient Bias in Multi-objective
Learning: A Provably Convergent Approach", ICLR 2023 (https://arxiv.org/abs/2210.12624),
Algorithm 1.

MGDA's min-norm weights computed from stochastic gradients are biased, and the bias does not
vanish with the step size. MoCo tracks each task's gradient with a moving average and moves the
weights by one projected-gradient step per model step instead of solving for them:

    y_t <- y_t - beta_k (y_t - g_t)                           (gradient tracking)
    lambda <- Proj_simplex(lambda - gamma_k (Y Y^T + rho I) lambda)
    d = Y^T lambda = sum_t lambda_t y_t                        (the shared update)

with ``beta_k = beta / k^beta_sigma`` and ``gamma_k = gamma / k^gamma_sigma`` at step ``k``. The
``lambda`` step is projected gradient descent on ``1/2 ||Y^T lambda||^2 + rho/2 ||lambda||^2``
over the simplex, so with fixed gradients ``lambda`` converges to MGDA's min-norm weights
(``rho = 0``); ``y_t`` converges to ``g_t`` when the gradient stops changing.

Choices where the paper leaves room:

* Defaults ``beta = 0.5``, ``beta_sigma = 0.5``, ``gamma = 0.1``, ``gamma_sigma = 0.5``,
  ``rho = 0``: LibMTL's, from the authors' code.
* Gradient normalisation (``normalization``): the authors' code (as LibMTL runs it) rescales each
  task gradient to the norm of its loss, ``g_t / ||g_t|| * L_t``, before tracking; that is the
  default ``loss``. ``none`` is Algorithm 1 as written; ``l2`` rescales to unit norm. The
  ``lambda`` step scales with the squared gradient norms: with losses as large as this project's
  watch-time MSE (~1e3) and ``gamma = 0.1``, ``lambda`` jumps between vertices of the simplex
  from step to step until ``gamma_k`` has decayed; ``l2`` (or a smaller ``gamma``) avoids that.
  The authors' code also replaces the projection onto the simplex by a softmax; here it is the
  paper's Euclidean projection (Duchi et al., ICML 2008, sort-based, exact). The projection
  ``Pi_L`` of ``y`` onto a bounded set, there for the analysis, is not applied.
* ``representation`` mode: gradient tracking averages gradients of the same coordinates over
  steps; representation gradients are different samples in every batch, so that mode is accepted
  only without tracking (``beta = 1``, ``beta_sigma = 0``: ``y_t = g_t``). The default mode is
  ``parameters``.

State: ``Y``, ``lambda`` and the step count are buffers, so a resumed run continues exactly.
Without tracking (``beta = 1``, ``beta_sigma = 0``) ``Y`` is this step's normalised gradients,
which the next step does not read: the step then runs on the Gram matrix ``G G^T`` (float32 in
training, as the other gradient rules) and keeps ``Y`` empty.
Returned weights: ``lambda`` (with normalisation ``none`` and ``beta = 1`` the update is exactly
``sum_t lambda_t g_t``).

A task whose gradient is exactly zero this step (no labelled row in the batch: ``head_loss``
returns an attached 0) is left out: weight 0, its ``y_t`` and ``lambda_t`` are left as they were,
and the others' ``lambda`` take their step from their own share of the simplex, renormalised.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from ranker.weighting.base import (
    GradientConfigBase,
    GradientMode,
    GradientWeighting,
    combine_rows,
    gram_matrix,
    present_tasks,
    register,
)


class MocoConfig(GradientConfigBase):
    name: Literal["moco"] = "moco"
    mode: GradientMode = "parameters"
    beta: float = Field(0.5, gt=0, le=1, description="gradient tracking rate")
    beta_sigma: float = Field(0.5, ge=0, allow_inf_nan=False, description="beta_k = beta/k^this")
    gamma: float = Field(0.1, gt=0, allow_inf_nan=False, description="lambda step size")
    gamma_sigma: float = Field(0.5, ge=0, allow_inf_nan=False, description="gamma_k = gamma/k^this")
    rho: float = Field(0.0, ge=0, allow_inf_nan=False, description="l2 regulariser of lambda")
    normalization: Literal["loss", "l2", "none"] = Field(
        "loss", description="rescale g_t to norm L_t (authors' code), to norm 1, or not (paper)"
    )

    @model_validator(mode="after")
    def _tracking_needs_parameters(self) -> MocoConfig:
        if self.mode == "representation" and (self.beta != 1.0 or self.beta_sigma != 0.0):
            raise ValueError(
                "beta: must be 1 with beta_sigma 0 in mode 'representation' (tracking averages "
                "representation gradients of different samples from batch to batch); or use "
                "mode 'parameters'"
            )
        return self


def project_to_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of ``v (T,)`` onto ``{x >= 0, sum x = 1}`` (Duchi et al. 2008)."""
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, 0) - 1.0
    idx = torch.arange(1, v.numel() + 1, dtype=v.dtype, device=v.device)
    rho = int(torch.nonzero(u - css / idx > 0).max())
    theta = css[rho] / (rho + 1)
    return (v - theta).clamp_min(0.0)


@register("moco")
class Moco(GradientWeighting):
    """``sum_t lambda_t y_t``: tracked gradients, weights one projected step toward min-norm."""

    config_class = MocoConfig
    config: MocoConfig

    def __init__(self, tasks: list[str], config: MocoConfig) -> None:
        super().__init__(tasks, config)
        n = len(self.tasks)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("lam", torch.full((n,), 1.0 / n, dtype=torch.float64))
        self.register_buffer("y", torch.zeros(0))  # (T, N) once the first step ran

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.config
        self.step += 1
        k = float(self.step)
        if cfg.beta == 1.0 and cfg.beta_sigma == 0.0:
            return self._combine_untracked(grads, losses, cfg.gamma / k**cfg.gamma_sigma)
        beta_k = cfg.beta / k**cfg.beta_sigma
        gamma_k = cfg.gamma / k**cfg.gamma_sigma
        g = grads.double()
        norms = g.norm(dim=1)
        present = norms > 0
        if cfg.normalization != "none":
            target = losses.double().to(g.device) if cfg.normalization == "loss" else 1.0
            scale = target / norms.clamp_min(1e-300)
            g = g * torch.where(present, scale, 0.0)[:, None]
        y = self.y
        if y.shape != g.shape or y.device != g.device:
            y = torch.zeros_like(g)  # first step (or the shared part changed shape)
        y = torch.where(present[:, None], y - beta_k * (y - g), y)
        self.y = y.detach()
        present_lam = present.to(self.lam.device)
        weights = self._lambda_step(present_lam, lambda: y[present] @ y[present].T, gamma_k)
        w = weights.to(g.device)
        return (w @ y).to(grads.dtype), weights.to(grads.dtype)

    def _combine_untracked(
        self, grads: Tensor, losses: Tensor, gamma_k: float
    ) -> tuple[Tensor, Tensor]:
        """The step without gradient tracking (``beta = 1``, ``beta_sigma = 0``: ``y_t`` is the
        normalised ``g_t``, the only choice in ``representation`` mode), on the Gram matrix.

        ``Y = S G`` with ``S`` the diagonal of the normalisation factors, so ``Y Y^T = S (G
        G^T) S`` (:func:`gram_matrix`, float32 in training) and ``d = (S lambda)^T G`` by one
        matrix-vector product: no float64 copy of the ``(T, N)`` gradients and no ``Y`` buffer
        (it would be this step's gradients, not needed by the next one).
        """
        cfg = self.config
        gram = gram_matrix(grads)
        present = present_tasks(gram)
        if cfg.normalization == "none":
            scale = torch.ones_like(torch.diagonal(gram))
        else:
            norms = torch.diagonal(gram).clamp_min(0.0).sqrt()
            target = losses.to(device="cpu", dtype=torch.float64)
            target = target if cfg.normalization == "loss" else 1.0
            scale = torch.where(present, target / norms.clamp_min(1e-300), 0.0)
        self.y = grads.new_zeros(0)
        p = present.to(self.lam.device)
        scaled = scale[:, None] * gram * scale[None, :]
        weights = self._lambda_step(p, lambda: scaled[present][:, present], gamma_k)
        return combine_rows(weights.cpu() * scale, grads), weights.to(grads.dtype)

    def _lambda_step(self, p: Tensor, present_gram: Callable[[], Tensor], gamma_k: float) -> Tensor:
        """One projected step of ``lambda`` over the present tasks ``p`` on their share of the
        simplex, with ``Y Y^T`` of those tasks from ``present_gram``; returns the weights
        ``(T,)`` (0 for the absent tasks) and updates the ``lam`` buffer."""
        weights = torch.zeros_like(self.lam)
        if bool(p.any()):
            mass = float(self.lam[p].sum())
            lam = self.lam[p] / mass if mass > 0 else torch.full_like(self.lam[p], 1 / int(p.sum()))
            gram = present_gram().to(lam.device)
            lam = project_to_simplex(lam - gamma_k * (gram @ lam + self.config.rho * lam))
            weights[p] = lam
            self.lam[p] = lam * (mass if mass > 0 else 1.0)
        return weights

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # The tracked gradients' shape is only known after the first step: take the saved one's.
        saved = state_dict.get(prefix + "y")
        if isinstance(saved, Tensor):
            self.y = torch.zeros_like(saved, device=self.y.device)
        super()._load_from_state_dict(state_dict, prefix, *args)
