"""The interface every task-weighting strategy implements, and the registry keyed by config name.

A strategy turns the per-task losses of one step into gradients on the model. Two families exist:

* loss-based strategies (equal, static, uncertainty, DWA, ...) compute one weight per task and
  back-propagate the weighted sum; their learnable parameters (if any) are ordinary parameters of
  the strategy module and join the optimizer;
* gradient-based strategies (MGDA, PCGrad, CAGrad, ...) need each task's gradient on the shared
  part of the model and choose the update direction themselves.

Both families go through :meth:`Weighting.backward`, so the training loop has no special cases.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

GradientMode = Literal["parameters", "representation"]


class WeightingConfigBase(BaseModel):
    """Base of every strategy's config. Each subclass declares ``name: Literal["..."]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def check_tasks(self, tasks: list[str]) -> None:
        """Raises ``ValueError("<key>: ...")`` when the config does not fit the task list, with
        the strategy's own key first (the top-level config validator prefixes ``weighting.``,
        so the error names the key in the config file)."""


@dataclass
class SharedPart:
    """What the strategy may differentiate with respect to.

    Attributes:
        params: parameters that every task's loss flows through (embeddings, experts).
        representation: output of the shared part for this batch, still attached to the graph,
            e.g. the experts' outputs ``(B, E, H)``. Gradient-based strategies in
            ``representation`` mode differentiate w.r.t. it instead of ``params`` (the MGDA-UB
            shortcut), which costs one small backward per task instead of a full one.
    """

    params: list[nn.Parameter]
    representation: Tensor | None = None


class Weighting(nn.Module):
    """Turns per-task losses into gradients on the model.

    Subclasses set ``name`` and ``config_class`` and implement :meth:`backward`. Parameters a
    strategy owns (e.g. log-variances) are ``nn.Parameter`` attributes: the trainer adds
    ``weighting.parameters()`` to the optimizer. State that must survive a resume lives in buffers
    or ``extra_state`` so ``state_dict()`` carries it.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[WeightingConfigBase]]

    def __init__(self, tasks: list[str], config: WeightingConfigBase) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("a weighting strategy needs at least one task")
        self.tasks = list(tasks)
        self.config = config

    def backward(self, losses: dict[str, Tensor], shared: SharedPart) -> dict[str, float]:
        """Runs the backward pass for one step.

        Args:
            losses: scalar loss per task, keyed by task name, attached to the graph.
            shared: the shared part of the model (see :class:`SharedPart`).

        Returns:
            The weight each task's loss effectively received this step, for logging.
        """
        raise NotImplementedError

    def epoch_end(self, mean_losses: dict[str, float]) -> None:  # noqa: B027 - optional hook
        """Called once per epoch with the epoch's mean training loss per task (DWA uses it)."""

    def stack(self, losses: dict[str, Tensor]) -> Tensor:
        """Per-task losses as one vector in ``self.tasks`` order, shape ``(T,)``."""
        missing = [t for t in self.tasks if t not in losses]
        if missing:
            raise KeyError(f"losses missing for tasks {missing}")
        return torch.stack([losses[t] for t in self.tasks])


class LossWeighting(Weighting):
    """A strategy that back-propagates ``sum_t w_t * L_t`` with weights from :meth:`weights`."""

    def weights(self, losses: Tensor) -> Tensor:
        """Weights ``(T,)`` for the stacked losses ``(T,)``; may carry a graph (learned weights)."""
        raise NotImplementedError

    def backward(self, losses: dict[str, Tensor], shared: SharedPart) -> dict[str, float]:
        stacked = self.stack(losses)
        w = self.weights(stacked)
        total = (w * stacked).sum() + self.regulariser()
        total.backward()
        return dict(zip(self.tasks, w.detach().tolist(), strict=True))

    def regulariser(self) -> Tensor | float:
        """Extra term added to the objective (e.g. uncertainty weighting's log-variance sum)."""
        return 0.0


_REGISTRY: dict[str, type[Weighting]] = {}
W = TypeVar("W", bound=type[Weighting])


