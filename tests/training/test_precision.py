"""``training.precision``: bf16 autocast for the forward pass, fp32 weights, losses and
optimizer (``training/loop.py``); ``auto`` turns it on only where the CPU has AMX."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ranker.artifact import load_artifact
from ranker.config import load_config
from ranker.cpu import CpuFeatures
from tests.conftest import DEFAULT_CONFIG, tiny_overrides
from training.loop import train, training_precision

AMX = CpuFeatures(frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8"}))
ZEN4 = CpuFeatures(frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}))
AVX2 = CpuFeatures(frozenset({"avx2"}))


@pytest.mark.parametrize(
    ("precision", "device", "features", "resolved"),
    [
        ("auto", "cpu", AMX, "bf16"),
        ("auto", "cpu", ZEN4, "fp32"),  # bf16 dot products, no matrix units: small gain
        ("auto", "cpu", AVX2, "fp32"),  # emulated: slower
        ("auto", "cuda", AMX, "fp32"),
        ("bf16", "cpu", AVX2, "bf16"),  # named: as named
        ("fp32", "cpu", AMX, "fp32"),
    ],
)
def test_precision_resolves_by_cpu(
    tiny_world: Path,
    tmp_path: Path,
    precision: str,
    device: str,
    features: CpuFeatures,
    resolved: str,
) -> None:
    cfg = load_config(
        DEFAULT_CONFIG,
        [
            *tiny_overrides(tiny_world, tmp_path),
            f'training.precision="{precision}"',
            f'training.device="{device}"',
        ],
    )
    assert training_precision(cfg, features) == resolved


def test_bf16_training_keeps_fp32_weights_and_learns_as_fp32_does(
    tiny_world: Path, tmp_path: Path
) -> None:
    """Same seed, same data, one epoch each: bf16 autocast changes the trajectory (so it is
    really on), keeps the master weights and the exported artifact in fp32, and validates
    within a few AUC points of fp32 on the tiny world (the 3-seed comparison on the demo world
    and KuaiRand is in docs/performance.md)."""
    results = {}
    for precision in ("fp32", "bf16"):
        cfg = load_config(
            DEFAULT_CONFIG,
            [
                *tiny_overrides(tiny_world, tmp_path / precision),
                "training.epochs=1",
                f'training.precision="{precision}"',
            ],
        )
        results[precision] = train(cfg, progress=False, export=precision == "bf16")
    fp32, bf16 = results["fp32"], results["bf16"]
    assert fp32.precision == "fp32" and bf16.precision == "bf16"
    assert {p.dtype for p in bf16.model.parameters()} == {torch.float32}
    moved = [
        not torch.equal(a, b)
        for a, b in zip(fp32.model.parameters(), bf16.model.parameters(), strict=True)
    ]
    assert any(moved), "bf16 autocast left every weight as fp32 training did"
    for task in ("click", "like"):
        assert bf16.metrics[task]["auc"] == pytest.approx(fp32.metrics[task]["auc"], abs=0.03)
    assert bf16.metrics["click"]["auc"] > 0.55  # one epoch on the tiny world: above chance
    art = load_artifact(bf16.artifact)
    assert {p.dtype for p in art.model.parameters()} == {torch.float32}
    manifest = json.loads((bf16.artifact / "manifest.json").read_text())
    assert manifest["metrics"]["precision"] == "bf16"
