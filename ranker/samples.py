"""Sample ranking requests stored in the artifact: what the service times its engines on and
checks their accuracy on, on the machine it lands on.

An engine's speed depends on the CPU (bf16 goes to AMX where there is AMX, int8 to VNNI) and its
accuracy on the trained weights and on real inputs: random codes give random embeddings, whose
scores differ from a real request's in both spread and ties. So the exporter stores a few real
requests, encoded exactly as the service encodes them (one user and one context, broadcast to
``M`` candidate videos), and the service replays them at start-up (:mod:`ranker.autoselect`).

Stored as ``samples.safetensors`` (``cat (R, M, C)`` int64, ``num (R, M, N)`` float32): tensors
only, no pickle, checksummed in the manifest like the other files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ranker.features import Encoded

SAMPLES_FILE = "samples.safetensors"


@dataclass
class SampleRequests:
    """``R`` ranking requests of ``M`` candidates each, encoded as the model's input."""

    cat: np.ndarray  # (R, M, C) int64
    num: np.ndarray  # (R, M, N) float32

    def __post_init__(self) -> None:
        if self.cat.ndim != 3 or self.num.ndim != 3 or self.cat.shape[:2] != self.num.shape[:2]:
            raise ValueError(
                f"sample requests need cat (R, M, C) and num (R, M, N); got {self.cat.shape} "
                f"and {self.num.shape}"
            )

    def __len__(self) -> int:
        return self.cat.shape[0]

    def __repr__(self) -> str:
        return f"SampleRequests({len(self)} requests x {self.candidates} candidates)"

    @property
    def candidates(self) -> int:
        return self.cat.shape[1]

    def request(self, i: int) -> Encoded:
        """Request ``i``'s rows ``(M, ...)``, contiguous, as the service hands them over."""
        return Encoded(np.ascontiguousarray(self.cat[i]), np.ascontiguousarray(self.num[i]))

    def save(self, path: Path) -> None:
        save_file(
            {"cat": torch.from_numpy(self.cat.astype(np.int64)), "num": torch.from_numpy(self.num)},
            str(path),
        )

    @classmethod
    def load(cls, path: Path) -> SampleRequests:
        t = load_file(str(path))
        return cls(t["cat"].numpy(), t["num"].numpy().astype(np.float32, copy=False))

    @classmethod
    def stack(cls, requests: list[Encoded]) -> SampleRequests:
        """Requests of equal size, stacked."""
        return cls(np.stack([r.cat for r in requests]), np.stack([r.num for r in requests]))