def register(name: str) -> Callable[[W], W]:
    """Class decorator: makes a strategy available under ``name`` in config."""

    def deco(cls: W) -> W:
        if name in _REGISTRY:
            raise ValueError(f"weighting strategy {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def registry() -> dict[str, type[Weighting]]:
    """All registered strategies, keyed by config name (a copy)."""
    return dict(_REGISTRY)


class GradientConfigBase(WeightingConfigBase):
    """Config fields every gradient-based strategy shares."""

    mode: GradientMode = "representation"
    """``representation``: task gradients w.r.t. the shared representation (cheap, MGDA-UB);
    ``parameters``: w.r.t. every shared parameter (exact, one full backward per task)."""


class GradientWeighting(Weighting):
    """A strategy that needs each task's gradient on the shared part.

    Subclasses implement :meth:`combine`. This base class gathers the per-task gradients in the
    configured mode and applies the combined direction: task-specific parameters (gates, towers)
    receive their own task's gradient as usual, the shared part receives the combined direction.

    Cost. In ``representation`` mode the gradient matrix is large (``(T, 1.57M)`` for the default
    model and batch) and the combine step can cost as much as the backward passes, so a rule
    should touch it as few times as possible, in its own dtype (float32 in training):

    * :func:`gram_matrix` gives ``G G^T`` by one matmul, as a float64 ``(T, T)`` matrix on the
      CPU: every quantity most rules need (norms, inner products, cosines, projections) is in it,
      and their small solve runs on it in float64;
    * :func:`present_tasks` reads the tasks whose gradient is not exactly zero off its diagonal;
    * :func:`combine_rows` forms ``sum_t w_t g_t`` by one matrix-vector product in the
      gradients' dtype.

    No float64 copy of the ``(T, N)`` matrix is needed; the properties that define a rule are
    properties of its ``T x T`` solve, which stays in float64.
    """

    config: GradientConfigBase

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        """Chooses the shared update.

        Args:
            grads: per-task gradients on the shared part, flattened, ``(T, N)``.
            losses: the detached per-task losses, ``(T,)``.

        Returns:
            ``(direction (N,), weights (T,))``: the gradient to apply to the shared part and the
            effective per-task weights, for logging.
        """
        raise NotImplementedError

    def backward(self, losses: dict[str, Tensor], shared: SharedPart) -> dict[str, float]:
        stacked = self.stack(losses)
        use_rep = self.config.mode == "representation" and shared.representation is not None
        targets: list[Tensor] = [shared.representation] if use_rep else list(shared.params)  # type: ignore[list-item]
        grads = self.task_gradients(stacked, targets)
        direction, weights = self.combine(grads, stacked.detach())
        if use_rep:
            rep = targets[0]
            # One backward: the plain sum gives every task-specific parameter its own task's
            # gradient; the correction on the representation replaces the sum of task gradients
            # reaching the shared part by the chosen direction (the Jacobian is linear).
            correction = minus_row_sum(direction, grads).view_as(rep)
            torch.autograd.backward(
                [stacked.sum(), rep], [torch.ones_like(stacked.sum()), correction]
            )
        else:
            stacked.sum().backward()
            # As in representation mode, replace this call's sum of task gradients by the
            # direction and keep whatever the gradients held before the call.
            correction = minus_row_sum(direction, grads)
            offset = 0
            for p in targets:
                n = p.numel()
                delta = correction[offset : offset + n].view_as(p).to(p.dtype)
                p.grad = delta.clone() if p.grad is None else p.grad + delta
                offset += n
        return dict(zip(self.tasks, weights.detach().tolist(), strict=True))

    @staticmethod
    def task_gradients(stacked: Tensor, targets: list[Tensor]) -> Tensor:
        """Flattened gradient of each loss w.r.t. ``targets``, ``(T, N)``; unused targets give 0.

        Written row by row into one preallocated matrix (no concatenated or stacked copies)."""
        sizes = [x.numel() for x in targets]
        out = targets[0].new_empty(stacked.shape[0], sum(sizes))
        for t in range(stacked.shape[0]):
            gs = torch.autograd.grad(stacked[t], targets, retain_graph=True, allow_unused=True)
            for part, g in zip(out[t].split(sizes), gs, strict=True):
                if g is None:
                    part.zero_()
                else:
                    part.copy_(g.reshape(-1))
        return out


def gram_matrix(grads: Tensor) -> Tensor:
    """``G G^T`` of the task gradients ``G (T, N)``: one matmul in ``G``'s dtype (float32 in
    training: no float64 copy of ``G``), returned as a symmetric float64 ``(T, T)`` matrix on the
    CPU for the rule's small solve. Rounding of a float32 Gram is about ``1e-7`` of
    ``||g_s|| ||g_t||`` per entry, far below what a weighting rule can resolve."""
    m = (grads @ grads.T).to(device="cpu", dtype=torch.float64)
    return 0.5 * (m + m.T)


def present_tasks(gram: Tensor) -> Tensor:
    """Boolean ``(T,)``: the tasks whose gradient is not zero, from the diagonal of
    :func:`gram_matrix`. A task without a labelled row in the batch has an exact zero gradient
    (``head_loss`` returns an attached 0); the rules leave such a task out of the step."""
    return torch.diagonal(gram) > 0


def combine_rows(weights: Tensor, grads: Tensor) -> Tensor:
    """``sum_t w_t g_t`` for weights ``(T,)`` (any dtype, any device) and gradients ``(T, N)``:
    one matrix-vector product in the gradients' dtype."""
    return weights.to(device=grads.device, dtype=grads.dtype) @ grads


def minus_row_sum(direction: Tensor, grads: Tensor) -> Tensor:
    """``direction - sum_t g_t`` by one matrix-vector product (no ``(T, N)`` temporary)."""
    ones = grads.new_ones(grads.shape[0])
    return torch.addmv(direction.to(grads.dtype), grads.T, ones, alpha=-1.0)
