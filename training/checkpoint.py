"""Training checkpoints: what ``ranker train`` writes every ``checkpoint_every_steps`` steps and
at every epoch end, and what ``--resume`` and ``ranker export`` read back.

One file, ``run_dir/checkpoint.pt`` (``torch.save`` of plain tensors, strings and numbers: it
loads with ``weights_only=True``, no pickled code). It carries a SHA-256 of its own contents
(:func:`state_digest`, under ``"sha256"``): a damaged file can still unpickle into plausible
weights (64 zeroed bytes inside a weight tensor load without complaint), and resuming or
exporting from it would silently continue from a different model. The digest is over the loaded
values, not the file bytes, so it lives inside the one file and the write stays a single atomic
rename; the artifact's per-file checksums (``ranker/artifact.py``) guard the other end.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from ranker.config import Config
from ranker.errors import TrainingError

DIGEST_KEY = "sha256"


def _feed(h: Any, value: Any) -> None:
    """Hashes ``value`` with its type and shape, so that no two different states collide by
    concatenation (``[1, 23]`` vs ``[12, 3]``, a float32 vs an int32 tensor of equal bytes)."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        h.update(f"D{len(value)}:".encode())
        for k in sorted(value, key=repr):
            h.update(repr(k).encode() + b"=")
            _feed(h, value[k])
    elif isinstance(value, list | tuple):
        h.update(f"L{len(value)}:".encode())
        for v in value:
            _feed(h, v)
    else:  # str, int, float, bool, None: repr is exact (floats round-trip)
        h.update(f"{type(value).__name__}:{value!r};".encode())


def state_digest(state: dict[str, Any]) -> str:
    """SHA-256 over every value of a checkpoint except the digest itself."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != DIGEST_KEY})
    return h.hexdigest()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Writes beside the target and renames, so a kill mid-write leaves the previous one."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({**state, DIGEST_KEY: state_digest(state)}, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Reads a checkpoint and verifies its checksum; raises :class:`TrainingError` in one line
    naming the file when it is missing, unreadable, from an older version or damaged."""
    if not path.is_file():
        raise TrainingError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decode failure means an unusable file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainingError(f"checkpoint {path} is unreadable: {reason}") from None
    if not isinstance(state, dict) or "batches_done" not in state or DIGEST_KEY not in state:
        raise TrainingError(f"checkpoint {path} was written by an older version (no checksum)")
    if state_digest(state) != state[DIGEST_KEY]:
        raise TrainingError(
            f"checkpoint {path} is damaged: its contents do not match the checksum written "
            "with it; resume from an older copy or train again"
        )
    return state


def load_checkpoint(path: Path, config: Config) -> dict[str, Any]:
    """Reads a checkpoint for ``--resume`` and checks it belongs to this config."""
    try:
        state = read_checkpoint(path)
    except TrainingError as e:
        raise TrainingError(f"cannot resume: {e}") from None
    saved = Config.model_validate_json(state["config"])
    differ = [
        k
        for k in ("data", "features", "tasks", "model", "weighting", "position")
        if getattr(saved, k) != getattr(config, k)
    ]
    # epochs may grow; run_dir is where the run lives now, not what it trains (a run folder
    # that was moved resumes with --set training.run_dir=<its new place>)
    free = {"epochs": 0, "run_dir": Path()}
    if differ or saved.training.model_copy(update=free) != config.training.model_copy(update=free):
        raise TrainingError(
            f"cannot resume: the config differs from the checkpoint's in {differ or ['training']}"
            " (only training.epochs and training.run_dir may change)"
        )
    return state
