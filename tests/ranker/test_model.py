import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ranker.config import ModelConfig, TaskSpec
from ranker.heads import head_loss, head_prediction
from ranker.model import RankingModel
from ranker.modules import ColumnSplit

TASKS = ["click", "watch_time", "like", "rating"]


@pytest.mark.parametrize("arch", ["mmoe", "omoe", "shared_bottom"])
def test_every_head_returns_one_value_per_row(arch: str) -> None:
    m = RankingModel(
        [5, 7, 3], 2, TASKS, ModelConfig(architecture=arch, num_experts=3, expert_hidden=[8, 4])
    )
    out = m.forward_detailed(torch.randint(0, 3, (9, 3)), torch.randn(9, 2))
    assert set(out.raw) == set(TASKS)
    assert all(v.shape == (9,) for v in out.raw.values())
    e = 1 if arch == "shared_bottom" else 3
    assert out.representation.shape == (9, e, 4)


def test_experts_start_different() -> None:
    m = RankingModel([5], 2, TASKS, ModelConfig(num_experts=4, expert_hidden=[8]))
    w = m.experts.weights[0]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(w[i], w[j])


def test_fused_experts_equal_separate_mlps() -> None:
    m = RankingModel([5], 3, ["a"], ModelConfig(num_experts=3, expert_hidden=[6, 4]))
    x = torch.randn(5, m.embed.out_dim)
    fused = m.experts(x)
    for e in range(3):
        h = torch.relu(x @ m.experts.weights[0][e] + m.experts.biases[0][e])
        h = torch.relu(h @ m.experts.weights[1][e] + m.experts.biases[1][e])
        assert torch.allclose(fused[:, e], h, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 16), experts=st.integers(1, 5), tasks=st.integers(1, 4))
def test_gates_are_distributions(batch: int, experts: int, tasks: int) -> None:
    m = RankingModel(
        [4, 4],
        1,
        [f"t{i}" for i in range(tasks)],
        ModelConfig(num_experts=experts, expert_hidden=[4]),
    )
    out = m.forward_detailed(torch.randint(0, 4, (batch, 2)), torch.randn(batch, 1))
    assert out.gates is not None
    assert torch.allclose(out.gates.sum(-1), torch.ones(batch, tasks), atol=1e-5)
    assert (out.gates >= 0).all()


def test_bad_hyperparameters_are_refused() -> None:
    with pytest.raises(ValueError):
        RankingModel([0], 1, TASKS, ModelConfig())
    with pytest.raises(ValueError):
        RankingModel([3], 1, [], ModelConfig())


