"""Cross-stitch networks (Misra et al., CVPR 2016): the model is task columns mixed by the units,
exactly; at identity units it is independent columns; the units are learned and mix."""

from __future__ import annotations

import torch
from torch import Tensor

from ranker.config import ModelConfig
from ranker.cross_stitch import stitch_init
from ranker.model import RankingModel

TASKS = ["click", "watch_time", "like"]


def model(hidden: list[int], self_weight: float = 0.9, seed: int = 0) -> RankingModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        architecture="cross_stitch",
        expert_hidden=hidden,
        tower_hidden=[8],
        embedding_dim=3,
        stitch_self=self_weight,
    )
    return RankingModel([5, 7, 4], 2, TASKS, cfg, cat_widths=[1, 1, 3])


def inputs(b: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, (b, 5), generator=g), torch.randn(b, 2, generator=g)


def reference(m: RankingModel, cat: Tensor, num: Tensor) -> dict[str, Tensor]:
    """The paper's recurrence written out per task: column ``j``'s layer ``l`` is its own
    ``relu(x W_j + b_j)``, then ``h~_i = sum_j alpha_ij h_j``; task ``i``'s tower reads ``h~_i``."""
    assert m.columns is not None
    x = m.embed(cat, num).double()
    hs = [x] * len(TASKS)
    for layer, alpha in zip(m.columns.layers, m.columns.units, strict=True):
        w, b = layer.weights[0].double(), layer.biases[0].double()  # (T, In, H), (T, 1, H)
        own = [torch.relu(hs[j] @ w[j] + b[j]) for j in range(len(TASKS))]
        a = alpha.double()
        hs = [sum(a[i, j] * own[j] for j in range(len(TASKS))) for i in range(len(TASKS))]
    return {t: m.towers[t].double()(hs[i]).squeeze(-1) for i, t in enumerate(TASKS)}


def test_the_model_is_the_columns_mixed_by_the_units_over_many_random_units() -> None:
    """200 random unit matrices (scales from 1e-3 to 1e3, near-singular ones included)."""
    g = torch.Generator().manual_seed(1)
    for case in range(200):
        m = model([6, 5] if case % 2 else [7], seed=case)
        assert m.columns is not None
        with torch.no_grad():
            for alpha in m.columns.units:
                scale = 10.0 ** (torch.rand(1, generator=g).item() * 6 - 3)
                a = torch.randn(3, 3, generator=g, dtype=torch.float64) * scale
                if case % 5 == 0:  # rank one: every task gets the same mix
                    a = torch.outer(torch.ones(3, dtype=torch.float64), a[0])
                alpha.copy_(a)
        cat, num = inputs(9, case)
        got = m(cat, num)
        want = reference(m, cat, num)
        for t in TASKS:
            torch.testing.assert_close(got[t].double(), want[t], rtol=1e-4, atol=1e-4)


def test_identity_units_make_the_model_independent_task_columns() -> None:
    m = model([16, 8], self_weight=1.0)
    assert m.columns is not None
    for alpha in m.columns.units:
        assert torch.equal(alpha, torch.eye(3))
    cat, num = inputs(32, 0)
    # each task's output equals its own column's MLP and tower, nothing of the others
    x = m.embed(cat, num)
    out = m(cat, num)
    for i, t in enumerate(TASKS):
        h = x
        for layer in m.columns.layers:
            h = torch.relu(h @ layer.weights[0][i] + layer.biases[0][i])
        torch.testing.assert_close(out[t], m.towers[t](h).squeeze(-1))
    # ... and no gradient of a task reaches another task's column
    for i, t in enumerate(TASKS):
        m.zero_grad(set_to_none=True)
        m(cat, num)[t].sum().backward()
        for layer in m.columns.layers:
            grad = layer.weights[0].grad
            assert grad is not None
            others = [j for j in range(3) if j != i]
            assert grad[i].abs().sum() > 0 and torch.equal(
                grad[others], torch.zeros_like(grad[others])
            )


def test_units_start_near_identity_with_rows_that_sum_to_one() -> None:
    for t in range(1, 7):
        for s in (0.5, 0.9, 1.0):
            a = stitch_init(t, s)
            torch.testing.assert_close(a.sum(1), torch.ones(t))
            assert torch.allclose(a.diagonal(), torch.full((t,), s if t > 1 else 1.0))


def test_units_are_learned_and_mix_the_tasks() -> None:
    """Gradients reach every unit entry, training moves them, and with off-diagonal weight a
    task's loss reaches every other task's column (what independent columns cannot do)."""
    m = model([16, 8])
    assert m.columns is not None
    cat, num = inputs(256, 3)
    m.zero_grad(set_to_none=True)
    m(cat, num)["click"].sum().backward()
    for layer in m.columns.layers:
        assert layer.weights[0].grad is not None
        assert (layer.weights[0].grad.flatten(1).abs().sum(1) > 0).all()  # every column
    first, last = m.columns.units[0].grad, m.columns.units[-1].grad
    assert first is not None and last is not None
    assert (first.abs() > 0).all()  # deeper layers mix again: every entry matters
    assert (last[0].abs() > 0).all() and torch.equal(last[1:], torch.zeros(2, 3))
    # a few steps toward targets on which the tasks agree move the units off their start
    start = [a.detach().clone() for a in m.columns.units]
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    target = torch.randn(256)
    for _ in range(30):
        opt.zero_grad()
        out = m(cat, num)
        sum(((out[t] - target) ** 2).mean() for t in TASKS).backward()
        opt.step()
    for a, a0 in zip(m.columns.units, start, strict=True):
        assert (a.detach() - a0).abs().max() > 0.05
