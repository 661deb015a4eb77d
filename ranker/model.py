"""Multi-task ranking models: shared-bottom, OMoE, MMoE and PLE/CGC, built from the same parts.

* ``shared_bottom``: one shared MLP feeds every tower (Caruana, "Multitask Learning", 1997), no
  gates: the baseline every claim about gating needs.
* ``omoe``: ``E`` expert MLPs mixed by one softmax gate shared by every task (the one-gate
  ablation of Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
  Mixture-of-Experts", KDD 2018).
* ``mmoe``: the same experts, one gate per task (Ma et al., KDD 2018), so tasks that conflict
  can lean on different experts.
* ``ple``: Progressive Layered Extraction (Tang et al., "Progressive Layered Extraction (PLE): A
  Novel Multi-Task Learning (MTL) Model for Personalized Recommendations", RecSys 2020). Each
  level holds task-specific experts for every task plus shared experts; task ``t``'s gate mixes
  its own and the shared experts (Customized Gate Control, CGC), and on every level but the last
  a shared gate mixes *all* experts into the shared experts' input for the next level. Explicitly
  separated task experts are PLE's answer to the "seesaw" (one task improving at another's
  cost) that MMoE's all-shared experts show on weakly related tasks. One level is CGC.
* ``cross_stitch``: one column per task, whose hidden layers are mixed after every layer by
  learned linear cross-stitch units (Misra et al., CVPR 2016; :mod:`ranker.cross_stitch`).

mmoe, omoe and ple gates are softmax gates or DSelect-k gates (``gate = "dselect_k"``, Hazimeh
et al., NeurIPS 2021; :mod:`ranker.dselect`), which select at most ``k`` experts once trained.

The model returns raw head outputs keyed by task name; losses, weighting and devices live outside.
The state-dict keys of ``mmoe``, ``omoe`` and ``shared_bottom`` (``embed``, ``experts``, ``gate``,
``towers``) are those of earlier versions, so their artifacts still load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ranker.config import HistorySpec, ModelConfig
from ranker.cross_stitch import CrossStitchColumns
from ranker.dselect import DSelectGateBank
from ranker.modules import (
    ColumnSplit,
    ExpertBank,
    FeatureEmbedding,
    GateBank,
    HistoryPooling,
    SplitInput,
    first_linear,
    gate_softmax,
    mlp,
)


@dataclass
class ModelOutput:
    raw: dict[str, Tensor]  # task -> (B,) (or (B, K) for a head with K raw outputs)
    representation: Tensor
    """The shared part's output that every task's loss flows through (what gradient-based
    weighting differentiates in ``representation`` mode): ``(B, E, H)`` expert outputs for
    mmoe/omoe, ``(B, 1, H)`` the bottom's output for shared-bottom, ``(B, S, H)`` the *last
    level's shared experts* for ple (the only part of PLE's last level that every task reads;
    task-specific experts are left out because only their own task's loss reaches them)."""
    gates: Tensor | None
    """``(B, T, E)`` gate weights of each task over :meth:`RankingModel.expert_names` (each row
    sums to 1; for ple the last level's gates, 0 on the other tasks' experts, which a task's gate
    cannot see); ``None`` for shared-bottom and cross-stitch, which have no gates."""
    regulariser: Tensor | None = None
    """A scalar the trainer adds to the objective (DSelect-k's entropy term, training mode
    only; its graph reaches the gates' parameters alone, :mod:`ranker.dselect`); ``None`` when
    there is nothing to add."""


def gate_bank(num_gates: int, in_dim: int, num_experts: int, config: ModelConfig) -> GateBank:
    """The gates ``config.gate`` asks for: softmax (:class:`GateBank`, with gate dropout) or
    DSelect-k (k capped by what the gate sees: PLE's shared gate sees more experts)."""
    if config.gate == "dselect_k":
        k = min(config.dselect_k, num_experts)
        return DSelectGateBank(
            num_gates, in_dim, num_experts, k, config.dselect_gamma, config.dselect_entropy
        )
    return GateBank(num_gates, in_dim, num_experts, config.gate_dropout)


