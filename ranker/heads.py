"""What each head's raw output means: its training loss, its served prediction, its start.

Kept in one place so the trainer's loss, the evaluator's predictions and the service's numbers
come from the same definition of a task.

Losses (``TaskSpec.loss``):

* ``bce``: binary cross-entropy on a logit; serves the probability.
* ``mse`` / ``mse_log1p`` / ``huber_log1p``: regression on the value or on ``log1p(value)``;
  ``*_log1p`` serves ``expm1`` of the output (a geometric-type mean: it under-estimates the mean
  of zero-inflated, heavy-tailed labels such as watch time).
* ``weighted_logistic``: Covington, Adams & Sargin, "Deep Neural Networks for YouTube
  Recommendations" (RecSys 2016), section 4.2: rows with a positive label (watched) are positives
  weighted by the label, the other rows negatives with unit weight. The learned odds
  ``exp(logit)`` equal ``sum(T) / N_negative``, which is ``E[T] / (1 - P)`` (about ``E[T]`` when
  positives are rare); the head serves ``exp(logit)`` in label units.
* ``ziln``: zero-inflated lognormal (Wang, Liu & Miao, "A Deep Probabilistic Model for Customer
  Lifetime Value Prediction", 2019): three raw outputs, a logit for ``P(T > 0)`` and the ``mu``
  and (through softplus) ``sigma`` of a lognormal for ``T`` given ``T > 0``. The loss is the
  binary cross-entropy of ``T > 0`` plus, on positive rows, the lognormal negative
  log-likelihood; it serves the mean ``p * exp(mu + sigma^2 / 2)`` in label units, calibrated
  where ``expm1(E[log1p T])`` is a geometric-type mean far below it.
* ``ordinal``: cumulative-link model over ``1..K`` (McCullagh 1980). The head outputs ``K-1``
  raw values turned into decreasing cumulative logits ``c_k = logit P(y > k)``:
  ``c_1 = r_1``, ``c_k = c_{k-1} - softplus(r_k)``, so the star distribution is always valid.
  It serves the expected value ``1 + sum_k P(y > k)`` and :func:`head_distribution` gives the
  whole distribution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ranker.config import TaskSpec

_MAX_LOG_ODDS = 30.0


_MIN_SIGMA = 1e-3
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def output_dim(task: TaskSpec) -> int:
    """Raw outputs the head needs."""
    if task.loss == "ziln":
        return 3
    return (task.levels - 1) if task.loss == "ordinal" and task.levels else 1


def ziln_parts(raw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ZILN head: raw ``(B, 3)`` -> (logit of ``P(T > 0)``, ``mu``, ``sigma``), each ``(B,)``."""
    return raw[:, 0], raw[:, 1], F.softplus(raw[:, 2]).clamp_min(_MIN_SIGMA)


def ziln_nll(raw: Tensor, y: Tensor) -> Tensor:
    """Per-row ZILN negative log-likelihood (Wang, Liu & Miao 2019, eq. 2): the classification
    term on ``T > 0`` plus, for ``T > 0``, ``-log`` of the lognormal density at ``T``."""
    logit, mu, sigma = ziln_parts(raw)
    positive = y > 0
    cls = F.binary_cross_entropy_with_logits(logit, positive.to(raw.dtype), reduction="none")
    log_y = torch.log(torch.where(positive, y, torch.ones_like(y)))
    reg = log_y + torch.log(sigma) + _HALF_LOG_2PI + (log_y - mu) ** 2 / (2 * sigma**2)
    return cls + torch.where(positive, reg, torch.zeros_like(reg))


def cumulative_logits(raw: Tensor) -> Tensor:
    """Ordinal head: raw ``(B, K-1)`` -> decreasing cumulative logits ``(B, K-1)``."""
    steps = torch.cat([raw[:, :1], -F.softplus(raw[:, 1:])], dim=1)
    return steps.cumsum(dim=1)


def head_distribution(task: TaskSpec, raw: Tensor) -> Tensor:
    """Ordinal head: probability of each level ``(B, K)`` (levels 1..K)."""
    above = torch.sigmoid(cumulative_logits(raw))  # (B, K-1): P(y > k)
    ones = torch.ones_like(above[:, :1])
    zeros = torch.zeros_like(above[:, :1])
    cdf_above = torch.cat([ones, above, zeros], dim=1)  # P(y > k) for k = 0..K
    return (cdf_above[:, :-1] - cdf_above[:, 1:]).clamp_min(0.0)


def head_loss(
    task: TaskSpec, raw: Tensor, label: Tensor, mask: Tensor, weight: Tensor | None = None
) -> Tensor:
    """Mean loss of one head over the rows where ``mask`` holds.

    Args:
        raw: head output: ``(B,)``, or ``(B, K-1)`` for an ordinal head.
        label: ``(B,)`` in label units (already scaled); arbitrary where ``mask`` is false.
        mask: ``(B,)`` bool, the rows that count for this task.
        weight: optional ``(B,)`` row weights (``TaskSpec.weight_column``).

    Returns:
        A scalar attached to the graph; exactly 0 (still attached) when no row counts, so a batch
        without ratings contributes nothing instead of NaN.
    """
    if not bool(mask.any()):
        return raw.sum() * 0.0
    r, y = raw[mask], label[mask]
    w = None if weight is None else weight[mask]
    if task.loss == "bce":
        per = F.binary_cross_entropy_with_logits(r, y, reduction="none")
    elif task.loss == "mse":
        per = (r - y) ** 2
    elif task.loss == "mse_log1p":
        per = (r - torch.log1p(y.clamp_min(0))) ** 2
    elif task.loss == "huber_log1p":
        per = F.huber_loss(r, torch.log1p(y.clamp_min(0)), reduction="none")
    elif task.loss == "weighted_logistic":
        positive = (y > 0).to(r.dtype)
        wl = torch.where(y > 0, y, torch.ones_like(y))
        per = F.binary_cross_entropy_with_logits(r, positive, reduction="none")
        w = wl if w is None else w * wl
    elif task.loss == "ziln":
        per = ziln_nll(r, y)
    elif task.loss == "ordinal":
        k = int(task.levels or 2)
        level = y.round().clamp(1, k).long() - 1  # 0..K-1
        probs = head_distribution(task, r)  # (n, K)
        per = -torch.log(probs.gather(1, level[:, None]).squeeze(1).clamp_min(1e-7))
    else:
        raise ValueError(f"unknown loss {task.loss!r}")
    if w is None:
        return per.mean()
    return (per * w).sum() / w.sum().clamp_min(1e-12)


