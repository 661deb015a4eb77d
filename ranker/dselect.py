"""DSelect-k gates: sparse, differentiable selection of ``k`` of ``E`` experts.

Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder, Hong and Chi, "DSelect-k:
Differentiable Selection in the Mixture of Experts with Applications to Multi-Task Learning",
NeurIPS 2021. A softmax gate gives every expert some weight; top-k gates are sparse but not
continuous. DSelect-k is both, once trained: ``k`` *single-expert selectors*, each choosing one
expert through a binary code of ``m = ceil(log2 E)`` bits, and a softmax over the selectors.

* Selector ``i`` holds ``m`` logits ``z_i``; bit ``l`` is ``S(z_il)``, the cubic *smooth-step*
  ``S(t) = 0`` for ``t <= -gamma/2``, ``1`` for ``t >= gamma/2``, ``-2 t^3 / gamma^3 +
  3 t / (2 gamma) + 1/2`` between (section 3.1; from Hazimeh et al., "The Tree Ensemble
  Layer", ICML 2020). Code ``c`` gets ``r_c = prod_l (S(z_il) if bit l of c is 1 else
  1 - S(z_il))``: a distribution over the ``2^m`` codes (a product of Bernoullis) that is
  one-hot once every ``S`` is exactly 0 or 1, which the smooth-step reaches in finite ``t``
  (a sigmoid never does). Then the gate selects at most ``k`` experts.
* The gate's weights are ``sum_i softmax(alpha)_i r(z_i)``, which sums to 1.
* Per-example gating (the paper's section 3.2, what MMoE's gates are): ``z`` and ``alpha`` are
  linear in the gate's input, initialised as the official code does (``z``: uniform in
  ``+-gamma/100``, every ``S`` near 1/2, a near-uniform start; ``alpha``: uniform in
  ``+-0.05``).
* Entropy regulariser (section 3.3): ``lambda * sum_i H(r(z_i))`` speeds the selectors'
  convergence to binary codes (0 once they are). Its gradient reaches the gate's own parameters
  only (the gate's input is detached for it), so it adds to the step after the weighting
  strategy's backward without going through, or being rescaled by, the task weights.

One deviation: when ``E`` is not a power of 2, the official code lets codes ``>= E`` select
nothing and adds a penalty ``1 / sum_{c < E} r_c`` that keeps selectors off them (the weights
then sum to 1 only at the optimum). Here code ``c`` selects expert ``c mod E``: the weights are
a distribution for every ``z``, at most ``k`` experts once binary still holds, and no division
can blow up; the cost is that ``2^m - E`` experts own two codes (a start at twice the others'
weight). A power-of-2 ``E`` gives every expert one code, as in the paper.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ranker.modules import GateBank, SplitInput, softmax_short


def code_bits(num_experts: int) -> int:
    """``m``: bits of a selector's code (at least 1, so one expert still has a code)."""
    return max(1, math.ceil(math.log2(num_experts)))


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    """The cubic smooth-step: 0 below ``-gamma/2``, 1 above ``gamma/2``, C^1 in between.
    Written with clamps (ONNX ``Clip``): outside the band the clamp's gradient is 0, as the
    function's is; in ``u = t / gamma`` the band's ends are exact (``u = +-1/2`` gives exactly
    0 and 1), and the last clamp keeps float rounding near them from leaving ``[0, 1]``, so a
    selector's code weights are never negative and binary selectors give exact zeros."""
    u = (t / gamma).clamp(-0.5, 0.5)
    return (u * (1.5 - 2.0 * u * u) + 0.5).clamp(0.0, 1.0)


