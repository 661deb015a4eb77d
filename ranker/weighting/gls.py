"""GLS: the geometric loss strategy, the geometric mean of the task losses.

Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation and
Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019
(https://arxiv.org/abs/1904.08492), the geometric loss strategy.

The total loss is the geometric mean ``L = (prod_t L_t)^(1/T)`` instead of the sum. Its gradient
is ``sum_t (L / (T L_t)) grad L_t``: each task's gradient is divided by its own loss, so a task
whose loss is 100x larger does not get a 100x larger share of the update, and multiplying one
loss by a constant ``c`` multiplies the whole update by ``c^(1/T)`` without changing its
direction (the scale invariance that motivates the method).

No state: a resumed run is the same as an uninterrupted one.

Implementation: a :class:`LossWeighting` whose detached weights are ``w_t = L / (T L_t)``, so the
back-propagated ``sum_t w_t L_t`` has exactly the geometric mean's gradient (and the value ``L``);
the returned weights are those ``w_t``. ``L`` is computed as ``exp(mean_t log L_t)`` so that a
product of many small losses does not underflow.

GLS needs ``L_t > 0``. A task whose loss is exactly 0 this step (no labelled row in the batch:
``head_loss`` returns an attached 0) would make the product 0 and stop every task's update; it is
left out (weight 0) and the geometric mean is taken over the other tasks. A negative loss stops
the step with an error naming the task.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ranker.weighting.base import LossWeighting, WeightingConfigBase, register


class GlsConfig(WeightingConfigBase):
    name: Literal["gls"] = "gls"


def geometric_mean_weights(losses: Tensor) -> Tensor:
    """``w_t = GM / (T' L_t)`` over the ``T'`` tasks with ``L_t > 0`` (0 for the others), so that
    ``sum_t w_t grad L_t`` is the gradient of their geometric mean ``GM``. Detached, float64."""
    x = losses.detach().double()
    present = x > 0
    w = torch.zeros_like(x)
    if bool(present.any()):
        logs = x[present].log()
        gm = logs.mean().exp()
        w[present] = gm / (int(present.sum()) * x[present])
    return w


@register("gls")
class Gls(LossWeighting):
    """Back-propagates the geometric mean of the task losses."""

    config_class = GlsConfig
    config: GlsConfig

    def weights(self, losses: Tensor) -> Tensor:
        negative = [t for t, v in zip(self.tasks, losses.detach().tolist(), strict=True) if v < 0]
        if negative:
            raise ValueError(f"gls takes the geometric mean of the losses: negative for {negative}")
        return geometric_mean_weights(losses).to(losses)
