"""DSelect-k gates (Hazimeh et al., NeurIPS 2021): the smooth-step, weights that are a
distribution, at most k experts once the selectors are binary, gradients that flow, and the
entropy regulariser in training only, reaching the gates alone."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

from ranker.config import ModelConfig
from ranker.dselect import DSelectGateBank, code_bits, smooth_step
from ranker.model import RankingModel

TASKS = ["click", "watch_time", "like"]


def random_gate(g: torch.Generator) -> tuple[DSelectGateBank, Tensor]:
    """A gate bank of random size with logits at a random scale (1e-3 .. 1e3: from the
    near-uniform start to saturated), and a batch of inputs (shared or per gate)."""
    e = int(torch.randint(1, 12, (1,), generator=g))
    k = int(torch.randint(1, e + 1, (1,), generator=g))
    gates = int(torch.randint(1, 4, (1,), generator=g))
    gamma = float(10 ** (torch.rand(1, generator=g) * 2 - 1))
    bank = DSelectGateBank(gates, 5, e, k, gamma, entropy=0.1)
    with torch.no_grad():
        scale = float(10 ** (torch.rand(1, generator=g) * 6 - 3))
        bank.weight.copy_(torch.randn(bank.weight.shape, generator=g) * scale)
        bank.bias.copy_(torch.randn(bank.bias.shape, generator=g) * scale)
    shape = (16, 5) if torch.rand(1, generator=g) < 0.5 else (16, gates, 5)
    return bank, torch.randn(shape, generator=g)


def test_smooth_step_is_0_then_a_cubic_then_1() -> None:
    for gamma in (0.1, 1.0, 7.0):
        t = torch.linspace(-gamma, gamma, 2001, dtype=torch.float64)
        s = smooth_step(t, gamma)
        assert torch.equal(s[t <= -gamma / 2], torch.zeros_like(s[t <= -gamma / 2]))
        assert torch.equal(s[t >= gamma / 2], torch.ones_like(s[t >= gamma / 2]))
        assert (s.diff() >= 0).all() and smooth_step(torch.zeros(1), gamma).item() == 0.5
        torch.testing.assert_close(s + smooth_step(-t, gamma), torch.ones_like(s))
        inside = t.abs() < gamma / 2
        cubic = -2 * t**3 / gamma**3 + 3 * t / (2 * gamma) + 0.5
        torch.testing.assert_close(s[inside], cubic[inside])


def test_weights_are_a_distribution_over_many_random_gates() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        bank, x = random_gate(g)
        w = bank(x)
        assert w.shape == (16, bank.num_gates, bank.num_experts)
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(16, bank.num_gates))


def test_binary_selectors_select_at_most_k_experts() -> None:
    """Once every smooth-step is exactly 0 or 1 (logits beyond gamma/2), each selector is
    one-hot on a code and the gate gives non-zero weight to at most k experts."""
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        bank, x = random_gate(g)
        with torch.no_grad():  # push every z logit out of the band, keep its sign
            km = bank.k * bank.m
            bank.weight[..., :km].zero_()
            sign = torch.where(torch.rand(bank.bias[:, :km].shape, generator=g) < 0.5, -1.0, 1.0)
            bank.bias[:, :km].copy_(sign * bank.gamma)
        w = bank(x)
        assert ((w > 0).sum(-1) <= bank.k).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(16, bank.num_gates))
        assert bank.selector_entropy(x).abs().item() < 1e-9  # binary: nothing left to push


def test_selector_codes_are_the_product_of_bits_and_fold_onto_c_mod_e() -> None:
    """Written out: code c's weight is prod_l (s_l if bit l of c else 1 - s_l) (bits most
    significant first); expert e gets the codes c with c mod E = e."""
    g = torch.Generator().manual_seed(2)
    for e in (1, 2, 3, 4, 5, 6, 8, 9):
        bank = DSelectGateBank(1, 4, e, 1, gamma=1.0)
        with torch.no_grad():
            bank.weight.normal_(generator=g)
        x = torch.randn(7, 4, generator=g)
        m = code_bits(e)
        s = smooth_step(bank.linear(x)[:, 0, :m], 1.0).double()  # (7, m), one selector
        want = torch.zeros(7, e, dtype=torch.float64)
        for c, bits in enumerate(itertools.product((0, 1), repeat=m)):
            p = torch.ones(7, dtype=torch.float64)
            for bit, sl in zip(bits, s.T, strict=True):
                p = p * (sl if bit else 1 - sl)
            want[:, c % e] += p
        torch.testing.assert_close(bank(x)[:, 0].double(), want, rtol=1e-5, atol=1e-6)


def test_near_uniform_start_on_a_power_of_two() -> None:
    bank = DSelectGateBank(2, 10, 8, 2, gamma=1.0)
    w = bank(torch.randn(100, 10))
    # every selector bit starts near 1/2 (z within +-gamma/100 of 0 per input): each expert
    # near 1/8, and 1/8 on average over rows
    assert ((w > 1 / 16) & (w < 1 / 4)).all()
    torch.testing.assert_close(w.mean(0), torch.full((2, 8), 1 / 8), atol=0.01, rtol=0)


def test_gradients_flow_to_selector_logits_and_selector_weights() -> None:
    torch.manual_seed(0)
    bank = DSelectGateBank(2, 6, 5, 3, gamma=1.0)
    x = torch.randn(64, 6, requires_grad=True)
    experts = torch.randn(64, 5)
    (bank(x) * experts.unsqueeze(1)).sum().backward()
    km = bank.k * bank.m
    assert bank.weight.grad is not None and x.grad is not None
    assert (bank.weight.grad[..., :km].abs().sum((0, 1)) > 0).all()  # every z logit
    assert (bank.weight.grad[..., km:].abs().sum((0, 1)) > 0).all()  # every selector weight
    assert x.grad.abs().sum() > 0


def test_entropy_regulariser_trains_the_selectors_to_binary() -> None:
    """Minimising the regulariser alone makes most selectors exactly binary (entropy exactly
    0, other experts' weights exactly 0) in finite steps, which the smooth-step allows and a
    sigmoid would not; rows whose logits sit near 0 are the ones left in the band."""
    torch.manual_seed(0)
    bank = DSelectGateBank(3, 4, 6, 2, gamma=1.0, entropy=1.0)
    bank.train()
    x = torch.randn(128, 4)
    opt = torch.optim.Adam(bank.parameters(), lr=0.05)
    start = bank.selector_entropy(x).item()
    assert ((bank(x) > 0).sum(-1) == 6).all()  # a dense start
    for _ in range(300):
        opt.zero_grad()
        bank(x)
        assert bank.regulariser is not None
        bank.regulariser.backward()
        opt.step()
    assert start > 1.0 and bank.selector_entropy(x).item() < 0.01 * start
    assert ((bank(x) > 0).sum(-1) <= 2).float().mean() > 0.8


def test_model_regulariser_in_training_only_and_reaching_the_gates_alone() -> None:
    cfg = ModelConfig(
        architecture="mmoe",
        gate="dselect_k",
        dselect_k=2,
        dselect_entropy=0.5,
        num_experts=4,
        expert_hidden=[8],
        tower_hidden=[4],
        embedding_dim=3,
    )
    m = RankingModel([5, 7, 4], 2, TASKS, cfg, cat_widths=[1, 1, 3])
    cat, num = torch.randint(0, 4, (32, 5)), torch.randn(32, 2)
    m.eval()
    assert m.forward_detailed(cat, num).regulariser is None
    m.train()
    out = m.forward_detailed(cat, num)
    assert out.regulariser is not None and out.regulariser.item() > 0
    assert m.dselect is not None
    x = m.embed(cat, num).detach()
    torch.testing.assert_close(out.regulariser, 0.5 * m.dselect.selector_entropy(x))
    out.regulariser.backward()
    reached = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached == {"dselect.weight", "dselect.bias"}


@pytest.mark.parametrize("arch", ["mmoe", "omoe", "ple"])
def test_softmax_models_have_no_regulariser(arch: str) -> None:
    cfg = ModelConfig(architecture=arch, expert_hidden=[8], tower_hidden=[4], embedding_dim=3)  # type: ignore[arg-type]
    m = RankingModel([5, 7, 4], 2, TASKS, cfg, cat_widths=[1, 1, 3]).train()
    assert m.forward_detailed(torch.randint(0, 4, (4, 5)), torch.randn(4, 2)).regulariser is None
