"""Uncertainty weighting: each task's loss is scaled by a learned homoscedastic uncertainty.

Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry
and Semantics", CVPR 2018 (arXiv:1705.07115).

The paper derives, from a Gaussian likelihood with observation noise ``sigma_t``, the objective
``1 / (2 sigma_t^2) L_t + log sigma_t`` for a regression task and ``1 / sigma_t^2 L_t +
log sigma_t`` for a classification task, and learns ``s_t = log sigma_t^2`` for numerical
stability. We use the common simplified form, identical for every task::

    total = sum_t exp(-s_t) * L_t + s_t

This is exactly twice the paper's regression objective ``1/2 exp(-s_t) L_t + 1/2 s_t``: the factor
``1/2`` is dropped for every task alike (it only rescales the whole objective, the optimum
``s_t = log L_t`` is unchanged), and classification tasks are not given the separate form with
optimum ``s_t = log(2 L_t)``. The tasks here mix classification (click, like) and regression
(watch time, rating) heads, so one uniform form keeps the weights comparable; it is the form of
LibMTL and most reimplementations. The reported weight of task ``t`` is ``exp(-s_t)``.

``s_t`` are ``nn.Parameter`` s of the strategy, optimised by the trainer's optimizer together with
the model.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ranker.weighting.base import LossWeighting, WeightingConfigBase, register


class UncertaintyConfig(WeightingConfigBase):
    name: Literal["uncertainty"] = "uncertainty"
    init_log_variance: float = Field(
        0.0,
        allow_inf_nan=False,
        ge=-20.0,
        le=20.0,
        description="initial s_t = log sigma_t^2 for every task (0: every weight starts at 1)",
    )


@register("uncertainty")
class Uncertainty(LossWeighting):
    """``sum_t exp(-s_t) L_t + s_t`` with learnable log-variances ``s_t``."""

    config_class = UncertaintyConfig
    config: UncertaintyConfig

    def __init__(self, tasks: list[str], config: UncertaintyConfig) -> None:
        super().__init__(tasks, config)
        self.log_vars = nn.Parameter(torch.full((len(self.tasks),), config.init_log_variance))

    def weights(self, losses: Tensor) -> Tensor:
        return torch.exp(-self.log_vars).to(losses.dtype)

    def regulariser(self) -> Tensor:
        return self.log_vars.sum()
