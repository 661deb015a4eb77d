"""Building blocks of the ranking models: embeddings, MLPs and a fused bank of expert MLPs."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def mlp(in_dim: int, hidden: list[int], out_dim: int | None, dropout: float = 0.0) -> nn.Sequential:
    """ReLU MLP; ``out_dim=None`` ends with the last hidden layer's activation."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        d = h
    if out_dim is not None:
        layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


class FeatureEmbedding(nn.Module):
    """One table for all categorical features (offsets select each feature's rows), so the
    lookup is a single gather; numerics are appended as they are (already standardised)."""

    def __init__(self, cardinalities: list[int], num_numeric: int, dim: int) -> None:
        super().__init__()
        if any(c < 1 for c in cardinalities):
            raise ValueError(f"every cardinality must be >= 1, got {cardinalities}")
        self.num_cat = len(cardinalities)
        self.num_numeric = num_numeric
        self.dim = dim
        offsets = torch.tensor([0, *cardinalities[:-1]], dtype=torch.long).cumsum(0)
        self.register_buffer("offsets", offsets[: len(cardinalities)], persistent=False)
        self.table = nn.Embedding(max(sum(cardinalities), 1), dim)
        nn.init.normal_(self.table.weight, std=0.05)

    @property
    def out_dim(self) -> int:
        return self.num_cat * self.dim + self.num_numeric

    def forward(self, cat: Tensor, num: Tensor) -> Tensor:
        """``cat (B, C)`` int64, ``num (B, N)`` float -> ``(B, C*D + N)``."""
        parts = [num]
        if self.num_cat:
            e = self.table(cat + self.offsets)  # (B, C, D)
            parts.insert(0, e.flatten(1))
        return torch.cat(parts, dim=1)


class ExpertBank(nn.Module):
    """``E`` independent MLPs on the same input, computed as one matmul for the first layer and
    batched matmuls after it, instead of ``E`` separate small matmuls.

    Each expert is initialised like its own ``nn.Linear`` stack (independent draws), so experts
    start different and the gates have something to choose between.
    """

    def __init__(
        self, num_experts: int, in_dim: int, hidden: list[int], dropout: float = 0.0
    ) -> None:
        super().__init__()
        if num_experts < 1 or not hidden:
            raise ValueError("an expert bank needs >= 1 expert and >= 1 hidden layer")
        self.num_experts = num_experts
        dims = [in_dim, *hidden]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            w = torch.empty(num_experts, a, b)
            bias = torch.empty(num_experts, 1, b)
            bound = 1 / math.sqrt(a)
            for e in range(num_experts):  # same scheme as nn.Linear, one draw per expert
                nn.init.kaiming_uniform_(w[e].T, a=math.sqrt(5))
                nn.init.uniform_(bias[e], -bound, bound)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(bias))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out_dim = hidden[-1]

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, In)`` -> ``(B, E, H)``."""
        w0 = self.weights[0]  # (E, In, H1)
        e, d_in, h1 = w0.shape
        h = (x @ w0.permute(1, 0, 2).reshape(d_in, e * h1)).view(-1, e, h1).transpose(0, 1)
        h = self.dropout(torch.relu(h + self.biases[0]))  # (E, B, H1)
        for w, b in zip(list(self.weights)[1:], list(self.biases)[1:], strict=True):
            h = self.dropout(torch.relu(torch.baddbmm(b, h, w)))  # (E, B, H)
        return h.transpose(0, 1)  # (B, E, H)
