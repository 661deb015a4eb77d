"""STCH: smooth Tchebycheff scalarisation.

Lin, Zhang, Yang, Liu, Wang & Zhang, "Smooth Tchebycheff Scalarization for Multi-Objective
Optimization", ICML 2024 (https://arxiv.org/abs/2402.19078; official code
https://github.com/Xi-L/STCH), equation (8).

The Tchebycheff scalarisation ``max_t lambda_t (f_t - z_t)`` optimises the worst weighted task,
but is not smooth: its gradient is the gradient of one task at a time. STCH replaces the max by
its log-sum-exp smoothing with parameter ``mu > 0``,

    g_mu(x) = mu log sum_t exp(lambda_t (f_t(x) - z_t) / mu),

whose gradient is ``sum_t p_t lambda_t grad f_t`` with ``p = softmax(lambda (f - z) / mu)``: the
worse a task stands, the more weight it gets. The bounds
``max_t lambda_t (f_t - z_t) <= g_mu <= max_t lambda_t (f_t - z_t) + mu log T`` (the paper's
Proposition 3.3) make ``mu -> 0`` the Tchebycheff scalarisation; ``mu -> inf`` gives ``p``
uniform, the linear scalarisation.

Choices where the paper leaves room:

* Objectives ``f_t``: ``log`` (default), ``f_t = log(L_t + eps)`` as in the official deep
  multi-task code (and LibMTL), which makes STCH blind to each loss's scale; or ``raw``,
  ``f_t = L_t``, the paper's general form. The ideal point ``z`` is 0 (every loss is >= 0; in
  ``log`` mode the official code's division by a nadir vector measured in a warm-up epoch
  shifts ``f_t`` by a constant, which is a non-zero ``z``: not done here, so there is no
  warm-up phase of summed log-losses either).
* Preference ``lambda``: all 1 (multiplying every ``lambda_t`` by ``c`` is dividing ``mu`` by
  ``c``). ``mu`` defaults to 1, the official code's (and LibMTL's) default.
* Scale: as in the official code the scalarisation is multiplied by ``T``, so the weights sum to
  ``T`` (as equal weighting's) in ``raw`` mode.

No state: a resumed run is the same as an uninterrupted one.

Implementation: a :class:`LossWeighting` whose detached weights are ``T p_t lambda_t df_t/dL_t``
(``T p_t`` in ``raw`` mode, ``T p_t / (L_t + eps)`` in ``log`` mode), so the back-propagated
``sum_t w_t L_t`` has exactly the gradient of ``T g_mu``; the returned weights are those ``w_t``.

A task whose loss is exactly 0 this step (no labelled row in the batch: ``head_loss`` returns an
attached 0, with no gradient) is left out (weight 0) and the softmax runs over the other tasks:
kept, its ``f_t`` would be a made-up value (the ideal 0, or ``log eps``) that only moves the
others' weights. A negative loss stops the step with an error naming the task.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ranker.weighting.base import LossWeighting, WeightingConfigBase, register

LOG_EPS = 1e-8


class StchConfig(WeightingConfigBase):
    name: Literal["stch"] = "stch"
    mu: float = Field(1.0, gt=0, allow_inf_nan=False, description="smoothing; 0 is Tchebycheff")
    objectives: Literal["log", "raw"] = Field(
        "log", description="f_t = log(L_t + eps) (official MTL code) or L_t"
    )


def stch_value(f: Tensor, mu: float) -> Tensor:
    """``mu log sum_t exp(f_t / mu)`` (ideal point 0, preference 1), stably."""
    return mu * torch.logsumexp(f / mu, dim=0)


def stch_weights(losses: Tensor, mu: float, objectives: str = "log") -> Tensor:
    """Detached float64 weights ``w (T,)`` with ``sum_t w_t grad L_t = T grad g_mu`` over the
    tasks with ``L_t > 0`` (0 for the others)."""
    x = losses.detach().double()
    present = x > 0
    w = torch.zeros_like(x)
    if not bool(present.any()):
        return w
    xp = x[present]
    f = (xp + LOG_EPS).log() if objectives == "log" else xp
    p = torch.softmax(f / mu, dim=0)
    df = 1.0 / (xp + LOG_EPS) if objectives == "log" else torch.ones_like(xp)
    w[present] = int(present.sum()) * p * df
    return w


@register("stch")
class Stch(LossWeighting):
    """Back-propagates ``T mu log sum_t exp(f_t / mu)``: the smoothed worst task."""

    config_class = StchConfig
    config: StchConfig

    def weights(self, losses: Tensor) -> Tensor:
        negative = [t for t, v in zip(self.tasks, losses.detach().tolist(), strict=True) if v < 0]
        if negative:
            raise ValueError(f"stch needs losses >= 0: negative for {negative}")
        return stch_weights(losses, self.config.mu, self.config.objectives).to(losses)
