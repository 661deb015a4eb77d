"""Shared fixtures: a tiny synthetic world, a tiny config, one tiny trained artifact per session.

Tests run on one torch thread: the machine has two cores and tests run beside other processes
(uvicorn, redis-server).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ranker.config import Config, load_config
from training.synth import WorldConfig, generate

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "default.toml"
RANKING_CONFIG = ROOT / "configs" / "ranking.toml"


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate(WorldConfig.small(n_requests=600, rows_per_file=4000), out, progress=False)
    return out


def tiny_overrides(world: Path, tmp: Path) -> list[str]:
    return [
        f'data.log="{world / "log"}"',
        f'data.users="{world / "users.parquet"}"',
        f'data.videos="{world / "videos.parquet"}"',
        "model.num_experts=2",
        "model.expert_hidden=[16]",
        "model.tower_hidden=[8]",
        "model.embedding_dim=4",
        "training.epochs=3",
        "training.lr=0.005",
        "training.batch_size=256",
        "training.shuffle_buffer=2048",
        f'training.run_dir="{tmp / "run"}"',
        f'export.artifact_root="{tmp / "artifacts"}"',
    ]


@pytest.fixture(scope="session")
def tiny_config(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Config:
    tmp = tmp_path_factory.mktemp("train")
    return load_config(DEFAULT_CONFIG, tiny_overrides(tiny_world, tmp))


@pytest.fixture(scope="session")
def tiny_trained(tiny_config: Config):  # noqa: ANN201 - TrainResult
    from training.loop import train

    return train(tiny_config, progress=False, export=True)


@pytest.fixture(scope="session")
def tiny_artifact(tiny_trained) -> Path:  # noqa: ANN001
    assert tiny_trained.artifact is not None
    return tiny_trained.artifact