def head_prediction(task: TaskSpec, raw: Tensor) -> Tensor:
    """The served prediction ``(B,)``: a probability for binary heads, label units otherwise."""
    if task.loss == "bce":
        out = torch.sigmoid(raw)
    elif task.loss in ("mse_log1p", "huber_log1p"):
        out = torch.expm1(raw.clamp(min=0.0, max=_MAX_LOG_ODDS))
    elif task.loss == "weighted_logistic":
        out = torch.exp(raw.clamp(max=_MAX_LOG_ODDS))
    elif task.loss == "ziln":
        logit, mu, sigma = ziln_parts(raw)
        out = torch.sigmoid(logit) * torch.exp((mu + sigma**2 / 2).clamp(max=_MAX_LOG_ODDS))
    elif task.loss == "ordinal":
        out = 1.0 + torch.sigmoid(cumulative_logits(raw)).sum(dim=1)
    else:
        out = raw
    if task.value_range is not None:
        out = out.clamp(task.value_range[0], task.value_range[1])
    return out


class HeadStats:
    """Streaming label statistics for one task, in the head's raw space, to start it there."""

    def __init__(self, task: TaskSpec) -> None:
        self.task = task
        self.n = 0
        self.total = 0.0
        self.positive_sum = 0.0  # weighted logistic: sum of positive labels
        self.negatives = 0
        self.log_sum = 0.0  # ziln: sums of log(T) and log(T)^2 over positive labels
        self.log_sq_sum = 0.0
        self.positives = 0
        k = task.levels or 1
        self.hist = [0] * k

    def add(self, y: torch.Tensor | list[float] | object) -> None:
        import numpy as np

        y = np.asarray(y, dtype=np.float64)
        t = self.task
        self.n += y.size
        if t.loss in ("mse_log1p", "huber_log1p"):
            self.total += float(np.log1p(np.maximum(y, 0)).sum())
        else:
            self.total += float(y.sum())
        if t.loss == "weighted_logistic":
            self.positive_sum += float(y[y > 0].sum())
            self.negatives += int((y <= 0).sum())
        if t.loss == "ziln":
            logs = np.log(y[y > 0])
            self.positives += int(logs.size)
            self.log_sum += float(logs.sum())
            self.log_sq_sum += float((logs**2).sum())
        if t.loss == "ordinal":
            idx = np.clip(np.round(y), 1, len(self.hist)).astype(int) - 1
            for i, c in enumerate(np.bincount(idx, minlength=len(self.hist))):
                self.hist[i] += int(c)

    def bias(self) -> list[float]:
        """Output-layer bias that makes the head predict the training base value."""
        t = self.task
        if self.n == 0:
            return [0.0] * output_dim(t)
        mean = self.total / self.n
        if t.loss == "bce":
            p = min(max(mean, 1e-4), 1 - 1e-4)
            return [math.log(p / (1 - p))]
        if t.loss == "weighted_logistic":
            return [math.log(max(self.positive_sum, 1e-6) / max(self.negatives, 1))]
        if t.loss == "ziln":
            # The maximum-likelihood start: the positive rate, and the mean and std of log(T).
            k = self.positives
            p = min(max(k / self.n, 1e-4), 1 - 1e-4)
            mu = self.log_sum / k if k else 0.0
            var = self.log_sq_sum / k - mu**2 if k else 1.0
            sigma = max(math.sqrt(max(var, 0.0)), 0.05)
            return [math.log(p / (1 - p)), mu, math.log(math.expm1(sigma))]
        if t.loss == "ordinal":
            total = sum(self.hist)
            above = [sum(self.hist[k + 1 :]) / total for k in range(len(self.hist) - 1)]
            logits = [
                math.log(min(max(a, 1e-4), 1 - 1e-4) / (1 - min(max(a, 1e-4), 1 - 1e-4)))
                for a in above
            ]
            out = [logits[0]]
            for prev, cur in zip(logits[:-1], logits[1:], strict=True):
                gap = max(prev - cur, 1e-3)
                out.append(math.log(math.expm1(gap)))  # inverse softplus
            return out
        return [mean]


@torch.no_grad()
def init_head(last: nn.Module, bias: list[float]) -> None:
    """Sets a head's output-layer bias (so early steps learn structure, not the offset)."""
    if not isinstance(last, nn.Linear) or last.out_features != len(bias):
        raise ValueError(f"cannot set a bias of {len(bias)} values on {last}")
    last.bias.copy_(torch.tensor(bias, dtype=last.bias.dtype))
