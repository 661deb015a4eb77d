"""Tests for Aligned-MTL (Senushkin et al., CVPR 2023)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor

from ranker.weighting.aligned_mtl import AlignedMtl, AlignedMtlConfig, alignment_matrix
from tests.ranker.weighting.toy import (
    assert_zero_gradient_task_is_left_out,
    build_from_raw,
    sweep_grads,
    train_a_few_steps,
)

torch.set_num_threads(1)

TASKS = ["click", "watch_time", "like"]


def random_grads(t: int, seed: int, n: int = 9) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, t, dtype=torch.float64)[:, None]
    return scales * torch.randn(t, n, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("t", [2, 3, 4])
@pytest.mark.parametrize("seed", range(5))
def test_aligned_matrix_has_condition_number_one(t: int, seed: int) -> None:
    g = random_grads(t, seed)
    sv = torch.linalg.svdvals(g)
    assert float(sv.max() / sv.min()) > 2  # the input is badly conditioned
    aligned = alignment_matrix(g) @ g
    sv_aligned = torch.linalg.svdvals(aligned)
    torch.testing.assert_close(sv_aligned, sv.min().expand(t), rtol=1e-9, atol=0)
    # Equivalently: aligned gradients are orthogonal with equal norms.
    torch.testing.assert_close(
        aligned @ aligned.T, sv.min() ** 2 * torch.eye(t, dtype=torch.float64), rtol=0, atol=1e-9
    )


def test_aligned_gram_is_a_multiple_of_the_identity_on_a_sweep() -> None:
    """:func:`sweep_grads`: 288 ill-conditioned, conflicting, near-stationary and rank-deficient
    cases. On the ``T x T`` solve, ``B M B`` (the aligned gradients' Gram matrix, ``M = G G^T``)
    must be ``sigma_min^2`` times the projector on the kept eigenvectors, to the rounding of an
    eigendecomposition of ``M`` (``16 T eps lambda_max``; a float64 Gram, so ``eps`` = 2^-52);
    the direction is ``(B w) @ G``."""
    failed = []
    cases = sweep_grads()
    for label, g in cases:
        t = g.shape[0]
        gram = g @ g.T
        b = alignment_matrix(g)
        lam, vec = torch.linalg.eigh(gram)
        keep = lam > float(lam.max()) * t * 2.0**-52
        target = lam[keep].min()
        expected = target * vec[:, keep] @ vec[:, keep].T
        err = float((b @ gram @ b - expected).abs().max())
        d, w = AlignedMtl([f"task{i}" for i in range(t)], AlignedMtlConfig()).combine(
            g, torch.ones(t)
        )
        if err > 16 * t * 2.0**-52 * float(lam.max()):
            failed.append(
                f"{label}: |B M B - s^2 P| = {err:.1e}, lambda_max {float(lam.max()):.1e}"
            )
        elif not torch.allclose(w, b.sum(1)) or not torch.allclose(d, w @ g):
            failed.append(f"{label}: direction is not (B 1) @ g")
    assert not failed, f"{len(failed)} of {len(cases)} cases: " + "; ".join(failed[:10])


@pytest.mark.parametrize(("scale", "pick"), [("median", "median"), ("rmse", "rmse")])
def test_other_scales_pick_the_common_singular_value(scale: str, pick: str) -> None:
    g = random_grads(4, 0)
    lam = torch.linalg.svdvals(g) ** 2
    target = lam.median() if pick == "median" else lam.mean()
    sv = torch.linalg.svdvals(alignment_matrix(g, scale) @ g)
    torch.testing.assert_close(sv, target.sqrt().expand(4), rtol=1e-9, atol=0)


def test_rank_deficient_gradients_are_aligned_on_their_span() -> None:
    g = random_grads(3, 1)
    g[2] = 2 * g[0] - g[1]  # rank 2
    sv = torch.linalg.svdvals(alignment_matrix(g.float()).float() @ g.float())
    torch.testing.assert_close(sv[:2], sv[0].expand(2), rtol=1e-4, atol=0)
    assert float(sv[2]) < 1e-4 * float(sv[0])


def test_direction_is_the_pre_weighted_sum_of_aligned_gradients() -> None:
    g = random_grads(3, 2)
    b = alignment_matrix(g)
    d, w = AlignedMtl(TASKS, AlignedMtlConfig()).combine(g, torch.ones(3))
    torch.testing.assert_close(d, (b @ g).sum(0))
    torch.testing.assert_close(d, w @ g)
    pre = {"click": 1.0, "watch_time": 0.5, "like": 2.0}
    d, w = AlignedMtl(TASKS, AlignedMtlConfig(task_weights=pre)).combine(g, torch.ones(3))
    torch.testing.assert_close(d, torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64) @ (b @ g))
    # All-zero gradients: nothing to align, zero update.
    d, w = AlignedMtl(TASKS, AlignedMtlConfig()).combine(torch.zeros(3, 4), torch.ones(3))
    assert torch.equal(d, torch.zeros(4)) and torch.isfinite(w).all()


def test_task_weights_must_name_every_task() -> None:
    with pytest.raises(ValueError, match="missing \\['like'\\]"):
        AlignedMtl(TASKS, AlignedMtlConfig(task_weights={"click": 1.0, "watch_time": 1.0}))


def test_a_task_without_labels_in_the_batch_is_left_out() -> None:
    assert_zero_gradient_task_is_left_out(
        lambda tasks: AlignedMtl(tasks, AlignedMtlConfig()), TASKS
    )


# --- integration -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["representation", "parameters"])
def test_integration_tiny_model(mode: str) -> None:
    weighting = build_from_raw({"name": "aligned_mtl", "mode": mode}, TASKS)
    assert isinstance(weighting, AlignedMtl)
    train_a_few_steps(weighting, TASKS)


@pytest.mark.parametrize(
    ("field", "value"),
    [("scale", "max"), ("task_weights", {"click": -1.0}), ("task_weights", {"a": math.nan})],
)
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        AlignedMtlConfig(**{field: value})
    assert field in str(info.value)
