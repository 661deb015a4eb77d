"""A damaged checkpoint stops ``ranker train --resume`` and ``ranker export`` with one line
naming the file, instead of resuming from different weights."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, tiny_overrides
from training.checkpoint import DIGEST_KEY, state_digest


def ranker(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ranker", *args], cwd=cwd, capture_output=True, text=True
    )


def zero_inside_largest_tensor(path: Path, n: int = 64) -> None:
    """Zeroes ``n`` bytes in the middle of the largest stored tensor: the zip and pickle
    structure stay intact, so ``torch.load`` still succeeds and only the values change."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        assert info.compress_type == zipfile.ZIP_STORED and info.file_size >= 4 * n
    raw = bytearray(path.read_bytes())
    # local header: 30 bytes + name + extra (the extra field pads tensor data for alignment)
    name_len = int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    assert any(raw[start : start + n])
    raw[start : start + n] = bytes(n)
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def trained_run(
    tiny_world: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[str], Path]:
    tmp = tmp_path_factory.mktemp("ckpt")
    sets = [a for o in tiny_overrides(tiny_world, tmp) for a in ("--set", o)]
    r = ranker("train", "--quiet", "--no-export", *sets, "--set", "training.epochs=1")
    assert r.returncode == 0, r.stderr[-2000:]
    return sets, tmp / "run" / "checkpoint.pt"


def test_digest_covers_values_types_and_shapes() -> None:
    base = {"a": torch.arange(6, dtype=torch.float32), "b": "x", "c": [1, 23]}
    d = state_digest(base)
    assert d == state_digest({**base, DIGEST_KEY: "anything"})
    for changed in (
        {**base, "a": torch.arange(6, dtype=torch.float32).reshape(2, 3)},
        {**base, "a": torch.arange(6, dtype=torch.float32).view(torch.int32)},
        {**base, "c": [12, 3]},
        {**base, "b": "y"},
    ):
        assert state_digest(changed) != d


def test_resume_and_export_refuse_a_damaged_checkpoint(
    trained_run: tuple[list[str], Path],
) -> None:
    sets, ckpt = trained_run
    zero_inside_largest_tensor(ckpt)
    torch.load(ckpt, weights_only=True)  # still loads: only a checksum can tell

    r = ranker(
        "train",
        "--quiet",
        "--no-export",
        "--resume",
        *sets,
        "--set",
        "training.epochs=2",
    )
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(ckpt) in lines[0]
    assert "damaged" in lines[0]

    x = ranker("export", "--checkpoint", str(ckpt), "--root", str(ckpt.parent / "artifacts"))
    assert x.returncode == 2, x.stderr[-2000:]
    lines = x.stderr.strip().splitlines()
    assert len(lines) == 1 and str(ckpt) in lines[0] and "damaged" in lines[0]
    assert not (ckpt.parent / "artifacts").exists()
