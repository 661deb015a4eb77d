"""Cross-stitch networks: one column (tower of hidden layers) per task, mixed after every layer.

Misra, Shrivastava, Gupta and Hebert, "Cross-stitch Networks for Multi-task Learning", CVPR
2016. Instead of choosing by hand which layers tasks share (shared-bottom shares all of them,
separate models none), every task keeps its own column and a *cross-stitch unit* after each
layer ``l`` replaces task ``i``'s activations by a learned linear combination of every task's:
``h~_i = sum_j alpha^l_ij h_j``. ``alpha^l`` is a ``T x T`` matrix learned with the rest; the
paper initialises it near identity with rows that sum to 1 (``alpha_S`` on the diagonal,
``alpha_D`` elsewhere, ``(0.9, 0.1)`` for its two tasks), so the network starts close to
independent columns and learns how much to share, layer by layer. With ``alpha = I`` exactly,
the model *is* ``T`` independent networks over a shared embedding (tested).

Sluice networks (Ruder, Bingel, Augenstein and Søgaard, "Latent Multi-task Architecture
Learning", AAAI 2019) generalise the units: each layer split into subspaces mixed separately,
and the tower reading a learned mix of every layer's output. Only the cross-stitch unit (one
subspace, the tower reads the last layer) is built here.

The columns are :class:`~ranker.modules.ExpertBank` layers (one "expert" per task, one bank per
layer, so every column is initialised like its own ``nn.Linear`` stack and the first layer is
one fused product that serving's user-side split shortens); a unit after every hidden layer,
the last included (as the paper's units follow ``fc7``, the last layer before the task's own
``fc8``); the towers follow.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ranker.modules import ExpertBank, SplitInput


def stitch_init(num_tasks: int, self_weight: float) -> Tensor:
    """``alpha_S`` on the diagonal, ``(1 - alpha_S) / (T - 1)`` elsewhere: rows sum to 1."""
    if num_tasks == 1:
        return torch.ones(1, 1)
    other = (1.0 - self_weight) / (num_tasks - 1)
    return torch.full((num_tasks, num_tasks), other) + (self_weight - other) * torch.eye(num_tasks)


class CrossStitchColumns(nn.Module):
    """``T`` task columns with ``hidden`` layers and a cross-stitch unit after each.

    Args:
        num_tasks: ``T``.
        in_dim: input size (the embeddings).
        hidden: layer sizes of every column.
        dropout: dropout inside the columns.
        self_weight: ``alpha_S`` of every unit at initialisation (1: identity).
    """

    def __init__(
        self, num_tasks: int, in_dim: int, hidden: list[int], dropout: float, self_weight: float
    ) -> None:
        super().__init__()
        if not 0 < self_weight <= 1:
            raise ValueError(
                f"a cross-stitch unit's self weight must be in (0, 1], got {self_weight}"
            )
        dims = [in_dim, *hidden]
        self.layers = nn.ModuleList(
            ExpertBank(num_tasks, a, [b], dropout) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )
        self.units = nn.ParameterList(
            nn.Parameter(stitch_init(num_tasks, self_weight)) for _ in hidden
        )
        self.num_tasks = num_tasks
        self.out_dim = hidden[-1]

    def forward(self, x: Tensor | SplitInput) -> tuple[Tensor, Tensor]:
        """``x (B, In)`` (or split) -> the stitched outputs ``(B, T, H)`` the towers read, and
        the last layer's columns before their unit ``(B, T, H)``: every task's loss reaches all
        of them through the last unit (the model's ``representation``)."""
        h: Tensor | SplitInput = x
        pre = torch.empty(0)
        for layer, alpha in zip(self.layers, self.units, strict=True):
            pre = layer(h)  # (B, T, H_l): column j's layer on its own (stitched) input
            h = torch.matmul(alpha, pre)  # (T, T) @ (B, T, H_l): h~_i = sum_j alpha_ij h_j
        assert isinstance(h, Tensor)
        return h, pre

    def shared_parameters(self) -> list[nn.Parameter]:
        """What every task's loss reaches: every column (through the units' off-diagonal
        weights) and every unit but the last, whose row ``i`` only task ``i`` reads (a per-task
        parameter, like per-task gates)."""
        return [*self.layers.parameters(), *list(self.units)[:-1]]

    def flops_per_row(self) -> int:
        t = self.num_tasks
        total = sum(layer.flops_per_row() for layer in self.layers)
        return total + sum(2 * t * t * layer.out_dim for layer in self.layers)
