"""Relative paths in a config file resolve against the file's folder, ``--set`` paths against
the working directory; artifacts then evaluate from any folder and a moved run folder resumes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ranker.config import load_config
from tests.conftest import DEFAULT_CONFIG, ROOT

SMALL = [
    "model.num_experts=2",
    "model.expert_hidden=[16]",
    "model.tower_hidden=[8]",
    "model.embedding_dim=4",
    "training.epochs=1",
    "training.batch_size=256",
    "training.shuffle_buffer=2048",
    "training.threads=1",
]


def ranker(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ranker", *args], cwd=cwd, capture_output=True, text=True
    )


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture
def project(tiny_world: Path, tmp_path: Path) -> Path:
    """``tmp/world`` and ``tmp/configs/c.toml`` naming it as ``../world/...``, like the shipped
    configs name ``../data/default``."""
    shutil.copytree(tiny_world, tmp_path / "world", ignore=shutil.ignore_patterns("truth*"))
    text = DEFAULT_CONFIG.read_text()
    for key, value in (
        ("log", "../world/log"),
        ("users", "../world/users.parquet"),
        ("videos", "../world/videos.parquet"),
        ("run_dir", "../runs/default"),
        ("artifact_root", "../artifacts"),
    ):
        text, n = re.subn(rf'^{key} = ".*"$', f'{key} = "{value}"', text, flags=re.M)
        assert n == 1, key
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "c.toml").write_text(text)
    (tmp_path / "elsewhere").mkdir()
    return tmp_path


def test_shipped_config_paths_are_relative_to_configs() -> None:
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.data.log == ROOT / "data" / "default" / "log"
    assert cfg.training.run_dir == ROOT / "runs" / "default"
    assert cfg.export.artifact_root == ROOT / "artifacts"


def test_train_from_another_folder_then_evaluate_from_a_third(project: Path) -> None:
    r = ranker(
        ROOT, "train", "--quiet", "--config", str(project / "configs" / "c.toml"), *sets(SMALL)
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (version,) = (project / "artifacts" / "default").iterdir()  # ../artifacts of configs/
    assert (project / "runs" / "default" / "checkpoint.pt").is_file()
    e = ranker(project / "elsewhere", "evaluate", "--quiet", "--artifact", str(version))
    assert e.returncode == 0, e.stderr[-3000:]


def test_a_moved_run_folder_resumes(project: Path) -> None:
    cfg = str(project / "configs" / "c.toml")
    cwd = project / "elsewhere"
    first = [*SMALL, 'training.run_dir="run"']  # relative to the working directory
    r = ranker(cwd, "train", "--quiet", "--no-export", "--config", cfg, *sets(first))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (cwd / "run" / "checkpoint.pt").is_file()
    shutil.move(cwd / "run", project / "moved")

    again = [*SMALL, f'training.run_dir="{project / "moved"}"', "training.epochs=2"]
    r = ranker(cwd, "train", "--quiet", "--no-export", "--resume", "--config", cfg, *sets(again))
    assert r.returncode == 0, r.stderr[-3000:]
    state = torch.load(project / "moved" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 3 and state["batches_done"] == 0
