"""GradNorm: learned task weights that balance the tasks' gradient norms on the shared part.

Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
Balancing in Deep Multitask Networks", ICML 2018 (arXiv:1711.02257), Algorithm 1.

At every step, with learnable weights ``w_t`` (initialised to 1) and shared tensor ``W``:

* ``G_t = || grad_W (w_t L_t) ||_2`` and ``G_avg = mean_t G_t``;
* ``Ltilde_t = L_t / L_t(0)`` (the inverse training rate, ``L_t(0)`` the first step's loss) and
  ``r_t = Ltilde_t / mean_i Ltilde_i``;
* ``L_grad = sum_t | G_t - G_avg * r_t^alpha |_1`` with the target ``G_avg * r_t^alpha`` held
  constant (as the paper prescribes); ``grad_w L_grad`` is the gradient of the weights only;
* the model receives the gradient of ``sum_t w_t L_t`` with ``w`` held constant: the GradNorm
  loss never reaches the model, and the weights are moved only by ``L_grad``;
* after the update the weights are renormalised so that ``sum_t w_t = T``.

Choices where the paper leaves room or the interface forces one:

* ``W``: the paper uses the last shared layer's weights. :class:`SharedPart` has no handle on
  "the last layer", so ``mode="representation"`` (default) takes the gradient w.r.t. the shared
  representation (the experts' outputs, i.e. the output of the last shared layer, the usual
  cheap variant, as in LibMTL), and ``mode="parameters"`` w.r.t. all shared parameters (exact
  for "the whole shared part", one backward through the shared part per task). Representation
  mode falls back to parameters when the trainer passes no representation.
* ``G_t = w_t * ||grad_W L_t||`` (exact, as ``w_t > 0``): the per-task gradient norms are computed
  once, without a second-order graph, and ``L_grad`` is differentiated w.r.t. ``w`` only.
* Renormalisation: the weights are the ``nn.Parameter`` ``loss_weights`` and the trainer's
  optimizer updates them in ``optimizer.step()``, after :meth:`backward` returns. The strategy
  therefore renormalises at the *start* of the next :meth:`backward`, before the weights are
  used: every step uses weights that sum to ``T``, exactly as in the paper's loop. Between a step
  and the next backward (e.g. in a checkpoint) the stored weights may not sum to ``T``; the next
  backward fixes that. Weights are clamped to ``min_weight`` before renormalising, so a too-large
  step cannot make a weight zero or negative.
* ``L_t(0)`` is the loss of the first step this strategy sees (kept in a buffer, so a resumed run
  keeps its reference), floored at ``eps``.
* A loss of exactly 0 means "no labelled row in this batch" here (``ranker.heads.head_loss``
  returns 0 for an empty mask, e.g. a batch without ratings). Such a task is left out of that
  step's GradNorm loss, of ``G_avg`` and of the mean of ``Ltilde`` (it has no gradient and no
  training rate to balance), its weight is unchanged by ``L_grad``, and ``L_t(0)`` is taken from
  the first step where the task's loss is positive.
* The weights learn at the trainer's learning rate (the paper uses one optimizer for both).
  ``grad_w L_grad`` has the size of the task gradient norms, so with plain SGD the weights' step
  scales with them and can oscillate; an Adam-type optimizer (scale-free) is the safer choice.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ranker.weighting.base import GradientMode, SharedPart, Weighting, WeightingConfigBase, register


class GradNormConfig(WeightingConfigBase):
    name: Literal["gradnorm"] = "gradnorm"
    alpha: float = Field(
        1.5,
        ge=0,
        allow_inf_nan=False,
        description="asymmetry: strength of the pull toward equal training rates (paper: 0-3)",
    )
    mode: GradientMode = "representation"
    """``representation``: gradient norms w.r.t. the shared representation (cheap);
    ``parameters``: w.r.t. every shared parameter."""
    min_weight: float = Field(
        1e-4, gt=0, allow_inf_nan=False, description="floor of a weight before renormalising"
    )
    eps: float = Field(1e-12, gt=0, allow_inf_nan=False, description="floor of L_t(0)")


@register("gradnorm")
class GradNorm(Weighting):
    """``sum_t w_t L_t`` for the model, GradNorm's loss for the weights ``w``."""

    config_class = GradNormConfig
    config: GradNormConfig

    def __init__(self, tasks: list[str], config: GradNormConfig) -> None:
        super().__init__(tasks, config)
        n = len(self.tasks)
        self.loss_weights = nn.Parameter(torch.ones(n))
        self.register_buffer("initial_losses", torch.ones(n))
        self.register_buffer("initialised", torch.zeros(n, dtype=torch.bool))

    @torch.no_grad()
    def renormalise(self) -> None:
        """Clamps the weights to ``min_weight`` and rescales them to sum to ``T``."""
        w = self.loss_weights
        w.clamp_(min=self.config.min_weight)
        w.mul_(len(self.tasks) / w.sum())

    def backward(self, losses: dict[str, Tensor], shared: SharedPart) -> dict[str, float]:
        stacked = self.stack(losses)
        self.renormalise()  # the previous optimizer step's update of the weights
        detached = stacked.detach().to(self.initial_losses)
        present = detached > 0  # see the module docstring: a loss of exactly 0 is "no labels"
        with torch.no_grad():
            first = present & ~self.initialised
            self.initial_losses.copy_(torch.where(first, detached, self.initial_losses))
            self.initialised.logical_or_(present)
        active = present.to(detached)
        n_active = active.sum().clamp_min(1.0)

        norms = self._task_gradient_norms(stacked, shared).to(self.loss_weights)
        w = self.loss_weights
        g = w * norms  # G_t = ||grad_W (w_t L_t)||, differentiable in w only
        ratio = active * detached / self.initial_losses.clamp_min(self.config.eps)
        r = ratio / ((ratio.sum() / n_active).clamp_min(self.config.eps))
        g_avg = (g * active).sum() / n_active
        target = (g_avg * r.pow(self.config.alpha)).detach()
        gradnorm_loss = ((g - target).abs() * active).sum()
        (w_grad,) = torch.autograd.grad(gradnorm_loss, w)

        used = w.detach().clone()
        (used.to(stacked) * stacked).sum().backward()
        if w.grad is None:
            w.grad = w_grad
        else:
            w.grad += w_grad
        return dict(zip(self.tasks, used.tolist(), strict=True))

    def _task_gradient_norms(self, stacked: Tensor, shared: SharedPart) -> Tensor:
        """``||grad_W L_t||_2`` per task, detached, ``(T,)``; 0 for a task not reaching ``W``."""
        if self.config.mode == "representation" and shared.representation is not None:
            targets: list[Tensor] = [shared.representation]
        else:
            targets = [p for p in shared.params if p.requires_grad]
        if not targets:
            raise ValueError("GradNorm needs a shared representation or shared parameters")
        norms = []
        for t in range(stacked.shape[0]):
            grads = torch.autograd.grad(stacked[t], targets, retain_graph=True, allow_unused=True)
            sq = stacked.new_zeros(())
            for grad in grads:
                if grad is not None:
                    sq = sq + grad.detach().pow(2).sum().to(sq)
            norms.append(sq.sqrt())
        return torch.stack(norms)