class DSelectGateBank(GateBank):
    """``G`` DSelect-k gates over ``E`` experts each, computed together; a drop-in for
    :class:`~ranker.modules.GateBank` (same inputs: shared ``(B, In)``, split, or per gate
    ``(B, G, In)``; same output: weights ``(B, G, E)`` summing to 1).

    The linear part is the parent's with ``k * (m + 1)`` outputs per gate: ``k * m`` selector
    logits ``z`` then ``k`` selector weights ``alpha``. In training, :attr:`regulariser` holds
    ``entropy * `` the batch-mean summed entropy of this call's selectors (``None`` in eval).
    """

    def __init__(
        self,
        num_gates: int,
        in_dim: int,
        num_experts: int,
        k: int,
        gamma: float = 1.0,
        entropy: float = 0.0,
    ) -> None:
        if not 1 <= k <= num_experts:
            raise ValueError(f"DSelect-k needs 1 <= k <= {num_experts} experts, got k = {k}")
        if gamma <= 0:
            raise ValueError(f"the smooth-step width gamma must be > 0, got {gamma}")
        m = code_bits(num_experts)
        super().__init__(num_gates, in_dim, k * (m + 1))
        self.num_experts = num_experts  # the parent stored its logit count there
        self.k, self.m, self.gamma, self.entropy = k, m, gamma, entropy
        with torch.no_grad():  # the official initialisers (module docstring)
            z, a = self.weight[..., : k * m], self.weight[..., k * m :]
            z.uniform_(-gamma / 100, gamma / 100)
            a.uniform_(-0.05, 0.05)
            self.bias[:, : k * m].uniform_(-gamma / 100, gamma / 100)
            self.bias[:, k * m :].uniform_(-0.05, 0.05)
        codes = torch.arange(2**m)
        bits = (codes[:, None] >> torch.arange(m - 1, -1, -1)) & 1  # (2^m, m), MSB first
        self.register_buffer("codes", bits.bool(), persistent=False)
        fold = torch.zeros(2**m, num_experts)
        fold[codes, codes % num_experts] = 1.0  # code c selects expert c mod E
        self.register_buffer("fold", fold, persistent=False)
        self.regulariser: Tensor | None = None

    def selectors(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """``(..., k*(m+1))`` logits -> each selector's code distribution ``r (..., k, 2^m)``
        and the selector weights ``softmax(alpha) (..., k)``."""
        k, m = self.k, self.m
        s = smooth_step(logits[..., : k * m], self.gamma)
        s = s.unflatten(-1, (k, 1, m))  # (..., k, 1, m)
        r = torch.where(self.codes, s, 1.0 - s).prod(-1)  # (..., k, 2^m)
        return r, softmax_short(logits[..., k * m :])  # k selectors: a short dim

    def forward(self, x: Tensor | SplitInput) -> Tensor:
        """``x (B, In)`` (or split) or ``(B, G, In)`` -> gate weights ``(B, G, E)``."""
        r, w = self.selectors(self.linear(x))  # (B, G, k, 2^m), (B, G, k)
        codes = (w.unsqueeze(-1) * r).sum(-2)  # (B, G, 2^m)
        self.regulariser = None
        if self.training and self.entropy > 0:
            self.regulariser = self.entropy * self.selector_entropy(_detached(x))
        return codes @ self.fold  # (B, G, E)

    def selector_entropy(self, x: Tensor | SplitInput) -> Tensor:
        """Mean over rows of the summed entropy of every selector's code distribution
        (natural log; 0 when every selector is binary)."""
        r, _ = self.selectors(self.linear(x))
        return -(r * torch.log(r.clamp_min(1e-12))).sum((-1, -2, -3)).mean()

    def flops_per_row(self) -> int:
        g, k, m = self.num_gates, self.k, self.m
        # the linear part; per selector and code a product of m factors; the weighted sum of
        # the selectors; the fold onto the experts
        return 2 * self.weight.numel() + g * k * (2**m) * (m + 2) + 2 * g * 2**m * self.num_experts


def _detached(x: Tensor | SplitInput) -> Tensor | SplitInput:
    if isinstance(x, SplitInput):
        return SplitInput(x.rows.detach(), x.shared.detach(), x.split)
    return x.detach()
