"""The shallow tower that absorbs position bias in training (Zhao et al., RecSys 2019, sec. 5).

Clicks depend on where a video was shown as much as on the video. The shallow tower sees only
the bias inputs (position, device) and produces a logit added to the engagement heads during
training, so the main model does not have to explain the position effect; at serving the tower
is left out and the main model's output is the position-free relevance.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ranker.modules import FeatureEmbedding, mlp


class ShallowTower(nn.Module):
    """Args:
    cardinalities: embedding rows per bias input column (unknown bucket included).
    hidden: hidden layer sizes (the paper's tower is small: one layer of a few units).
    dropout: in training, the fraction of rows whose position (column 0) becomes unknown, so
        the main model also learns to serve without a position signal.
    """

    def __init__(
        self, cardinalities: list[int], hidden: list[int], dropout: float, dim: int = 8
    ) -> None:
        super().__init__()
        if not cardinalities:
            raise ValueError("the shallow tower needs at least the position column")
        if not 0 <= dropout < 1:
            raise ValueError(f"position dropout must be in [0, 1), got {dropout}")
        self.embed = FeatureEmbedding(cardinalities, 0, dim)
        self.net = mlp(self.embed.out_dim, hidden, 1)
        self.dropout = dropout

    def forward(self, bias_cat: Tensor) -> Tensor:
        """``bias_cat (B, P)`` int64, column 0 the position -> bias logit ``(B,)``."""
        if self.training and self.dropout > 0:
            drop = torch.rand(bias_cat.shape[0], device=bias_cat.device) < self.dropout
            position = torch.where(drop, torch.zeros_like(bias_cat[:, 0]), bias_cat[:, 0])
            bias_cat = torch.cat([position[:, None], bias_cat[:, 1:]], dim=1)
        no_numeric = torch.zeros(bias_cat.shape[0], 0, device=bias_cat.device)
        return self.net(self.embed(bias_cat, no_numeric)).squeeze(-1)
