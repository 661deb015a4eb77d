"""Data-parallel training with torch.distributed: one process per rank, launched by torchrun.

The same code runs one process on a laptop and N on a cluster (``torchrun --nproc-per-node N
-m ranker train ...``, or the ``ranker train --nproc N`` shortcut). gloo on CPU, NCCL on GPU.

Gradients are averaged across ranks after the task-weighting strategy has produced them, rather
than inside DistributedDataParallel's backward hooks: gradient-based strategies (MGDA, PCGrad,
Nash-MTL, ...) take per-task gradients with ``torch.autograd.grad`` and then set or correct the
shared gradients themselves, which DDP's hooks would either miss or average too early. One
flattened all-reduce per step after the strategy is what DDP does, minus the overlap with the
backward pass, and it keeps every strategy correct.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str) -> Dist:
        """Joins the process group torchrun describes in the environment (or runs alone)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            dist.init_process_group(backend=backend)
        return cls(dist.get_rank(), dist.get_world_size())

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (the fitted encoder, fitted once)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_parameters(self, modules: Iterable[nn.Module]) -> None:
        """Every rank starts from rank 0's weights."""
        if not self.enabled:
            return
        for m in modules:
            for t in m.state_dict().values():
                dist.broadcast(t, src=0)

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        """Mean gradient over ranks, one flattened all-reduce (missing grads count as zero)."""
        if not self.enabled or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def min_int(self, value: int) -> int:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def mean_dict(self, values: dict[str, float]) -> dict[str, float]:
        if not self.enabled:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist(), strict=True)}

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def parameter_digest(module: nn.Module) -> str:
    """sha256 over every weight, to show all ranks hold identical parameters."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def shard_files(files: list[str], d: Dist) -> list[str] | None:
    """This rank's files, when there are at least as many files as ranks; else None (the ranks
    then stride over the record batches of all files)."""
    if not d.enabled or len(files) < d.world:
        return None
    return files[d.rank :: d.world]
