"""GradDrop: gradient sign dropout.

Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, "Just Pick a Sign: Optimizing Deep
Multitask Models with Gradient Sign Dropout", NeurIPS 2020 (https://arxiv.org/abs/2010.06808),
Algorithm 1.

Where task gradients disagree in sign, GradDrop keeps, entry by entry, only the gradients of one
sign, chosen at random in proportion to how much of the total gradient has that sign. At the
shared activations ``A`` (the ``representation``):

1. ``G_i = sum over the batch of sign(A) * dL_i/dA`` (one value per feature);
2. the positive sign purity ``P = 1/2 (1 + sum_i G_i / sum_i |G_i|)``, in ``[0, 1]``;
3. ``U ~ Uniform(0, 1)`` per feature, and the masks
   ``M_i = [P > U] [G_i > 0] + [P < U] [G_i < 0]``: with probability ``P`` the tasks with a
   positive ``G_i`` pass, otherwise those with a negative one;
4. the update ``sum_i (l_i + (1 - l_i) M_i) dL_i/dA``, the mask of a feature applied to every
   sample's gradient of that feature; the leak ``l`` (``leak``, default 0: pure GradDrop) lets a
   fraction of every gradient through regardless.

Where all tasks agree in sign, ``P`` is 0 or 1 and nothing is dropped; where they conflict, the
expected update is ``sum_i P dL_i/dA`` over the positive ``G_i`` plus ``(1 - P)`` times the
negative ones, so over many steps no sign is starved.

Choices where the paper leaves room:

* ``parameters`` mode (the paper applies GradDrop to activations; LibMTL refuses parameter
  gradients): ``G_i`` is the parameter gradient itself (no batch dimension, no ``sign(A)``), one
  mask entry per parameter. The ``representation`` mode is the paper's method.
* ``sum_i |G_i| = 0`` (no gradient at a feature): ``P = 1/2``, as LibMTL's ``+1e-7``.

Randomness is seeded: step ``k`` draws ``U`` from ``numpy.random.default_rng([seed, k])``, and
``k`` is a buffer, so a resumed run draws the same masks as an uninterrupted one.

Returned weights: per task, the fraction of its gradient's squared norm that passes the masks,
``||(l + (1 - l) M_i) * g_i||^2 / ||g_i||^2`` (1 where nothing was dropped; 0 for a task whose
gradient is exactly zero, e.g. no labelled row in the batch, which contributes nothing to ``P``
or the update).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from ranker.weighting.base import GradientConfigBase, GradientWeighting, SharedPart, register


class GraddropConfig(GradientConfigBase):
    name: Literal["graddrop"] = "graddrop"
    leak: float = Field(0.0, ge=0, le=1, description="fraction of every gradient always kept")
    seed: int = Field(0, ge=0, description="seed of the uniform draws U")


def sign_purity(signed: Tensor) -> Tensor:
    """``P = 1/2 (1 + sum_i G_i / sum_i |G_i|)`` over the task dimension of ``signed (T, F)``;
    1/2 where every ``G_i`` is 0."""
    total = signed.abs().sum(0)
    ratio = torch.where(
        total > 0, signed.sum(0) / total.clamp_min(torch.finfo(total.dtype).tiny), 0
    )
    return 0.5 * (1.0 + ratio)


def drop_masks(signed: Tensor, purity: Tensor, uniform: Tensor) -> Tensor:
    """``M_i = [P > U] [G_i > 0] + [P < U] [G_i < 0]`` for ``signed (T, F)``, as 0/1 floats."""
    keep_pos = (purity > uniform)[None, :] & (signed > 0)
    keep_neg = (purity < uniform)[None, :] & (signed < 0)
    return (keep_pos | keep_neg).to(signed.dtype)


@register("graddrop")
class Graddrop(GradientWeighting):
    """Per feature, only the task gradients of one randomly chosen sign pass."""

    config_class = GraddropConfig
    config: GraddropConfig

    def __init__(self, tasks: list[str], config: GraddropConfig) -> None:
        super().__init__(tasks, config)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._activations: Tensor | None = None

    def backward(self, losses: dict[str, Tensor], shared: SharedPart) -> dict[str, float]:
        rep = shared.representation
        use_rep = self.config.mode == "representation" and rep is not None
        self._activations = rep.detach() if use_rep and rep is not None else None
        try:
            return super().backward(losses, shared)
        finally:
            self._activations = None

    def uniform(self, n: int) -> Tensor:
        """This step's ``U``, ``n`` draws in ``[0, 1)``, float64."""
        rng = np.random.default_rng([self.config.seed, int(self.step)])
        return torch.from_numpy(rng.random(n))

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        t = grads.shape[0]
        acts = self._activations
        rows = acts.shape[0] if acts is not None else 1
        per_sample = grads.reshape(t, rows, -1)  # (T, B, F); B = 1 in parameters mode
        # Per task, through one (B, F) buffer (no (T, B, F) temporaries): G_i = sum over the
        # batch of sign(A) * dL_i/dA (Algorithm 1; the gradient itself in parameters mode), and
        # each feature's squared norm over the batch, for the returned weights.
        buf = torch.empty_like(per_sample[0])
        col_sq = per_sample.new_empty(t, per_sample.shape[2])
        if acts is not None:
            sign = acts.reshape(rows, -1).sign()
            signed = per_sample.new_empty(t, per_sample.shape[2])
            for i in range(t):
                torch.sum(torch.mul(per_sample[i], sign, out=buf), 0, out=signed[i])
        else:
            signed = grads
        for i in range(t):
            torch.sum(torch.mul(per_sample[i], per_sample[i], out=buf), 0, out=col_sq[i])
        signed = signed.double()
        purity = sign_purity(signed)
        uniform = self.uniform(purity.numel()).to(purity.device)
        self.step += 1
        masks = drop_masks(signed, purity, uniform)
        leak = self.config.leak
        keep = (leak + (1.0 - leak) * masks).to(grads.dtype)  # (T, F)
        # sum_i keep_i * g_i, one task at a time into one (B, F) buffer: no (T, B, F) temporary
        direction = torch.zeros_like(per_sample[0])
        for i in range(t):
            direction.addcmul_(per_sample[i], keep[i])
        # ||keep_i * g_i||^2 = sum_f keep_if^2 ||g_i[:, f]||^2 (float32 sums over features are
        # pairwise: accurate to a few float32 ulps, the precision the weights are returned in)
        sq = col_sq.sum(1).double()
        kept_sq = (keep * keep * col_sq).sum(1).double()
        weights = torch.where(sq > 0, kept_sq / sq.clamp_min(1e-300), 0.0)
        return direction.reshape(-1), weights.to(grads.dtype)
