"""Training checkpoints: what ``ranker train`` writes every ``checkpoint_every_steps`` steps and
at every epoch end, and what ``--resume`` and ``ranker export`` read back.

One file, ``run_dir/checkpoint.pt`` (``torch.save`` of plain tensors, strings and numbers: it
loads with ``weights_only=True``, no pickled code).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ranker.config import Config
from ranker.errors import TrainingError


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Writes beside the target and renames, so a kill mid-write leaves the previous one."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, config: Config) -> dict[str, Any]:
    """Reads a checkpoint for ``--resume`` and checks it belongs to this config."""
    if not path.is_file():
        raise TrainingError(f"cannot resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decode failure means an unusable file
        raise TrainingError(f"cannot resume: checkpoint {path} is unreadable: {e}") from None
    if "batches_done" not in state:
        raise TrainingError(f"cannot resume: {path} was written by an older version")
    saved = Config.model_validate_json(state["config"])
    differ = [
        k
        for k in ("data", "features", "tasks", "model", "weighting", "position")
        if getattr(saved, k) != getattr(config, k)
    ]
    if differ or saved.training.model_copy(update={"epochs": 0}) != config.training.model_copy(
        update={"epochs": 0}
    ):
        raise TrainingError(
            f"cannot resume: the config differs from the checkpoint's in {differ or ['training']}"
            " (only training.epochs may change)"
        )
    return state
