"""Static weighting: fixed per-task weights from config, as hand-tuned production systems use."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from ranker.weighting.base import LossWeighting, WeightingConfigBase, register


class StaticConfig(WeightingConfigBase):
    name: Literal["static"] = "static"
    weights: dict[str, float] = Field(description="weight per task name; every task needs one")

    @field_validator("weights")
    @classmethod
    def _finite_non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        # A field validator (not a model-level check) so that the error names weighting.weights.
        bad = {k: x for k, x in v.items() if not 0 <= x < float("inf")}
        if bad:
            raise ValueError(f"static weights must be finite and >= 0, got {bad}")
        return v

    def check_tasks(self, tasks: list[str]) -> None:
        missing = [t for t in tasks if t not in self.weights]
        unknown = [k for k in self.weights if k not in tasks]
        if missing or unknown:
            raise ValueError(
                f"weights: must name every task exactly: missing {missing}, unknown {unknown}; "
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
