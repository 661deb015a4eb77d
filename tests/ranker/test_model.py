import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ranker.config import ModelConfig, TaskSpec
from ranker.heads import head_loss, head_prediction
from ranker.model import RankingModel

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