def test_masked_loss_counts_only_masked_rows_and_is_zero_without_any() -> None:
    rating = TaskSpec(
        name="rating", kind="regression", label="rating", loss="mse", value_range=(1, 5)
    )
    raw = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    y = torch.tensor([1.0, 999.0, 5.0])
    loss = head_loss(rating, raw, y, torch.tensor([True, False, True]))
    assert loss.item() == pytest.approx(((1 - 1) ** 2 + (3 - 5) ** 2) / 2)
    empty = head_loss(rating, raw, y, torch.zeros(3, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad
    empty.backward()
    assert raw.grad is not None and (raw.grad == 0).all()


def test_log1p_regression_serves_seconds_and_binary_serves_probabilities() -> None:
    wt = TaskSpec(name="watch_time", kind="regression", label="w", loss="mse_log1p")
    raw = torch.log1p(torch.tensor([0.0, 9.0, 99.0]))
    assert torch.allclose(head_prediction(wt, raw), torch.tensor([0.0, 9.0, 99.0]), atol=1e-4)
    loss = head_loss(wt, raw, torch.tensor([0.0, 9.0, 99.0]), torch.ones(3, dtype=torch.bool))
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    click = TaskSpec(name="click", kind="binary", label="c", loss="bce")
    assert head_prediction(click, torch.tensor([0.0])).item() == 0.5
    rating = TaskSpec(name="rating", kind="regression", label="r", loss="mse", value_range=(1, 5))
    assert head_prediction(rating, torch.tensor([-3.0, 9.0])).tolist() == [1.0, 5.0]


@pytest.mark.parametrize("arch", ["mmoe", "omoe", "shared_bottom", "ple"])
@pytest.mark.parametrize("batch", [1, 13])
def test_shared_columns_computed_once_give_the_same_outputs(arch: str, batch: int) -> None:
    """One request's rows agree on the user's and the context's columns; computing their share
    of every first layer once (ColumnSplit) must not change any output, nor the gates."""
    cfg = ModelConfig(
        architecture=arch,
        embedding_dim=4,
        num_experts=3,
        expert_hidden=[16, 8],
        tower_hidden=[8],
        ple_levels=2,
        task_experts=1,
        shared_experts=2,
    )
    torch.manual_seed(0)
    m = RankingModel([5, 7, 9, 4], 3, TASKS, cfg, cat_widths=[1, 2, 1, 1]).eval()
    cat = torch.randint(0, 4, (batch, 5))
    num = torch.randn(batch, 3)
    cat[:, 0], cat[:, 4], num[:, 1] = 2, 1, 0.5  # features 0 and 3, numeric 1: the "request"
    split = m.column_split([0, 3], [1])
    assert split.shared.tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 17]
    plain, once = m.forward_detailed(cat, num), m.forward_detailed(cat, num, split)
    for t in TASKS:
        assert once.raw[t].shape == (batch,)
        torch.testing.assert_close(once.raw[t], plain.raw[t], rtol=1e-5, atol=1e-6)
    if plain.gates is not None:
        torch.testing.assert_close(once.gates, plain.gates, rtol=1e-5, atol=1e-6)
    # a column that differs between rows must not be declared shared: then outputs differ
    wrong = m.column_split([0, 1, 3], [1])  # feature 1 varies
    if batch > 1:
        out = m(cat, num, wrong)
        assert any(not torch.allclose(out[t], plain.raw[t], atol=1e-4) for t in TASKS)


@pytest.mark.parametrize(
    "shared", [[], [0], [9], [0, 1, 2], [3, 4, 7, 8, 9], [1, 3, 5, 7], list(range(10))]
)
def test_column_split_slices_select_exactly_the_indexed_columns(shared: list[int]) -> None:
    """The split selects columns by runs of slices (no gather); they must be exactly the
    indexed columns, in order, whatever the runs look like (none, one, many, all)."""
    x = torch.randn(6, 10)
    split = ColumnSplit.of(10, shared)
    part = split.apply(x)
    torch.testing.assert_close(part.rows, x[:, split.rows], rtol=0, atol=0)
    torch.testing.assert_close(part.shared, x[:1, split.shared], rtol=0, atol=0)
    assert part.rows.shape == (6, 10 - len(shared)) and part.shared.shape == (1, len(shared))


def test_column_split_built_from_index_tensors_keeps_their_order() -> None:
    x = torch.randn(3, 6)
    split = ColumnSplit(torch.tensor([4, 0, 1]), torch.tensor([2, 3, 5]))
    torch.testing.assert_close(split.apply(x).shared, x[:1, [4, 0, 1]], rtol=0, atol=0)
    torch.testing.assert_close(split.apply(x).rows, x[:, [2, 3, 5]], rtol=0, atol=0)


def test_column_split_refuses_columns_outside_the_input() -> None:
    m = RankingModel([5], 2, TASKS, ModelConfig(num_experts=2, expert_hidden=[4]))
    with pytest.raises(ValueError, match="outside an input of"):
        ColumnSplit.of(m.embed.out_dim, [0, m.embed.out_dim])


@pytest.mark.parametrize("arch", ["mmoe", "shared_bottom", "ple"])
def test_split_flops_count_what_each_candidate_still_multiplies(arch: str) -> None:
    cfg = ModelConfig(architecture=arch, embedding_dim=4, num_experts=3, expert_hidden=[16, 8])
    m = RankingModel([5, 7], 2, TASKS, cfg)
    split = m.column_split([0], [1])  # 5 of 10 input columns
    saved = m.flops_per_row() - m.flops_per_row(split)
    if arch == "mmoe":  # experts' first layer (3 x 16 outputs) and the 4 gates over 3 experts
        assert saved == 2 * 5 * (3 * 16 + 4 * 3)
    assert 0 < saved < m.flops_per_row()


def test_softmax_short_is_torch_softmax_on_gate_logits() -> None:
    """The gates' softmax (``exp(x - max) / sum``, faster than torch's kernel on a short last
    dim) equals ``torch.softmax`` on 500 random logit tensors: widths 1-16, scales from 1e-3 to
    1e4 (``exp`` overflows without the max), ties, and dropped experts at ``-inf``."""
    from ranker.modules import softmax_short

    gen = torch.Generator().manual_seed(0)
    for case in range(500):
        width = int(torch.randint(1, 17, (1,), generator=gen))
        scale = 10 ** float(torch.empty(1).uniform_(-3, 4, generator=gen))
        x = torch.randn(int(torch.randint(1, 50, (1,), generator=gen)), 3, width, generator=gen)
        x = x * scale
        if case % 5 == 0:  # ties
            x = x.round()
        if case % 3 == 0 and width > 1:  # dropped experts, never a whole row
            drop = torch.rand(x.shape, generator=gen) < 0.4
            drop[..., 0] = False
            x = x.masked_fill(drop, float("-inf"))
        got, ref = softmax_short(x), torch.softmax(x, dim=-1)
        assert torch.isfinite(got).all(), case
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=f"case {case}")
        torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]), rtol=0, atol=1e-5)