class ExtractionLevel(nn.Module):
    """One PLE level (alone: a CGC layer), Tang et al., RecSys 2020, section 4.2-4.3.

    Args:
        num_tasks: ``T``.
        task_experts: ``m_t``, experts per task.
        shared_experts: ``m_s``.
        in_dim: input size (the embeddings for level 1, the expert size ``H`` after it).
        hidden: layer sizes of every expert MLP.
        dropout: dropout inside the experts.
        config: the gate settings (:func:`gate_bank`).
        last: the last level has no shared gate (nothing above reads the shared mixture).
    """

    def __init__(
        self,
        num_tasks: int,
        task_experts: int,
        shared_experts: int,
        in_dim: int,
        hidden: list[int],
        dropout: float,
        config: ModelConfig,
        last: bool,
    ) -> None:
        super().__init__()
        t, mt, ms = num_tasks, task_experts, shared_experts
        self.num_tasks, self.task_experts, self.shared_experts = t, mt, ms
        self.task_bank = ExpertBank(t * mt, in_dim, hidden, dropout)  # task i: [i*mt, (i+1)*mt)
        self.shared_bank = ExpertBank(ms, in_dim, hidden, dropout)
        self.task_gates = gate_bank(t, in_dim, mt + ms, config)
        self.shared_gate = None if last else gate_bank(1, in_dim, t * mt + ms, config)
        self.out_dim = self.task_bank.out_dim
        # owner[k]: the task whose input expert k of the task bank reads (deeper levels)
        self.register_buffer(
            "owner", torch.arange(t).repeat_interleave(mt), persistent=False
        )  # (T*mt,)
        # slots[i]: where task i's gate weights go among all T*mt + ms experts
        slots = [
            list(range(i * mt, (i + 1) * mt)) + list(range(t * mt, t * mt + ms)) for i in range(t)
        ]
        self.register_buffer("slots", torch.tensor(slots, dtype=torch.long), persistent=False)

    def forward(
        self, task_in: Tensor | SplitInput, shared_in: Tensor | SplitInput
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """Args:
            task_in: ``(B, In)`` (level 1: every task reads the embeddings, possibly split, see
                :class:`~ranker.modules.SplitInput`) or ``(B, T, In)``.
            shared_in: ``(B, In)`` (or split on level 1).

        Returns:
            ``task_out (B, T, H)``, ``shared_out (B, H)`` or ``None`` on the last level,
            ``shared (B, m_s, H)`` the shared experts' outputs, and the task gates
            ``(B, T, m_t + m_s)`` (own experts first; :meth:`full_gates` spreads them out).
        """
        t, mt = self.num_tasks, self.task_experts
        level_one = isinstance(task_in, SplitInput) or task_in.dim() == 2
        per_expert = task_in if level_one else task_in[:, self.owner]  # (B, T*mt, In)
        own = self.task_bank(per_expert)  # (B, T*mt, H)
        shared = self.shared_bank(shared_in)  # (B, ms, H)
        b, h = own.shape[0], own.shape[-1]
        g = self.task_gates(task_in)  # (B, T, mt+ms)
        # Weighted sums as broadcasts, not B tiny matmuls (bmm/einsum are ~3x slower on CPU).
        task_out = (g[:, :, :mt, None] * own.view(b, t, mt, h)).sum(2)  # (B, T, H)
        task_out = task_out + (g[:, :, mt:, None] * shared.unsqueeze(1)).sum(2)  # (B, T, H)
        shared_out = None
        if self.shared_gate is not None:
            gs = self.shared_gate(shared_in).squeeze(1)  # (B, T*mt+ms)
            everything = torch.cat([own, shared], dim=1)  # (B, T*mt+ms, H)
            shared_out = (gs.unsqueeze(-1) * everything).sum(1)  # (B, H)
        return task_out, shared_out, shared, g

    def full_gates(self, g: Tensor) -> Tensor:
        """Task gates ``(B, T, m_t + m_s)`` placed among all experts: ``(B, T, T*m_t + m_s)``,
        0 where a task's gate cannot see an expert (for utilisation reports)."""
        t, mt, ms = self.num_tasks, self.task_experts, self.shared_experts
        full = torch.zeros(g.shape[0], t, t * mt + ms, dtype=g.dtype, device=g.device)
        return full.scatter(2, self.slots.expand(g.shape[0], -1, -1), g)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters every task's loss reaches: the shared experts; below the last level also
        the task experts and the shared gate, which feed the next level's shared experts."""
        params = list(self.shared_bank.parameters())
        if self.shared_gate is not None:
            params += [*self.task_bank.parameters(), *self.shared_gate.parameters()]
        return params

    def flops_per_row(self) -> int:
        t, mt, ms, h = self.num_tasks, self.task_experts, self.shared_experts, self.out_dim
        total = self.task_bank.flops_per_row() + self.shared_bank.flops_per_row()
        total += self.task_gates.flops_per_row() + 2 * t * (mt + ms) * h  # gates, mixing
        if self.shared_gate is not None:
            total += self.shared_gate.flops_per_row() + 2 * (t * mt + ms) * h
        return total


class RankingModel(nn.Module):
    """Args:
    cardinalities: embedding rows per categorical feature (unknown bucket included).
    num_numeric: number of numeric input columns.
    tasks: head names, in output order.
    config: architecture and sizes.
    output_dims: raw outputs per head (default 1, returned as ``(B,)``; more as ``(B, K)``, e.g.
        the cumulative logits of an ordinal head).
    cat_widths: ``cat`` columns per categorical feature (default 1 each; ``max_values`` for a
        multi-valued feature, whose embeddings are mean-pooled).
    history: the user's recent history (``[live.history]``): its ``length`` codes are the last
        ``cat`` columns, in the vocabulary of categorical feature ``history_feature`` (the video
        id), whose embedding rows they share; the pooled vector (:class:`HistoryPooling`)
        follows the numeric columns in the embedded input, so every architecture reads it.
    """

    def __init__(
        self,
        cardinalities: list[int],
        num_numeric: int,
        tasks: list[str],
        config: ModelConfig,
        output_dims: dict[str, int] | None = None,
        cat_widths: list[int] | None = None,
        history: HistorySpec | None = None,
        history_feature: int = -1,
        history_side: list[int] | None = None,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("a ranking model needs at least one task")
        self.tasks = list(tasks)
        self.config = config
        self.arch = config.architecture
        self.embed = FeatureEmbedding(cardinalities, num_numeric, config.embedding_dim, cat_widths)
        d_in = self.embed.out_dim
        self.history: HistoryPooling | None = None
        self.history_length = 0
        if history is not None:
            widths = self.embed.widths
            if not 0 <= history_feature < len(widths) or widths[history_feature] != 1:
                raise ValueError(
                    f"history_feature {history_feature} is not a single-valued categorical feature"
                )
            self.history = HistoryPooling(
                config.embedding_dim, history.pooling, history.attention_hidden
            )
            self.history_length = history.length
            self.history_feature = history_feature
            column = sum(widths[:history_feature])  # its one cat column
            self.history_column = column
            side = list(history_side or [])
            for s in side:
                if not 0 <= s < len(widths) or widths[s] != 1 or s == history_feature:
                    raise ValueError(f"history side feature {s} is not a single-valued one")
            self.history_side = side
            # Each side feature's code per video id code (row 0: padding), already offset into
            # the shared table; filled from the video table by :meth:`set_history_side`.
            if side:  # registered only then: artifacts without side features load as before
                first = [sum(cardinalities[:s]) for s in side]  # the features' first rows
                codes = torch.tensor(first, dtype=torch.long)[:, None]
                self.register_buffer(
                    "history_side_codes",
                    codes.expand(len(side), cardinalities[history_feature]).clone(),
                )
            d_in += config.embedding_dim
        self.in_dim = d_in
        self.experts: ExpertBank | None = None
        self.gate: nn.Linear | None = None  # softmax gates of mmoe / omoe
        self.dselect: DSelectGateBank | None = None  # their DSelect-k gates instead
        self.levels = nn.ModuleList()  # ple only
        self.columns: CrossStitchColumns | None = None  # cross_stitch only
        self.n_gates = 0
        if self.arch == "ple":
            if config.task_experts < 1 or config.shared_experts < 1:
                raise ValueError("ple needs >= 1 task expert and >= 1 shared expert per level")
            d = d_in
            for level in range(config.ple_levels):
                lvl = ExtractionLevel(
                    len(tasks),
                    config.task_experts,
                    config.shared_experts,
                    d,
                    config.expert_hidden,
                    config.dropout,
                    config,
                    last=level == config.ple_levels - 1,
                )
                self.levels.append(lvl)
                d = lvl.out_dim
            h = d
        elif self.arch == "cross_stitch":
            self.columns = CrossStitchColumns(
                len(tasks), d_in, config.expert_hidden, config.dropout, config.stitch_self
            )
            h = self.columns.out_dim
        else:
            n_experts = 1 if self.arch == "shared_bottom" else config.num_experts
            self.experts = ExpertBank(n_experts, d_in, config.expert_hidden, config.dropout)
            self.n_gates = {"mmoe": len(tasks), "omoe": 1, "shared_bottom": 0}[self.arch]
            if self.n_gates and config.gate == "dselect_k":
                self.dselect = DSelectGateBank(
                    self.n_gates,
                    d_in,
                    n_experts,
                    config.dselect_k,
                    config.dselect_gamma,
                    config.dselect_entropy,
                )
            elif self.n_gates:
                self.gate = nn.Linear(d_in, self.n_gates * n_experts)
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

    def expert_names(self) -> list[str]:
        """Names of the experts the ``gates`` of :class:`ModelOutput` weigh, in their order:
        ``e0..`` (mmoe, omoe), ``bottom`` (shared-bottom), ``<task>.<i>`` then ``shared.<i>``
        (ple, last level); for cross-stitch (no gates) the columns of ``representation``,
        named by task."""
        if self.arch == "ple":
            c = self.config
            own = [f"{t}.{i}" for t in self.tasks for i in range(c.task_experts)]
            return own + [f"shared.{i}" for i in range(c.shared_experts)]
        if self.columns is not None:
            return list(self.tasks)
        assert self.experts is not None
        if self.arch == "shared_bottom":
            return ["bottom"]
        return [f"e{i}" for i in range(self.experts.num_experts)]

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters every task's loss flows through (what gradient-based weighting balances):
        the embeddings and the experts (mmoe, omoe, shared-bottom) and omoe's single gate; for
        ple the embeddings, every level's shared experts and, below the last level, the task
        experts and shared gates that feed the next level's shared experts; for cross-stitch
        the embeddings, every column and every unit but the last
        (:meth:`CrossStitchColumns.shared_parameters`). Per-task gates (stored as one tensor,
        one slice per task) and towers are not shared."""
        params = list(self.embed.parameters())
        if self.experts is not None:
            params += list(self.experts.parameters())
        if self.n_gates == 1:  # omoe: one gate for every task
            params += list((self.gate or self.dselect or nn.Identity()).parameters())
        if self.columns is not None:
            params += self.columns.shared_parameters()
        for lvl in self.levels:
            assert isinstance(lvl, ExtractionLevel)
            params += lvl.shared_parameters()
        return params

    def forward_detailed(
        self, cat: Tensor, num: Tensor, split: ColumnSplit | None = None
    ) -> ModelOutput:
        """``cat (B, C)`` int64, ``num (B, N)`` float32 -> raw outputs, the shared
        representation and the gates (see :class:`ModelOutput`); ``split`` as in
        :meth:`forward`."""
        return self._run(cat, num, with_gates=True, split=split)

    def column_split(self, categorical: list[int], numeric: list[int]) -> ColumnSplit:
        """The split of the embedded input whose shared part is the given categorical features
        (by index among the categorical features) and numeric columns (for :meth:`forward`)."""
        d, f = self.embed.dim, self.embed.num_cat
        cols = [i * d + k for i in categorical for k in range(d)] + [f * d + j for j in numeric]
        return ColumnSplit.of(self.in_dim, cols)

    @property
    def num_cat_columns(self) -> int:
        """``cat`` columns the input must have: the features' and the history's."""
        return self.embed.num_columns + self.history_length

    def embed_input(self, cat: Tensor, num: Tensor, one_request: bool = False) -> Tensor:
        """The embedded input ``(B, In)``: the features' embeddings and numeric columns, then
        the pooled history (when the model has one)."""
        if self.history is None:
            return self.embed(cat, num)
        n = self.embed.num_columns
        feats, hist = cat[:, :n], cat[:, n:]  # (B, C), (B, L)
        if one_request:
            hist = hist[:1]  # (1, L): every candidate of one request has the user's history
        emb = self.embed(feats, num)
        d, f = self.embed.dim, self.history_feature
        target = emb[:, f * d : (f + 1) * d]  # (B, D): the candidate's video id embedding
        offset = self.embed.offsets[self.history_column]
        h = self.embed.table(hist + offset)  # (B, L, D), the video id's own rows
        for i, s in enumerate(self.history_side):
            h = h + self.embed.table(self.history_side_codes[i][hist])  # + its category's row
            target = target + emb[:, s * d : (s + 1) * d]
        return torch.cat([emb, self.history(h, hist != 0, target, one_request)], dim=1)

    @torch.no_grad()
    def set_history_side(self, codes: Tensor) -> None:
        """``codes (S, V)``: each side feature's code (in its own vocabulary) per video id code,
        ``0`` where unknown; stored offset into the shared embedding table."""
        if not self.history_side:
            raise ValueError("the model's history has no side features")
        if codes.shape != self.history_side_codes.shape:
            raise ValueError(
                f"history side codes of shape {tuple(codes.shape)}, expected "
                f"{tuple(self.history_side_codes.shape)}"
            )
        widths = self.embed.widths
        for i, s in enumerate(self.history_side):
            offset = self.embed.offsets[sum(widths[:s])]
            self.history_side_codes[i] = codes[i].to(torch.long) + offset

    def _run(
        self, cat: Tensor, num: Tensor, with_gates: bool, split: ColumnSplit | None = None
    ) -> ModelOutput:
        emb = self.embed_input(cat, num, one_request=split is not None)  # (B, In)
        x = emb if split is None else split.apply(emb)
        b = emb.shape[0]
        t = len(self.tasks)
        if self.arch == "ple":
            task_in: Tensor | SplitInput = x
            shared_in: Tensor | SplitInput = x
            rep, gates = emb, None
            for lvl in self.levels:
                task_in, shared_out, rep, gates = lvl(task_in, shared_in)  # (B, T, H), ...
                if shared_out is not None:
                    shared_in = shared_out  # (B, H)
            mixed = task_in  # (B, T, H)
            if with_gates and gates is not None:
                last = self.levels[-1]
                assert isinstance(last, ExtractionLevel)
                gates = last.full_gates(gates)  # (B, T, E_all)
        elif self.columns is not None:
            mixed, rep = self.columns(x)  # (B, T, H) each
            gates = None
        else:
            assert self.experts is not None
            rep = self.experts(x)  # (B, E, H)
            if self.n_gates == 0:
                mixed = rep[:, 0:1, :].expand(-1, t, -1)  # (B, T, H)
                gates = None
            else:
                if self.dselect is not None:
                    gates = self.dselect(x)  # (B, G, E)
                else:
                    assert self.gate is not None
                    logits = first_linear(x, self.gate.weight.T, self.gate.bias)
                    logits = logits.view(b, self.n_gates, -1)  # (B, G, E)
                    gates = gate_softmax(logits, self.config.gate_dropout, self.training)
                mixed = torch.bmm(gates, rep)  # (B, G, H)
                if self.n_gates == 1:
                    gates = gates.expand(-1, t, -1)
                    mixed = mixed.expand(-1, t, -1)
        raw = {name: self._head(name, mixed[:, i]) for i, name in enumerate(self.tasks)}
        return ModelOutput(raw, rep, gates, self._regulariser())

    def _regulariser(self) -> Tensor | None:
        """The sum of what this forward's DSelect-k gates left in ``regulariser`` (training)."""
        if not self.training or self.config.gate != "dselect_k":
            return None
        terms = [
            m.regulariser
            for m in self.modules()
            if isinstance(m, DSelectGateBank) and m.regulariser is not None
        ]
        return torch.stack(terms).sum() if terms else None

    def _head(self, task: str, x: Tensor) -> Tensor:
        out = self.towers[task](x)  # (B, K)
        return out.squeeze(-1) if self.output_dims[task] == 1 else out

    def forward(
        self, cat: Tensor, num: Tensor, split: ColumnSplit | None = None
    ) -> dict[str, Tensor]:
        """``cat (B, C)`` int64, ``num (B, N)`` float32 -> raw output ``(B,)`` per task.

        ``split`` (:meth:`column_split`): embedded-input columns whose values are the same on
        every row, as the user's and the context's features are within one ranking request;
        their share of every first layer is computed once instead of per row
        (:class:`~ranker.modules.ColumnSplit`). The caller guarantees the sameness.
        """
        return self._run(cat, num, with_gates=False, split=split).raw

    def flops_per_row(self, split: ColumnSplit | None = None) -> int:
        """Multiply-adds x2 of one forward for one candidate (embedding gathers not counted);
        with ``split``, what each candidate of a request costs when the shared columns' share
        of the first layers is computed once per request (that once is not counted)."""
        total = -2 * len(split.shared) * self._first_layer_width() if split is not None else 0
        for m in self.modules():
            if isinstance(m, nn.Linear):
                total += 2 * m.in_features * m.out_features
        if self.history is not None:  # its unit runs per history slot: counted there
            if self.history.unit is not None:
                total -= sum(
                    2 * m.in_features * m.out_features
                    for m in self.history.unit.modules()
                    if isinstance(m, nn.Linear)
                )
            total += self.history.flops_per_row(self.history_length, split is not None)
        if self.experts is not None:
            total += self.experts.flops_per_row()
            if self.n_gates:
                total += 2 * self.n_gates * self.experts.num_experts * self.experts.out_dim
            if self.dselect is not None:
                total += self.dselect.flops_per_row()
        if self.columns is not None:
            total += self.columns.flops_per_row()
        for lvl in self.levels:
            assert isinstance(lvl, ExtractionLevel)
            total += lvl.flops_per_row()
        return total

    def _first_layer_width(self) -> int:
        """Outputs of every layer that reads the embedded input (what a split shortens)."""
        if self.arch == "ple":
            lvl = self.levels[0]
            assert isinstance(lvl, ExtractionLevel)
            banks = [lvl.task_bank.weights[0], lvl.shared_bank.weights[0]]
            gates = [lvl.task_gates.weight] + ([lvl.shared_gate.weight] if lvl.shared_gate else [])
            return sum(w.shape[0] * w.shape[2] for w in banks + gates)
        if self.columns is not None:
            w0 = self.columns.layers[0].weights[0]  # type: ignore[union-attr]
            return w0.shape[0] * w0.shape[2]
        assert self.experts is not None
        w0 = self.experts.weights[0]
        gate = self.gate.out_features if self.gate else 0
        if self.dselect is not None:
            gate = self.dselect.weight.shape[0] * self.dselect.weight.shape[2]
        return w0.shape[0] * w0.shape[2] + gate
