"""Two CPU processes under torchrun (gloo): ranks end with identical parameters and the
exported artifact serves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ranker.artifact import load_artifact
from ranker.features import Encoded
from ranker.predictor import Predictor
from tests.conftest import ROOT, tiny_overrides

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("weighting", ["equal", "pcgrad"])
def test_two_processes_train_identical_parameters(
    tiny_world: Path, tmp_path: Path, weighting: str
) -> None:
    sets = [*tiny_overrides(tiny_world, tmp_path), "training.threads=1", "training.epochs=2"]
    sets.append(f'weighting={{name="{weighting}"}}')
    args = [a for o in sets for a in ("--set", o)]
    r = subprocess.run(
        [sys.executable, "-m", "ranker", "train", "--nproc", "2", "--quiet", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    run = tmp_path / "run"
    digests = [(run / f"params-rank{i}.sha256").read_text() for i in (0, 1)]
    assert digests[0] == digests[1]
    artifact = next(
        line.split(": ", 1)[1] for line in r.stdout.splitlines() if "artifact: " in line
    )
    a = load_artifact(Path(artifact))
    rows = Encoded(
        np.zeros((3, len(a.encoder.cardinalities)), np.int64),
        np.zeros((3, len(a.encoder.numeric)), np.float32),
    )
    preds = Predictor(a.model, a.config.tasks).predict(rows)
    assert all(np.isfinite(v).all() for v in preds.values())
    assert a.manifest["metrics"]["validation"]["click"]["auc"] > 0.55
