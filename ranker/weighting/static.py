"""Static weighting: fixed per-task weights from config, as hand-tuned production systems use."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ranker.weighting.base import LossWeighting, WeightingConfigBase, register


class StaticConfig(WeightingConfigBase):
    name: Literal["static"] = "static"
    weights: dict[str, float] = Field(description="weight per task name; every task needs one")

    def model_post_init(self, __context: object) -> None:
        bad = {k: v for k, v in self.weights.items() if not v >= 0 or v != v or v == float("inf")}
        if bad:
            raise ValueError(f"static weights must be finite and >= 0, got {bad}")

    def check_tasks(self, tasks: list[str]) -> None:
        missing = [t for t in tasks if t not in self.weights]
        unknown = [k for k in self.weights if k not in tasks]
        if missing or unknown:
            raise ValueError(
                f"weights must name every task exactly: missing {missing}, unknown {unknown}; "
                f"tasks are {tasks}"
            )


@register("static")
class Static(LossWeighting):
    """``sum_t w_t * L_t`` with the configured weights."""

    config_class = StaticConfig
    config: StaticConfig

    def __init__(self, tasks: list[str], config: StaticConfig) -> None:
        super().__init__(tasks, config)
        config.check_tasks(tasks)
        self.register_buffer("w", torch.tensor([config.weights[t] for t in tasks]))

    def weights(self, losses: Tensor) -> Tensor:
        return self.w.to(losses)
