"""STCH: smooth Tchebycheff scalarisation.

Lin, Zhang, Yang, Liu, Wang & Zhang, "Smooth Tchebycheff Scalarization for Multi-Objective
Optimization", ICML 2024 (https://arxiv.org/abs/2402.19078; official code
https://github.com/Xi-L/STCH).

The Tchebycheff scalarisation ``max_t lambda_t (f_t - z_t)`` optimises the worst weighted task,
but is not smooth: its gradient is the gradient of one task at a time. STCH replaces the max by
its log-sum-exp smoothing with parameter ``mu > 0``,

    g_mu(x) = mu log sum_t exp(lambda_t (f_t(x) - z_t) / mu),

whose gradient is ``sum_t p_t lambda_t grad f_t`` with ``p = softmax(lambda (f - z) / mu)``: the
worse a task stands, the more weight it gets. The bounds
``max_t lambda_t (f_t - z_t) <= g_mu <= max_t lambda_t (f_t - z_t) + mu log T`` (the paper's
bound on the smoothing error) make ``mu -> 0`` the Tchebycheff scalarisation; ``mu -> inf``
gives ``p`` uniform, the linear scalarisation.

Choices where the paper leaves room:

* Objectives ``f_t``: ``log`` (default), ``f_t = log(L_t / n_t + eps)`` as in the official deep
  multi-task code (and LibMTL), blind to each loss's scale; or ``raw``, ``f_t = L_t / n_t``, the
  paper's general form. ``n_t`` is the official code's nadir vector: each task's mean training
  loss over the last of ``warmup_epochs`` epochs, during which the model follows the plain sum
  of log-losses (``sum_t log(L_t + eps)``, as the official code) or, in ``raw`` mode, of losses.
  The normalisation matters: with ``mu = 1`` the ``log`` objectives give
  ``softmax_t(f / mu) = (L_t / n_t) / sum_s (L_s / n_s)``, so STCH's gradient is that of
  ``log sum_t L_t / n_t``, i.e. equal weighting of the *normalised* losses (without ``n``, of the
  raw ones). ``warmup_epochs = 0`` takes ``n = 1`` from the start. The official code's default
  is 4 warm-up epochs; here 1, as runs are a few epochs long.
* The ideal point ``z`` is 0 and the preference ``lambda`` all 1 (multiplying every
  ``lambda_t`` by ``c`` is dividing ``mu`` by ``c``); ``mu`` defaults to 1, the official code's
  (and LibMTL's) default.
* Scale: as in the official code the scalarisation is multiplied by the number of tasks ``T``.

State: the nadir vector and the count of epochs seen are buffers (``epoch_end`` sets them), so a
resumed run continues exactly.

Implementation: a :class:`LossWeighting` whose detached weights are ``T p_t df_t/dL_t`` (``T p_t
/ n_t`` in ``raw`` mode, ``T p_t / (L_t + eps n_t)`` in ``log`` mode), so the back-propagated
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
        "log", description="f_t = log(L_t / n_t + eps) (official MTL code) or L_t / n_t"
    )
    warmup_epochs: int = Field(
        1, ge=0, description="epochs of summed (log-)losses whose last sets the nadir n"
    )


def stch_weights(
    losses: Tensor, mu: float, objectives: str = "log", nadir: Tensor | None = None
) -> Tensor:
    """Detached float64 weights ``w (T,)`` with ``sum_t w_t grad L_t = T' grad g_mu`` over the
    ``T'`` tasks with ``L_t > 0`` (0 for the others), for the objectives ``f_t`` of the module
    docstring with nadir ``n`` (default 1)."""
    x = losses.detach().double()
    n = torch.ones_like(x) if nadir is None else nadir.to(x)
    present = x > 0
    w = torch.zeros_like(x)
    if not bool(present.any()):
        return w
    xp, npr = x[present], n[present]
    f = (xp / npr + LOG_EPS).log() if objectives == "log" else xp / npr
    p = torch.softmax(f / mu, dim=0)
    df = 1.0 / (xp + LOG_EPS * npr) if objectives == "log" else 1.0 / npr
    w[present] = int(present.sum()) * p * df
    return w


@register("stch")
class Stch(LossWeighting):
    """Back-propagates ``T mu log sum_t exp(f_t / mu)``: the smoothed worst task."""

    config_class = StchConfig
    config: StchConfig

    def __init__(self, tasks: list[str], config: StchConfig) -> None:
        super().__init__(tasks, config)
        self.register_buffer("nadir", torch.ones(len(self.tasks), dtype=torch.float64))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))

    def weights(self, losses: Tensor) -> Tensor:
        negative = [t for t, v in zip(self.tasks, losses.detach().tolist(), strict=True) if v < 0]
        if negative:
            raise ValueError(f"stch needs losses >= 0: negative for {negative}")
        if int(self.epochs_seen) < self.config.warmup_epochs:
            x = losses.detach().double()
            if self.config.objectives == "raw":
                return torch.ones_like(losses)
            # sum_t log(L_t + eps); a task with a loss of exactly 0 has no gradient: weight 0
            return torch.where(x > 0, 1.0 / (x + LOG_EPS), 0.0).to(losses)
        return stch_weights(losses, self.config.mu, self.config.objectives, self.nadir).to(losses)

    def epoch_end(self, mean_losses: dict[str, float]) -> None:
        self.epochs_seen += 1
        if int(self.epochs_seen) == self.config.warmup_epochs:
            means = torch.tensor([mean_losses[t] for t in self.tasks], dtype=torch.float64)
            # a task never labelled in the epoch (mean 0) or a non-finite mean: no normalisation
            ok = torch.isfinite(means) & (means > 0)
            self.nadir.copy_(torch.where(ok, means, 1.0))
