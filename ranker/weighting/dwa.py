"""Dynamic Weight Average: weights from the rate at which each task's loss has been falling.

Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019
(arXiv:1803.10704), "Dynamic Weight Average"::

    w_t(e) = T * exp(r_t(e-1) / temperature) / sum_i exp(r_i(e-1) / temperature)
    r_t(e-1) = L_t(e-1) / L_t(e-2)

where ``L_t(e)`` is task ``t``'s mean training loss over epoch ``e`` (the hook
:meth:`Weighting.epoch_end` supplies it) and ``T`` the number of tasks, so the weights sum to
``T``. A task whose loss fell least in the last epoch gets the largest weight. As in the paper,
every weight is 1 during the first two epochs (no ratio exists yet). Weights are constant within
an epoch. The paper uses ``temperature = 2``.

The last two epochs' mean losses and the number of epochs seen are buffers, so ``state_dict()``
carries them across a resume. A zero mean loss in the denominator is clamped to ``eps``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ranker.weighting.base import LossWeighting, WeightingConfigBase, register


class DWAConfig(WeightingConfigBase):
    name: Literal["dwa"] = "dwa"
    temperature: float = Field(
        2.0, gt=0, allow_inf_nan=False, description="softmax temperature (paper: 2)"
    )
    eps: float = Field(
        1e-12, gt=0, allow_inf_nan=False, description="floor of L_t(e-2) in the loss ratio"
    )


@register("dwa")
class DWA(LossWeighting):
    """``sum_t w_t L_t`` with ``w = T * softmax(r / temperature)``, ``r`` the epoch loss ratios."""

    config_class = DWAConfig
    config: DWAConfig

    def __init__(self, tasks: list[str], config: DWAConfig) -> None:
        super().__init__(tasks, config)
        n = len(self.tasks)
        # history[0] = L(e-2), history[1] = L(e-1): mean losses of the last two finished epochs.
        self.register_buffer("history", torch.zeros(2, n, dtype=torch.float64))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))

    def epoch_end(self, mean_losses: dict[str, float]) -> None:
        missing = [t for t in self.tasks if t not in mean_losses]
        if missing:
            raise KeyError(f"epoch mean losses missing for tasks {missing}")
        values = [float(mean_losses[t]) for t in self.tasks]
        bad = {t: v for t, v in zip(self.tasks, values, strict=True) if not math.isfinite(v)}
        if bad:
            raise ValueError(f"DWA needs finite epoch mean losses, got {bad}")
        new = torch.tensor(values, dtype=self.history.dtype, device=self.history.device)
        self.history[0] = self.history[1]
        self.history[1] = new
        self.epochs_seen += 1

    def current_weights(self) -> Tensor:
        """The weights for the current epoch, ``(T,)`` float64."""
        n = len(self.tasks)
        ratio = self.history[1] / self.history[0].clamp_min(self.config.eps)
        dwa = n * torch.softmax(ratio / self.config.temperature, dim=0)
        # torch.where instead of an ``if`` on the buffer: no host sync per step on a GPU.
        return torch.where(self.epochs_seen >= 2, dwa, torch.ones_like(dwa))

    def weights(self, losses: Tensor) -> Tensor:
        return self.current_weights().to(device=losses.device, dtype=losses.dtype)
