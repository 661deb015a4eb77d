"""FAMO: Fast Adaptive Multitask Optimization, balanced loss decrease in O(1) per step.

Liu, Liang, Chen, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023
(arXiv:2306.03792), Algorithm 1; official code https://github.com/Cranial-XIX/FAMO.

Task logits ``xi`` (initialised to 0) give weights ``z = softmax(xi)``. Each step:

* the model follows the gradient of ``sum_t c z_t log L_t`` with ``z`` and
  ``c = (sum_t z_t / L_t)^-1`` held constant, i.e. the direction
  ``c sum_t (z_t / L_t) grad L_t``; the effective per-task weights ``c z_t / L_t`` sum to 1 (as in
  the paper; they are what :meth:`backward` reports);
* after the step, with ``delta_log_t = log L_t(before) - log L_t(after)``, the logits move by
  ``xi <- xi - beta (J_softmax(xi)^T delta_log + gamma xi)``: a task whose loss fell faster than
  the others loses weight. ``beta`` is ``xi_lr``, ``gamma`` is ``weight_decay``.

Choices where the paper leaves room or the interface forces one:

* When the logits update runs. Algorithm 1 needs the losses *after* the model step. The official
  code calls ``update(new_losses)`` after ``optimizer.step()``, with ``new_losses`` from an extra
  no-grad forward pass on the same batch. :meth:`Weighting.backward` is the only call this
  strategy gets per step and cannot run the model, so the update is deferred to the next call:
  each :meth:`backward` first updates ``xi`` from the previous call's log-losses and the current
  ones, i.e. the losses at the updated parameters, measured on the next batch instead of the
  same one (noisier, as batch-to-batch variation adds to the measured change, but with no extra
  forward pass), then computes this step's weights from the updated ``xi``: as in the official
  loop, step ``t`` uses logits updated from every loss change up to ``t``. On a full-batch
  problem this is exactly Algorithm 1.
* The logits optimizer: ``adam`` (default, as the official code: ``torch.optim.Adam`` with
  ``lr=xi_lr``, ``weight_decay=gamma``, betas (0.9, 0.999)), or ``sgd``, Algorithm 1's plain step.
  ``xi`` and the Adam moments are buffers, not parameters, so the trainer's optimizer does not
  touch them and ``state_dict()`` carries them for a resume.
* Positivity: FAMO needs ``L_t > 0``. Losses are floored at ``eps`` (``max(L_t, eps)``; the
  official code adds ``1e-8`` instead). A task at or below the floor gets no gradient that step
  (the floor is flat) and is left out of the normaliser ``c``: otherwise its ``z_t / eps`` term
  would shrink every other task's step to nothing. This matters here because a head with no
  labelled row in the batch (e.g. no rating) has a loss of exactly 0 (``ranker.heads.head_loss``).
  The logits are not updated from, nor referenced to, a step with a loss at the floor or
  non-finite: its log-loss change (``log L - log eps``) would be spurious. The first call has no
  previous losses and skips the update.
* Gradient clipping (``max_norm`` in the official code) is the trainer's business, not done here.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ranker.weighting.base import SharedPart, Weighting, WeightingConfigBase, register

_BETA1, _BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8


class FAMOConfig(WeightingConfigBase):
    name: Literal["famo"] = "famo"
    xi_lr: float = Field(
        0.025, gt=0, allow_inf_nan=False, description="beta: learning rate of the task logits"
    )
    weight_decay: float = Field(
        0.01, ge=0, allow_inf_nan=False, description="gamma: decay of the task logits"
    )
    xi_optimizer: Literal["adam", "sgd"] = "adam"
    """``adam`` as in the official code, ``sgd`` as in the paper's Algorithm 1."""
    eps: float = Field(1e-8, gt=0, allow_inf_nan=False, description="floor of every loss")


@register("famo")
class FAMO(Weighting):
    """Direction ``c sum_t z_t grad log L_t``; logits ``xi`` track the tasks' loss decrease."""

    config_class = FAMOConfig
    config: FAMOConfig

    def __init__(self, tasks: list[str], config: FAMOConfig) -> None:
        super().__init__(tasks, config)
        n = len(self.tasks)
        self.register_buffer("xi", torch.zeros(n))
        self.register_buffer("exp_avg", torch.zeros(n))
        self.register_buffer("exp_avg_sq", torch.zeros(n))
        self.register_buffer("xi_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("prev_log_losses", torch.zeros(n))
        self.register_buffer("has_prev", torch.zeros((), dtype=torch.bool))

    def backward(self, losses: dict[str, Tensor], shared: SharedPart) -> dict[str, float]:
        stacked = self.stack(losses)
        floored = stacked.clamp_min(self.config.eps)
        log_losses = floored.log()
        current = log_losses.detach().to(self.xi)
        above = stacked.detach().to(self.xi) > self.config.eps
        valid = bool((torch.isfinite(current) & above).all())
        if valid and bool(self.has_prev):
            self.update(self.prev_log_losses - current)

        z = torch.softmax(self.xi, dim=0)
        # z_t / max(L_t, eps), leaving out tasks at the floor (see the module docstring)
        inv = torch.where(above, z / floored.detach().to(z), torch.zeros_like(z))
        c = 1.0 / inv.sum().clamp_min(torch.finfo(z.dtype).tiny)
        (c * z).to(log_losses).mul(log_losses).sum().backward()

        if valid:  # only a step with every loss usable becomes the next update's reference
            with torch.no_grad():
                self.prev_log_losses.copy_(current)
                self.has_prev.fill_(True)
        return dict(zip(self.tasks, (c * inv).tolist(), strict=True))

    @torch.no_grad()
    def update(self, delta_log: Tensor) -> None:
        """One step of the logits for the observed decrease ``log L(before) - log L(after)``."""
        z = torch.softmax(self.xi, dim=0)
        # Softmax Jacobian (symmetric) times delta: d/dxi of z . delta.
        delta = z * (delta_log - (z * delta_log).sum())
        grad = delta + self.config.weight_decay * self.xi
        lr = self.config.xi_lr
        if self.config.xi_optimizer == "sgd":
            self.xi.sub_(lr * grad)
            return
        self.xi_steps += 1
        step = int(self.xi_steps)
        self.exp_avg.mul_(_BETA1).add_(grad, alpha=1 - _BETA1)
        self.exp_avg_sq.mul_(_BETA2).addcmul_(grad, grad, value=1 - _BETA2)
        denom = (self.exp_avg_sq / (1 - _BETA2**step)).sqrt_().add_(_ADAM_EPS)
        self.xi.addcdiv_(self.exp_avg, denom, value=-lr / (1 - _BETA1**step))

    def task_weights(self) -> Tensor:
        """The current softmax weights ``z`` (not the effective ``c z_t / L_t``)."""
        return torch.softmax(self.xi, dim=0)
