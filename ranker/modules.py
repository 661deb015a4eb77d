"""Building blocks of the ranking models: embeddings (with mean-pooled multi-valued features),
MLPs, a fused bank of expert MLPs and a bank of softmax gates (with gate dropout).

Every architecture in :mod:`ranker.model` (shared-bottom, OMoE, MMoE, PLE/CGC, cross-stitch) is
these parts arranged differently, so a comparison between them measures the arrangement, not the
parts (DSelect-k gates, :mod:`ranker.dselect`, are a :class:`GateBank` too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ColumnSplit:
    """Which input columns hold the same values on every row of a batch: one ranking request,
    where the user's and the context's features are repeated for every candidate.

    Every first layer is linear, so ``x @ W = x[:, rows] @ W[rows] + x[0, shared] @ W[shared]``:
    the shared part is computed once per request instead of once per candidate. On the default
    model 82 of 133 input columns are the user's or the context's, 62% of the first expert
    layer's multiply-adds. The result equals the plain product up to float rounding (the sum
    is associated differently). Both index sets are fixed tensors, so a traced or exported
    graph holds them (and the weight slices they select) as constants.
    """

    shared: Tensor  # (I_s,) positions of the shared columns in the full input
    rows: Tensor  # (I_r,) the others
    # The same positions as runs of adjacent columns, ``(start, stop)``, derived from the two
    # tensors: the input is ordered by source (user, video, context), so each set is a few runs,
    # and selecting columns by slices costs a few row-wise copies instead of a gather of every
    # value (a column Gather took 0.2 ms of a 2.7 ms ONNX forward pass on 500 rows; the slices
    # do not show in its profile).
    shared_runs: tuple[tuple[int, int], ...] = field(init=False)
    row_runs: tuple[tuple[int, int], ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shared_runs", _runs(self.shared.tolist()))
        object.__setattr__(self, "row_runs", _runs(self.rows.tolist()))

    @classmethod
    def of(cls, width: int, shared: list[int]) -> ColumnSplit:
        bad = [c for c in shared if not 0 <= c < width]
        if bad:
            raise ValueError(f"shared columns {bad} outside an input of {width} columns")
        s = sorted(set(shared))
        rest = [c for c in range(width) if c not in set(s)]
        return cls(torch.tensor(s, dtype=torch.long), torch.tensor(rest, dtype=torch.long))

    def apply(self, x: Tensor) -> SplitInput:
        """Splits ``x (B, In)``; the shared columns are read from row 0 (sameness not checked)."""
        return SplitInput(_columns(x, self.row_runs), _columns(x[:1], self.shared_runs), self)


def _runs(columns: list[int]) -> tuple[tuple[int, int], ...]:
    """Column positions as ``(start, stop)`` runs of ascending adjacent ones, in their order."""
    runs: list[tuple[int, int]] = []
    for c in columns:
        if runs and runs[-1][1] == c:
            runs[-1] = (runs[-1][0], c + 1)
        else:
            runs.append((c, c + 1))
    return tuple(runs)


def _columns(x: Tensor, runs: tuple[tuple[int, int], ...]) -> Tensor:
    """``x``'s columns in ``runs``, in order (one run: a view, no copy)."""
    if not runs:
        return x[:, :0]
    parts = [x[:, a:b] for a, b in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


@dataclass
class SplitInput:
    """A batch split by a :class:`ColumnSplit`: its per-row columns and its shared ones, once."""

    rows: Tensor  # (B, I_r)
    shared: Tensor  # (1, I_s)
    split: ColumnSplit


def first_linear(x: Tensor | SplitInput, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight + bias`` for ``weight (In, Out)``; a :class:`SplitInput`'s shared columns
    (and the bias) are multiplied once and broadcast over the rows."""
    if isinstance(x, SplitInput):
        once = x.shared @ weight[x.split.shared]  # (1, Out)
        if bias is not None:
            once = once + bias
        return torch.addmm(once, x.rows, weight[x.split.rows])
    return x @ weight if bias is None else torch.addmm(bias, x, weight)


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
    lookup is a single gather; numerics are appended as they are (already standardised).

    A multi-valued feature (``widths[f] > 1``, e.g. a video's tags) arrives as ``widths[f]``
    columns of codes padded with ``0``; its embedding is the mean over its non-zero codes
    (padding and unknown values excluded), as YouTube's candidate model averages the embeddings
    of a bag of watched ids (Covington et al., RecSys 2016, section 3.1). A row with no known
    value gets the embedding of code ``0``, the feature's learned "nothing known" vector.

    Args:
        cardinalities: embedding rows per categorical feature (unknown bucket included).
        num_numeric: numeric input columns.
        dim: embedding size ``D``.
        widths: ``cat`` columns per categorical feature (default: 1 each).
    """

    def __init__(
        self,
        cardinalities: list[int],
        num_numeric: int,
        dim: int,
        widths: list[int] | None = None,
    ) -> None:
        super().__init__()
        if any(c < 1 for c in cardinalities):
            raise ValueError(f"every cardinality must be >= 1, got {cardinalities}")
        widths = [1] * len(cardinalities) if widths is None else list(widths)
        if len(widths) != len(cardinalities) or any(w < 1 for w in widths):
            raise ValueError(f"widths {widths} must give >= 1 column per feature")
        self.num_cat = len(cardinalities)
        self.num_numeric = num_numeric
        self.dim = dim
        self.widths = widths
        self.pooled = any(w > 1 for w in widths)
        starts = torch.tensor([0, *cardinalities[:-1]], dtype=torch.long).cumsum(0)
        starts = starts[: len(cardinalities)]
        width_t = torch.tensor(widths, dtype=torch.long)
        # output_size: no data-dependent size, so the module also builds on the "meta" device
        feature_of = torch.repeat_interleave(
            torch.arange(len(widths)), width_t, output_size=sum(widths)
        )  # (C,)
        first = torch.zeros(len(feature_of), dtype=torch.bool)  # (C,) first column of a feature
        first[width_t.cumsum(0) - width_t] = True
        # Buffers are derived from the constructor arguments, never saved (state_dict unchanged).
        self.register_buffer("offsets", starts[feature_of], persistent=False)  # (C,)
        self.register_buffer("feature_of", feature_of, persistent=False)  # (C,)
        self.register_buffer("single", (width_t == 1)[feature_of], persistent=False)  # (C,)
        self.register_buffer("first", first, persistent=False)  # (C,)
        self.table = nn.Embedding(max(sum(cardinalities), 1), dim)
        nn.init.normal_(self.table.weight, std=0.05)

    @property
    def out_dim(self) -> int:
        return self.num_cat * self.dim + self.num_numeric

    @property
    def num_columns(self) -> int:
        """``cat`` columns the input must have (sum of the widths)."""
        return sum(self.widths)

    def forward(self, cat: Tensor, num: Tensor) -> Tensor:
        """``cat (B, C)`` int64, ``num (B, N)`` float -> ``(B, F*D + N)`` (``F`` features)."""
        parts = [num]
        if self.num_cat:
            e = self.table(cat + self.offsets)  # (B, C, D)
            if self.pooled:
                e = self._pool(cat, e)  # (B, F, D)
            parts.insert(0, e.flatten(1))
        return torch.cat(parts, dim=1)

    def _pool(self, cat: Tensor, e: Tensor) -> Tensor:
        """Mean over each feature's columns whose code is non-zero: ``(B, C, D) -> (B, F, D)``."""
        b, f = cat.shape[0], self.num_cat
        valid = (cat != 0) | self.single  # (B, C): single-valued columns always count
        count = torch.zeros(b, f, device=cat.device).index_add_(
            1, self.feature_of, valid.to(e.dtype)
        )  # (B, F)
        # nothing known: the first column (code 0) stands for the feature
        valid = valid | (self.first & (count[:, self.feature_of] == 0))  # (B, C)
        count = count.clamp_min(1.0)
        w = valid.to(e.dtype) / count[:, self.feature_of]  # (B, C)
        out = torch.zeros(b, f, e.shape[-1], device=e.device, dtype=e.dtype)
        return out.index_add_(1, self.feature_of, e * w.unsqueeze(-1))  # (B, F, D)


class ExpertBank(nn.Module):
    """``E`` independent MLPs, computed as one matmul for the first layer and batched matmuls
    after it, instead of ``E`` separate small matmuls.

    The input is shared by every expert ``(B, In)`` (MMoE, the first level of PLE) or given per
    expert ``(B, E, In)`` (deeper PLE levels, whose task experts read their task's mixture).
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

    def forward(self, x: Tensor | SplitInput) -> Tensor:
        """``x (B, In)`` (or split, see :class:`SplitInput`) or ``(B, E, In)`` -> ``(B, E, H)``."""
        w0 = self.weights[0]  # (E, In, H1)
        e, d_in, h1 = w0.shape
        if isinstance(x, SplitInput) or x.dim() == 2:  # one product for every expert
            b0 = self.biases[0].permute(1, 0, 2).reshape(1, e * h1)  # (1, E*H1)
            flat = first_linear(x, w0.permute(1, 0, 2).reshape(d_in, e * h1), b0)  # (B, E*H1)
            # relu on the contiguous product, before the transpose (3-6x faster than on the
            # view), and in place: nothing else reads the product, and autograd's relu
            # backward needs only the result
            return self.deeper(self.dropout(flat.relu_()))
        h = self.dropout(torch.baddbmm(self.biases[0], x.transpose(0, 1), w0).relu_())
        return self._layers(h)

    def deeper(self, first: Tensor) -> Tensor:
        """The layers after the first from its rectified output ``(B, E*H1)`` of an input shared
        by every expert -> ``(B, E, H)``."""
        e, h1 = self.num_experts, self.weights[0].shape[2]
        return self._layers(first.view(-1, e, h1).transpose(0, 1))  # (E, B, H1)

    def _layers(self, h: Tensor) -> Tensor:
        """``h (E, B, H1)`` through the later layers -> ``(B, E, H)``."""
        for w, b in zip(list(self.weights)[1:], list(self.biases)[1:], strict=True):
            h = self.dropout(torch.baddbmm(b, h, w).relu_())  # (E, B, H)
        return h.transpose(0, 1)  # (B, E, H)

    def flops_per_row(self) -> int:
        return 2 * sum(w.numel() for w in self.weights)


def gate_softmax(logits: Tensor, dropout: float, training: bool) -> Tensor:
    """Softmax over the experts (last dim); in training each expert is dropped with probability
    ``dropout`` and the rest renormalised.

    Why: Zhao et al., "Recommending What Video to Watch Next", RecSys 2019, section 4.2, found
    MMoE gates polarise (one expert gets ~all the weight on distributed training) and fixed it
    with dropout on the gating network, "setting the utilization of experts to 0 with 10%
    probability and renormalizing the softmax outputs". Masking the logits to ``-inf`` before the
    softmax is exactly that renormalisation. A row whose every expert was drawn for dropping keeps
    them all (a gate always mixes something).

    Args:
        logits: ``(..., E)``.
    Returns:
        ``(..., E)`` non-negative, summing to 1 over the last dim.
    """
    if training and dropout > 0:
        drop = torch.rand_like(logits) < dropout  # (..., E)
        drop &= ~drop.all(-1, keepdim=True)
        logits = logits.masked_fill(drop, float("-inf"))
    return softmax_short(logits)


def softmax_short(x: Tensor) -> Tensor:
    """Softmax over a short last dim (a gate's experts, a few), as ``exp(x - max) / sum``.

    Why: torch's CPU softmax kernel vectorises along the softmax dim, which a gate's 2-8
    experts do not fill: on ``(500, 4, 6)`` logits it took 456 us against 53 us for these four
    vectorised ops over the whole tensor (one thread, AMD EPYC; ``bench/small_ops.py``), 6-10%
    of the bf16 engine's forward pass. Subtracting the max keeps it exact where ``exp``
    overflows; a ``-inf`` logit (a dropped expert) gets weight 0, as in ``torch.softmax``.
    """
    if torch.onnx.is_in_onnx_export():  # ONNX Runtime's Softmax has no such slow case
        return torch.softmax(x, dim=-1)
    e = (x - x.amax(dim=-1, keepdim=True)).exp()
    return e / e.sum(dim=-1, keepdim=True)


class GateBank(nn.Module):
    """``G`` softmax gates over ``E`` experts each, computed together.

    The input is shared ``(B, In)`` or per gate ``(B, G, In)`` (PLE: each task's gate at a deeper
    level reads that task's mixture from the level below). Each gate is a linear map initialised
    like ``nn.Linear``, followed by :func:`gate_softmax`.
    """

    def __init__(self, num_gates: int, in_dim: int, num_experts: int, dropout: float = 0.0) -> None:
        super().__init__()
        if num_gates < 1 or num_experts < 1:
            raise ValueError("a gate bank needs >= 1 gate over >= 1 expert")
        self.num_gates = num_gates
        self.num_experts = num_experts
        self.dropout = dropout
        bound = 1 / math.sqrt(in_dim)
        self.weight = nn.Parameter(
            torch.empty(num_gates, in_dim, num_experts).uniform_(-bound, bound)
        )
        self.bias = nn.Parameter(torch.empty(num_gates, num_experts).uniform_(-bound, bound))

    def forward(self, x: Tensor | SplitInput) -> Tensor:
        """``x (B, In)`` (or split) or ``(B, G, In)`` -> gate weights ``(B, G, E)``."""
        return gate_softmax(self.linear(x), self.dropout, self.training)

    def linear(self, x: Tensor | SplitInput) -> Tensor:
        """The gates' logits ``(B, G, E)`` (also what :class:`ranker.dselect.DSelectGateBank`
        turns into selector codes)."""
        g, d_in, e = self.weight.shape
        if isinstance(x, SplitInput) or x.dim() == 2:  # one matmul for every gate
            flat = self.weight.permute(1, 0, 2).reshape(d_in, g * e)  # (In, G*E)
            logits = first_linear(x, flat, None).view(-1, g, e)
        else:  # one matmul per gate: (G, B, In) @ (G, In, E)
            logits = torch.bmm(x.transpose(0, 1), self.weight).transpose(0, 1)  # (B, G, E)
        return logits + self.bias

    def flops_per_row(self) -> int:
        return 2 * self.weight.numel()


class HistoryPooling(nn.Module):
    """The user's recent videos pooled into one vector per candidate (``[live.history]``).

    ``attention``: the target attention of Zhou et al., "Deep Interest Network for
    Click-Through Rate Prediction" (KDD 2018, section 4.3): an activation unit (an MLP on
    ``[h, t, h - t, h * t]``, the paper's out product replaced by the element-wise one as in its
    public code) scores each history video ``h`` against the candidate ``t``; the vector is
    ``sum_j w_j h_j`` over the non-padded videos, without softmax (the paper keeps the sum of
    weights as the intensity of the user's interest). ``mean``: the average of the videos.

    Padding (code ``0``: no video, or one outside the vocabulary) is masked with ``where``, so
    neither its embedding nor its score can reach the output; a row whose history is all
    padding gets ``empty``, a learned vector of its own (not the zero a masked sum gives, which
    the model could not tell from a history whose weights cancel).
    """

    def __init__(self, dim: int, pooling: str, hidden: list[int]) -> None:
        super().__init__()
        self.dim = dim
        self.pooling = pooling
        self.empty = nn.Parameter(torch.randn(dim) * 0.05)
        self.unit = mlp(4 * dim, hidden, 1) if pooling == "attention" else None

    def forward(self, h: Tensor, mask: Tensor, target: Tensor, shared: bool = False) -> Tensor:
        """``h (B, L, D)`` history embeddings, ``mask (B, L)`` bool (True: a real video),
        ``target (B, D)`` the candidate's video embedding -> ``(B, D)``. ``shared``: ``h`` and
        ``mask`` are one row ``(1, L, ...)`` that every candidate shares (one ranking request),
        computed without repeating the history per candidate (:meth:`_shared`)."""
        if shared:
            return self._shared(h[0], mask[0], target)
        m = mask.unsqueeze(-1)  # (B, L, 1)
        if self.unit is not None:
            w = self._attention(h, target)  # (B, L, 1)
        else:
            count = mask.sum(1, keepdim=True).clamp_min(1).to(h.dtype)  # (B, 1)
            w = (1.0 / count).unsqueeze(-1).expand_as(m)  # (B, L, 1)
        pooled = torch.where(m, w * h, torch.zeros_like(h)).sum(1)  # (B, D)
        return torch.where(mask.any(1, keepdim=True), pooled, self.empty.expand_as(pooled))

    def _first_layer(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The activation unit's first layer on ``[h, t, h - t, h * t]`` as the maps of ``h``,
        ``t`` and ``h * t`` (each ``(H, D)``), and its bias: ``h - t`` folded into the first
        two, so the ``(B, L, 4D)`` concatenation is never built."""
        assert self.unit is not None
        first = self.unit[0]
        assert isinstance(first, nn.Linear)
        wh, wt, wd, wp = first.weight.split(self.dim, dim=1)  # (H, D) each
        return wh + wd, wt - wd, wp, first.bias

    def _attention(self, h: Tensor, target: Tensor) -> Tensor:
        """The activation unit's scores ``(B, L, 1)``, the target's share of the first layer
        once per row instead of once per slot (half the first layer's multiply-adds)."""
        assert self.unit is not None
        a, b, p, bias = self._first_layer()
        per_row = torch.addmm(bias, target, b.T)  # (B, H)
        x = h @ a.T + (h * target.unsqueeze(1)) @ p.T + per_row.unsqueeze(1)
        return self.unit[1:](x)  # (B, L, 1)

    def _shared(self, h: Tensor, mask: Tensor, target: Tensor) -> Tensor:
        """One request: ``h (L, D)`` and ``mask (L,)`` shared by the ``B`` candidates. Only the
        filled slots are computed (the work follows the user's history: a user with 3 clicks
        costs 3 slots, not ``L``). The first layer is linear in ``t`` for a fixed history,
        ``x[b, j] = t_b @ M_j + c_j`` with ``M_j = diag(h_j) P^T + B^T`` and
        ``c_j = A h_j + bias``: one ``(B, D) x (D, K H)`` product, no ``(B, K, D)`` tensor; the
        pooling is one ``(B, K) x (K, D)`` product."""
        bsz = target.shape[0]
        h = h.index_select(0, mask.nonzero().squeeze(1))  # (K, D): padding reaches nothing
        if self.unit is None:
            pooled = h.sum(0) / mask.sum().clamp_min(1).to(h.dtype)  # a tensor: traced as one
            out = torch.where(mask.any(), pooled, self.empty)  # (D,)
            return out.unsqueeze(0).expand(bsz, -1)
        # One zero slot more: it adds exactly 0 to the pooled sum, and K + 1 >= 1 keeps every
        # shape below non-empty (ONNX Reshape reads a 0 in a target shape as "keep that
        # dimension", so an empty history would not export)
        h = torch.cat([h, h.new_zeros(1, self.dim)], dim=0)  # (K + 1, D)
        length = h.shape[0]
        a, b, p, bias = self._first_layer()
        hidden = a.shape[0]
        m = h.unsqueeze(-1) * p.T.unsqueeze(0) + b.T.unsqueeze(0)  # (K, D, H)
        m = m.permute(1, 0, 2).reshape(self.dim, length * hidden)  # (D, K H)
        c = (h @ a.T + bias).reshape(length * hidden)  # (K H,)
        x = torch.addmm(c, target, m).view(bsz * length, hidden)  # (B K, H)
        for layer in self.unit[1:]:  # ReLU in place: x is this call's own (1.3 MB at B = 500)
            x = x.relu_() if isinstance(layer, nn.ReLU) else layer(x)
        pooled = x.view(bsz, length) @ h  # (B, D)
        return torch.where(mask.any(), pooled, self.empty.expand_as(pooled))

    def flops_per_row(self, length: int, shared: bool = False) -> int:
        """Multiply-adds x2 per candidate: the activation unit on every slot (its first layer
        as :meth:`_attention` computes it, or with ``shared`` as :meth:`_shared` does: only the
        ``t_b @ M_j`` products, the history's own share once per request, not counted), and
        the sum."""
        total = 2 * length * self.dim
        if self.unit is not None:
            layers = [m for m in self.unit.modules() if isinstance(m, nn.Linear)]
            d, h = self.dim, layers[0].out_features
            total += 2 * d * h * length if shared else 2 * d * h * (2 * length + 1) + 2 * length * d
            total += length * sum(2 * m.in_features * m.out_features for m in layers[1:])
        return total
