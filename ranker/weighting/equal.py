"""Equal weighting: the plain sum of task losses, the baseline every other strategy is judged by."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ranker.weighting.base import LossWeighting, WeightingConfigBase, register


class EqualConfig(WeightingConfigBase):
    name: Literal["equal"] = "equal"


@register("equal")
class Equal(LossWeighting):
    """Every task's loss with weight 1."""

    config_class = EqualConfig

    def weights(self, losses: Tensor) -> Tensor:
        return torch.ones_like(losses)
