"""ExcessMTL: robust multi-task learning weighted by each task's estimated excess risk.

He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi & Zhao, "Robust Multi-Task Learning with Excess Risks",
ICML 2024 (https://arxiv.org/abs/2402.02009; official code https://github.com/yifei-he/ExcessMTL),
Algorithm 1.

Loss-based robust weighting (raise the weight of the worst task) is fooled by label noise: a
noisy task has a large loss it can never reduce. ExcessMTL weights tasks by their *excess* risk,
the distance of the loss from its own minimum, estimated from the local quadratic model
``L_t(theta) - L_t* ~ g_t^T H_t^-1 g_t / 2``, with the Hessian replaced by AdaGrad's diagonal
preconditioner ``H_t = diag(sqrt(sum over steps of g_t^2))``. Each step:

    e_t = g_t^T diag(sqrt(acc_t + 1e-7))^-1 g_t,    acc_t <- acc_t + g_t^2 (before e_t),
    r_t = e_t / e_t(first step)                      (each task's excess relative to its start),
    w_t <- w_t exp(eta r_t),   w <- T w / sum(w)      (exponentiated-gradient ascent),

and the shared update is ``sum_t w_t g_t``; ``eta`` is ``step_size`` (default 0.01, the official
code's ``robust_step_size``). At the first step every ``r_t`` is 1, so the weights stay 1.

Choices where the paper leaves room:

* ``representation`` mode: as in the official code (LibMTL's version), each task's gradient is
  summed over the batch first, so the accumulator has one entry per feature of the
  representation, the same coordinates in every batch; ``parameters`` mode (the default)
  accumulates per parameter.
* As everywhere in this package, task-specific parameters get their own task's plain gradient
  (the official code back-propagates ``sum_t w_t L_t``, which also scales the towers by ``w_t``).

State: the accumulator, the first-step excess risks and the weights are buffers, so a resumed run
continues exactly.

A task whose gradient is exactly zero this step (no labelled row in the batch: ``head_loss``
returns an attached 0) is left out: weight 0 this step, its accumulator and weight are left as
they were, and the others' weights are renormalised within their own share. A task's reference
excess is taken at the first step it has a gradient.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from ranker.weighting.base import (
    GradientConfigBase,
    GradientMode,
    GradientWeighting,
    SharedPart,
    combine_rows,
    register,
)

ADAGRAD_EPS = 1e-7  # sqrt(acc + eps), as in the official code


class ExcessMtlConfig(GradientConfigBase):
    name: Literal["excess_mtl"] = "excess_mtl"
    mode: GradientMode = "parameters"
    step_size: float = Field(
        0.01, gt=0, allow_inf_nan=False, description="eta of the exponentiated weight update"
    )


@register("excess_mtl")
class ExcessMtl(GradientWeighting):
    """``sum_t w_t g_t``, the weights raised by each task's AdaGrad-estimated excess risk."""

    config_class = ExcessMtlConfig
    config: ExcessMtlConfig

    def __init__(self, tasks: list[str], config: ExcessMtlConfig) -> None:
        super().__init__(tasks, config)
        n = len(self.tasks)
        self.register_buffer("w", torch.ones(n, dtype=torch.float64))
        self.register_buffer("initial", torch.zeros(n, dtype=torch.float64))  # 0: not yet seen
        self.register_buffer("acc", torch.zeros(0, dtype=torch.float64))  # (T, D) after step 1
        self._rows = 1

    def backward(self, losses: dict[str, Tensor], shared: SharedPart) -> dict[str, float]:
        rep = shared.representation
        use_rep = self.config.mode == "representation" and rep is not None
        self._rows = rep.shape[0] if use_rep and rep is not None else 1
        return super().backward(losses, shared)

    def excess(self, grads: Tensor, present: Tensor) -> Tensor:
        """Updates the accumulator with this step's gradients and returns ``e (T,)``."""
        t = grads.shape[0]
        # Summed over the batch (if any) in the gradients' dtype, then float64 for the
        # accumulator: no float64 copy of the (T, B * F) gradients in representation mode.
        g = grads.reshape(t, self._rows, -1).sum(1).double()
        acc = self.acc
        if acc.shape != g.shape or acc.device != g.device:
            acc = torch.zeros_like(g)
        acc = torch.where(present[:, None], acc + g * g, acc)
        self.acc = acc
        return (g * g / (acc + ADAGRAD_EPS).sqrt()).sum(1)

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        present = torch.linalg.vector_norm(grads, dim=1) > 0
        e = self.excess(grads, present).to(self.w.device)
        p = present.to(self.w.device)
        first = p & (self.initial == 0)
        self.initial[first] = e[first]
        weights = torch.zeros_like(self.w)
        if bool(p.any()):
            r = torch.where(self.initial[p] > 0, e[p] / self.initial[p].clamp_min(1e-300), 1.0)
            mass = float(self.w[p].sum())
            w = self.w[p] * torch.exp(self.config.step_size * (r - r.max()))  # shift: no overflow
            w = w * (mass / float(w.sum()))
            self.w[p] = w
            weights[p] = w
        return combine_rows(weights, grads), weights.to(grads.dtype)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # The accumulator's shape is only known after the first step: take the saved one's.
        saved = state_dict.get(prefix + "acc")
        if isinstance(saved, Tensor):
            self.acc = torch.zeros_like(saved, device=self.acc.device)
        super()._load_from_state_dict(state_dict, prefix, *args)
