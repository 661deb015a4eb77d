"""Multi-task ranking models: MMoE (Ma et al., KDD 2018) and its baselines from the same parts.

* ``mmoe``: shared embeddings -> E expert MLPs -> one softmax gate per task mixes the experts ->
  one tower per task.
* ``omoe``: the same with one gate shared by every task (the MMoE paper's ablation).
* ``shared_bottom``: one shared MLP feeds every tower (Caruana 1997), no gates.

The model returns raw head outputs keyed by task name; losses, weighting and devices live outside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ranker.config import ModelConfig
from ranker.modules import ExpertBank, FeatureEmbedding, mlp


@dataclass
class ModelOutput:
    raw: dict[str, Tensor]  # task -> (B,)
    representation: Tensor  # (B, E, H): the shared part's output
    gates: Tensor | None  # (B, T, E) softmax weights, None for shared-bottom


class RankingModel(nn.Module):
    """Args:
    cardinalities: embedding rows per categorical input column (unknown bucket included).
    num_numeric: number of numeric input columns.
    tasks: head names, in output order.
    config: architecture and sizes.
    output_dims: raw outputs per head (default 1, returned as ``(B,)``; more as ``(B, K)``, e.g.
        the cumulative logits of an ordinal head).
    """

    def __init__(
        self,
        cardinalities: list[int],
        num_numeric: int,
        tasks: list[str],
        config: ModelConfig,
        output_dims: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("a ranking model needs at least one task")
        self.tasks = list(tasks)
        self.config = config
        self.embed = FeatureEmbedding(cardinalities, num_numeric, config.embedding_dim)
        d_in = self.embed.out_dim
        n_experts = 1 if config.architecture == "shared_bottom" else config.num_experts
        self.experts = ExpertBank(n_experts, d_in, config.expert_hidden, config.dropout)
        n_gates = {"mmoe": len(tasks), "omoe": 1, "shared_bottom": 0}[config.architecture]
        self.n_gates = n_gates
        self.gate = nn.Linear(d_in, n_gates * n_experts) if n_gates else None
        h = self.experts.out_dim
        dims = {t: 1 for t in tasks} | (output_dims or {})
        self.output_dims = {t: dims[t] for t in tasks}
        self.towers = nn.ModuleDict(
            {t: mlp(h, config.tower_hidden, dims[t], config.dropout) for t in tasks}
        )

    @torch.no_grad()
    def init_head_bias(self, bias: dict[str, float]) -> None:
        """Starts each head at its base value (logit of the base rate, mean label), so early
        steps learn structure instead of the label's offset."""
        for t, b in bias.items():
            last = self.towers[t][-1]
            assert isinstance(last, nn.Linear)
            last.bias.fill_(b)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters every task's loss flows through (what gradient-based weighting balances)."""
        return [*self.embed.parameters(), *self.experts.parameters()]

    def forward_detailed(self, cat: Tensor, num: Tensor) -> ModelOutput:
        x = self.embed(cat, num)  # (B, In)
        rep = self.experts(x)  # (B, E, H)
        if self.gate is None:
            mixed = rep[:, 0:1, :].expand(-1, len(self.tasks), -1)  # (B, T, H)
            gates = None
        else:
            gates = torch.softmax(self.gate(x).view(x.shape[0], self.n_gates, -1), dim=-1)
            mixed = torch.bmm(gates, rep)  # (B, G, H)
            if self.n_gates == 1:
                gates = gates.expand(-1, len(self.tasks), -1)
                mixed = mixed.expand(-1, len(self.tasks), -1)
        raw = {t: self._head(t, mixed[:, i]) for i, t in enumerate(self.tasks)}
        return ModelOutput(raw, rep, gates)

    def _head(self, task: str, x: Tensor) -> Tensor:
        out = self.towers[task](x)  # (B, K)
        return out.squeeze(-1) if self.output_dims[task] == 1 else out

    def forward(self, cat: Tensor, num: Tensor) -> dict[str, Tensor]:
        """``cat (B, C)`` int64, ``num (B, N)`` float32 -> raw output ``(B,)`` per task."""
        return self.forward_detailed(cat, num).raw

    def flops_per_row(self) -> int:
        """Multiply-adds x2 of one forward for one candidate (embedding gathers not counted)."""
        total = 0
        for m in self.modules():
            if isinstance(m, nn.Linear):
                total += 2 * m.in_features * m.out_features
        for w in self.experts.weights:
            total += 2 * w.numel()
        if self.gate is not None:
            total += 2 * self.n_gates * self.experts.num_experts * self.experts.out_dim
        return total
