"""What each head's raw output means: its training loss and its served prediction.

Kept in one place so the trainer's loss, the evaluator's predictions and the service's numbers
come from the same definition of a task.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ranker.config import TaskSpec


def head_loss(task: TaskSpec, raw: Tensor, label: Tensor, mask: Tensor) -> Tensor:
    """Mean loss of one head over the rows where ``mask`` holds.

    Args:
        raw: head output ``(B,)``: a logit for binary heads, a value for regression heads.
        label: ``(B,)`` in label units (already scaled); arbitrary where ``mask`` is false.
        mask: ``(B,)`` bool, the rows that count for this task.

    Returns:
        A scalar attached to the graph; exactly 0 (still attached) when no row counts, so a batch
        without ratings contributes nothing instead of NaN.
    """
    if not bool(mask.any()):
        return raw.sum() * 0.0
    r, y = raw[mask], label[mask]
    if task.loss == "bce":
        return F.binary_cross_entropy_with_logits(r, y)
    if task.loss == "mse":
        return F.mse_loss(r, y)
    if task.loss == "mse_log1p":
        return F.mse_loss(r, torch.log1p(y.clamp_min(0)))
    if task.loss == "huber_log1p":
        return F.huber_loss(r, torch.log1p(y.clamp_min(0)))
    raise ValueError(f"unknown loss {task.loss!r}")


def head_prediction(task: TaskSpec, raw: Tensor) -> Tensor:
    """The served prediction ``(B,)``: a probability for binary heads, label units otherwise."""
    if task.loss == "bce":
        out = torch.sigmoid(raw)
    elif task.loss in ("mse_log1p", "huber_log1p"):
        out = torch.expm1(raw.clamp(min=0.0, max=30.0))
    else:
        out = raw
    if task.value_range is not None:
        out = out.clamp(task.value_range[0], task.value_range[1])
    return out
