"""Random Loss Weighting: fresh random task weights at every step.

Lin, Ye, Xu, Shi & Zhang, "Reasonable Effectiveness of Random Weighting: A Litmus Test for
Multi-Task Learning", TMLR 2022 (arXiv:2111.10603).

At every step ``eps ~ N(0, I_T)`` is drawn and the weights are ``softmax(eps)``. The paper's
weights sum to 1; here they are multiplied by ``T`` so they sum to ``T`` like equal weighting's
(the same expected weight 1 per task, hence a learning rate tuned for equal weighting carries
over). The paper studies several sampling distributions; this is its default, the standard
normal.

Reproducibility: the samples come from a private ``torch.Generator``, seeded with ``seed`` when
configured, otherwise with one draw from torch's global generator at construction (so
``torch.manual_seed`` before building the strategy fixes the run). Its state is saved in
``state_dict()`` (as ``extra_state``), so a resumed run continues the same sequence. Samples are
drawn on the CPU and moved to the losses' device.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from ranker.weighting.base import LossWeighting, WeightingConfigBase, register


class RLWConfig(WeightingConfigBase):
    name: Literal["rlw"] = "rlw"
    seed: int | None = Field(
        None,
        ge=0,
        lt=2**63,
        description="seed of the weight sampler; unset: drawn from torch's global generator",
    )


@register("rlw")
class RLW(LossWeighting):
    """``sum_t w_t L_t`` with ``w = T * softmax(eps)``, ``eps ~ N(0, I)`` resampled every step."""

    config_class = RLWConfig
    config: RLWConfig

    def __init__(self, tasks: list[str], config: RLWConfig) -> None:
        super().__init__(tasks, config)
        seed = config.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    def sample(self) -> Tensor:
        """Draws the next weights, ``(T,)`` float64 on the CPU, summing to ``T``."""
        n = len(self.tasks)
        eps = torch.randn(n, generator=self.generator, dtype=torch.float64)
        return n * torch.softmax(eps, dim=0)

    def weights(self, losses: Tensor) -> Tensor:
        return self.sample().to(device=losses.device, dtype=losses.dtype)

    def get_extra_state(self) -> Any:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        self.generator.set_state(state["generator"])
