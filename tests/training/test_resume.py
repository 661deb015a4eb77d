"""A trainer killed with SIGKILL mid-epoch resumes from its checkpoint and ends where an
uninterrupted run with the same seed ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ranker.config import load_config
from ranker.errors import TrainingError
from tests.conftest import DEFAULT_CONFIG, ROOT, tiny_overrides
from training.loop import train

pytestmark = pytest.mark.slow

# A model big enough that steps take milliseconds, so the kill lands mid-epoch.
SIZE = [
    "model.expert_hidden=[256, 128]",
    "model.num_experts=4",
    "training.epochs=2",
    "training.threads=1",
    "training.checkpoint_every_steps=4",
]


def overrides(world: Path, tmp: Path) -> list[str]:
    return [*tiny_overrides(world, tmp), *SIZE]


def cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "ranker", "train", "--quiet", "--no-export", *args]


def final_metrics(run_dir: Path) -> dict:
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 3 and state["batches_done"] == 0  # both epochs done
    return json.loads(state["metrics"])["validation"]


def test_resume_after_kill_matches_an_uninterrupted_run(tiny_world: Path, tmp_path: Path) -> None:
    ref_cfg = load_config(DEFAULT_CONFIG, overrides(tiny_world, tmp_path / "ref"))
    train(ref_cfg, progress=False, export=False)
    # The last checkpoint's metrics on both sides: the returned ones may be another epoch's
    # (best-epoch selection) or recomputed after the mean calibration.
    reference = final_metrics(tmp_path / "ref" / "run")

    run = tmp_path / "killed"
    args = [a for o in overrides(tiny_world, run) for a in ("--set", o)]
    proc = subprocess.Popen(cli(args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = run / "run" / "checkpoint.pt"
    killed_at = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.exists():
            try:
                state = torch.load(ckpt, weights_only=True)
            except Exception:  # noqa: BLE001 - being replaced right now; look again
                continue
            if state["epoch"] == 1 and state["batches_done"] > 0:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = (state["epoch"], state["batches_done"])
                break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert killed_at is not None, "the run ended before a mid-epoch checkpoint could be caught"
    assert proc.returncode == -signal.SIGKILL

    resumed = subprocess.run(cli([*args, "--resume"]), cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = final_metrics(run / "run")
    for head in ("click", "like"):
        assert got[head]["auc"] == pytest.approx(reference[head]["auc"], abs=1e-6), head
    for head in ("watch_time", "rating"):
        assert got[head]["rmse"] == pytest.approx(reference[head]["rmse"], rel=1e-5), head


def test_resume_refuses_a_different_config(tiny_world: Path, tmp_path: Path) -> None:
    cfg = load_config(DEFAULT_CONFIG, [*tiny_overrides(tiny_world, tmp_path), "training.epochs=1"])
    train(cfg, progress=False, export=False)
    other = load_config(
        DEFAULT_CONFIG, [*tiny_overrides(tiny_world, tmp_path), "model.num_experts=3"]
    )
    with pytest.raises(TrainingError, match=r"differs from the checkpoint's in \['model'\]"):
        train(other, progress=False, export=False, resume=True)


def test_resume_without_checkpoint_says_so(tiny_world: Path, tmp_path: Path) -> None:
    cfg = load_config(DEFAULT_CONFIG, tiny_overrides(tiny_world, tmp_path))
    with pytest.raises(TrainingError, match="no checkpoint"):
        train(cfg, progress=False, resume=True)
