"""DB-MTL: dual-balancing multi-task learning.

Lin, Ye, Xu, Shi, Zhang & Kwok, "Dual-Balancing for Multi-Task Learning", arXiv 2308.12029, 2023
(official code: the ``DB_MTL`` strategy of LibMTL, https://github.com/median-research-group/LibMTL).

Two balancing steps:

* loss-scale balancing: every loss is log-transformed, ``log(L_t + eps)`` (``eps = 1e-8`` as in
  the official code), so a task's gradient is ``grad L_t / (L_t + eps)``, blind to the loss's scale;
* gradient-magnitude balancing: each task's log-loss gradient is smoothed with an EMA,
  ``m_t <- beta_k m_t + (1 - beta_k) grad log L_t`` (``m`` starts at 0, no bias correction,
  ``beta_k = beta / k^beta_sigma`` at step ``k``: the official code's schedule, defaults
  ``beta = 0.9``, ``beta_sigma = 0``), and rescaled to the largest norm: the shared update is
  ``sum_t alpha_t m_t`` with ``alpha_t = max_s ||m_s|| / ||m_t||``.

The log transform applies to the whole objective, as in the paper and the official code (which
back-propagates ``log L_t`` into the task-specific parameters too): :meth:`DbMtl.backward` hands
the base class the log-losses, so :meth:`DbMtl.combine` receives gradients of ``log(L_t + eps)``
and the log-losses, and the task-specific parameters get ``grad log L_t``. Losses must be >= 0.

The EMA is over gradients of the same parameters from step to step, so the default mode is
``parameters`` (the official code refuses representation gradients). In ``representation`` mode
the rows of the gradient are different samples in every batch, so an EMA across batches means
nothing: that mode is accepted only with ``beta = 0`` (then the scaling uses the current batch).

The EMA ``m`` (``grad_buffer``) and the step count are buffers, so a resumed run continues them.
Returned weights: ``alpha_t / (L_t + eps)``, the weight the raw loss ``L_t``'s gradient receives
(exact for ``beta = 0``; with the EMA, this step's gradient enters the update with
``(1 - beta_k)`` times that weight, the rest of ``m_t`` being past steps' gradients).

A task whose gradient is exactly zero this step (no labelled row in the batch: ``head_loss``
returns an attached 0) is left out: weight 0, and its EMA is left as it was.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from ranker.weighting.base import (
    GradientConfigBase,
    GradientMode,
    GradientWeighting,
    SharedPart,
    combine_rows,
    register,
)

LOG_EPS = 1e-8  # log(L + eps), as in the official code


class DbMtlConfig(GradientConfigBase):
    name: Literal["db_mtl"] = "db_mtl"
    mode: GradientMode = "parameters"
    beta: float = Field(0.9, ge=0, lt=1, description="EMA factor of the log-loss gradients")
    beta_sigma: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="beta_k = beta / k^beta_sigma at step k"
    )

    @model_validator(mode="after")
    def _ema_needs_parameters(self) -> DbMtlConfig:
        if self.mode == "representation" and self.beta > 0:
            raise ValueError(
                "beta: must be 0 with mode 'representation' (an EMA of representation "
                "gradients mixes different samples from batch to batch); or use mode 'parameters'"
            )
        return self


@register("db_mtl")
class DbMtl(GradientWeighting):
    """Log-loss gradients, EMA-smoothed and scaled to the largest norm, then summed."""

    config_class = DbMtlConfig
    config: DbMtlConfig

    def __init__(self, tasks: list[str], config: DbMtlConfig) -> None:
        super().__init__(tasks, config)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("grad_buffer", torch.zeros(0))  # (T, N) once the first step ran

    def backward(self, losses: dict[str, Tensor], shared: SharedPart) -> dict[str, float]:
        stacked = self.stack(losses)
        if bool((stacked.detach() < 0).any()):
            raise ValueError(
                f"db_mtl log-transforms the losses and needs them >= 0, got "
                f"{dict(zip(self.tasks, stacked.detach().tolist(), strict=True))}"
            )
        logs = {t: torch.log(losses[t] + LOG_EPS) for t in self.tasks}
        return super().backward(logs, shared)

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        """``grads``: gradients of ``log(L_t + eps)``; ``losses``: those log-losses."""
        self.step += 1
        beta_k = self.config.beta / float(self.step) ** self.config.beta_sigma
        # A task without labelled rows has an exact zero gradient: left out of this step, its
        # EMA neither decays nor pushes the shared part.
        present = torch.linalg.vector_norm(grads, ord=math.inf, dim=1) > 0
        buf = self.grad_buffer
        fresh = buf.shape != grads.shape or buf.device != grads.device or buf.dtype != grads.dtype
        if beta_k == 0.0 and bool(present.all()):
            buf = grads.detach()  # the EMA is this step's gradient: no copy
        else:
            if fresh:
                buf = torch.zeros_like(grads)  # first step (or the shared part changed shape)
            # m <- beta_k m + (1 - beta_k) g on the tasks present; in place when beta_k > 0 (then
            # the buffer is never a step's gradient itself: beta_k is 0 at every step or none).
            if beta_k == 0.0:
                buf = torch.where(present[:, None], grads.detach(), buf)
            elif bool(present.all()):
                buf.lerp_(grads.detach(), 1.0 - beta_k)
            else:
                buf[present] = torch.lerp(buf[present], grads.detach()[present], 1.0 - beta_k)
        self.grad_buffer = buf
        # Row norms in the gradients' dtype (no float64 copy of the (T, N) EMA).
        norms = torch.where(present, torch.linalg.vector_norm(buf, dim=1), 0.0).double()
        # max / norm; an EMA of exactly 0 has nothing to scale (the official code adds 1e-8 to
        # the norm instead, which also perturbs the balance of small gradients).
        alpha = torch.where(norms > 0, norms.max() / norms.clamp_min(1e-300), 0.0)
        weights = alpha * torch.exp(-losses.double().to(alpha.device))  # alpha_t / (L_t + eps)
        return combine_rows(alpha, buf), weights.to(grads.dtype)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # The EMA's shape is only known after the first step: take the saved one's.
        saved = state_dict.get(prefix + "grad_buffer")
        if isinstance(saved, Tensor):
            self.grad_buffer = torch.zeros_like(saved, device=self.grad_buffer.device)
        super()._load_from_state_dict(state_dict, prefix, *args)
