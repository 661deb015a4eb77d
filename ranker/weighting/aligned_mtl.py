"""Aligned-MTL: independent component alignment of the task gradients.

Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment for Multi-Task
Learning", CVPR 2023 (https://arxiv.org/abs/2305.19000; official code
https://github.com/SamsungLabs/MTL).

Conflicts and dominance show up as a badly conditioned gradient matrix ``G (T, N)``. Aligned-MTL
replaces it by the closest (Procrustes) matrix with condition number 1: with the eigen-
decomposition ``G G^T = V diag(lambda) V^T`` and ``sigma = sqrt(lambda)`` (the singular values of
``G``),

    B = sigma_min * V diag(1 / sigma) V^T,    G_aligned = B G,

so ``G_aligned G_aligned^T = sigma_min^2 V V^T``: all singular values equal ``sigma_min``, and the
aligned gradients are orthogonal with equal norms. The update is ``w^T G_aligned`` for the
pre-defined task weights ``w`` (the paper's Algorithm 1; all 1 by default, i.e. the sum), so the
effective per-task weights are ``B w`` (returned). As in the official code, eigenvalues at or below
``lambda_max * T * eps`` (``eps`` of the gradients' dtype) are treated as zero: a rank-deficient
``G`` is aligned on its span (all *non-zero* singular values equal). ``scale`` picks the common
singular value: ``min`` (the paper), ``median`` or ``rmse`` (official code options; ``rmse`` is
``sqrt(mean(lambda))``). The ``representation`` mode is the paper's Aligned-MTL-UB.

A task whose gradient is exactly zero this step (no labelled row in the batch: ``head_loss``
returns an attached 0) is left out: it gets weight 0 and the rule runs on the other tasks.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from ranker.weighting.base import (
    GradientConfigBase,
    GradientWeighting,
    combine_rows,
    gram_matrix,
    present_tasks,
    register,
)


class AlignedMtlConfig(GradientConfigBase):
    name: Literal["aligned_mtl"] = "aligned_mtl"
    scale: Literal["min", "median", "rmse"] = Field(
        "min", description="common singular value of the aligned gradients (paper: min)"
    )
    task_weights: dict[str, float] | None = Field(
        None, description="pre-defined weight per task of the aligned gradients (default: all 1)"
    )

    @field_validator("task_weights")
    @classmethod
    def _finite_non_negative(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None:
            bad = {k: x for k, x in v.items() if not 0 <= x < math.inf}
            if bad:
                raise ValueError(f"task weights must be finite and >= 0, got {bad}")
            if not any(x > 0 for x in v.values()):
                raise ValueError("at least one task weight must be > 0")
        return v

    def check_tasks(self, tasks: list[str]) -> None:
        if self.task_weights is None:
            return
        missing = [t for t in tasks if t not in self.task_weights]
        unknown = [k for k in self.task_weights if k not in tasks]
        if missing or unknown:
            raise ValueError(
                f"task_weights: must name every task exactly: missing {missing}, unknown "
                f"{unknown}; tasks are {tasks}"
            )


def alignment_from_gram(gram: Tensor, scale: str = "min", eps: float = 2.0**-52) -> Tensor:
    """The symmetric ``B (T, T)`` (float64) such that ``B G`` has equal singular values, from
    the Gram matrix ``G G^T``; eigenvalues at or below ``lambda_max * T * eps`` count as 0
    (``eps``: that of the gradients' dtype, as in the official code)."""
    gram = gram.to(torch.float64).cpu()
    lam, vec = torch.linalg.eigh(gram)  # ascending
    tol = float(lam.max()) * gram.shape[0] * eps
    keep = lam > tol
    if not bool(keep.any()):
        return torch.zeros_like(gram)
    lam, vec = lam[keep], vec[:, keep]
    if scale == "min":
        target = lam.min()
    elif scale == "median":
        target = lam.median()  # the lower median, as torch.median in the official code
    else:
        target = lam.mean()
    return (vec * (target.sqrt() / lam.sqrt())) @ vec.T


def alignment_matrix(grads: Tensor, scale: str = "min") -> Tensor:
    """The symmetric ``B (T, T)`` (float64) such that ``B @ grads`` has equal singular values."""
    return alignment_from_gram(gram_matrix(grads), scale, torch.finfo(grads.dtype).eps)


@register("aligned_mtl")
class AlignedMtl(GradientWeighting):
    """The (pre-weighted) sum of the task gradients after aligning them to condition number 1."""

    config_class = AlignedMtlConfig
    config: AlignedMtlConfig

    def __init__(self, tasks: list[str], config: AlignedMtlConfig) -> None:
        super().__init__(tasks, config)
        config.check_tasks(self.tasks)
        w = (
            [1.0] * len(self.tasks)
            if config.task_weights is None
            else [config.task_weights[t] for t in self.tasks]
        )
        self.register_buffer("w", torch.tensor(w, dtype=torch.float64))

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        gram = gram_matrix(grads)
        # A task without labelled rows has an exact zero gradient: left out (its row would only
        # add a zero singular value).
        present = present_tasks(gram)
        coef = torch.zeros(grads.shape[0], dtype=torch.float64)
        if bool(present.any()):
            eps = torch.finfo(grads.dtype).eps
            b = alignment_from_gram(gram[present][:, present], self.config.scale, eps)
            coef[present] = b @ self.w.cpu()[present]
        return combine_rows(coef, grads), coef.to(grads)
