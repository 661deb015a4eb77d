"""Tests for PCGrad (Yu et al., NeurIPS 2020)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from ranker.weighting.pcgrad import Pcgrad, PcgradConfig, project_conflicting
from tests.ranker.weighting.toy import (
    assert_zero_gradient_task_is_left_out,
    build_from_raw,
    train_a_few_steps,
)

torch.set_num_threads(1)

TASKS = ["click", "watch_time", "like"]
EPS = 1e-9


def test_two_tasks_closed_form() -> None:
    g1 = torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64)
    g2 = torch.tensor([-1.0, 2.0, 1.0], dtype=torch.float64)
    assert float(g1 @ g2) < 0
    d, w = Pcgrad(TASKS[:2], PcgradConfig()).combine(torch.stack([g1, g2]), torch.ones(2))
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    torch.testing.assert_close(d, p1 + p2)
    # Each projected gradient is orthogonal to the other original one: no conflict left.
    projected, _ = project_conflicting(torch.stack([g1, g2]), [[1], [0]])
    assert abs(float(projected[0] @ g2)) < EPS and abs(float(projected[1] @ g1)) < EPS
    torch.testing.assert_close(
        w, torch.tensor([1 - (g2 @ g1) / (g1 @ g1), 1 - (g1 @ g2) / (g2 @ g2)])
    )


def test_non_conflicting_gradients_are_left_unchanged() -> None:
    gen = torch.Generator().manual_seed(0)
    g = torch.rand(3, 5, generator=gen, dtype=torch.float64)  # all positive: every dot > 0
    for _ in range(3):
        d, w = Pcgrad(TASKS, PcgradConfig()).combine(g, torch.ones(3))
        torch.testing.assert_close(d, g.sum(0))
        assert w.tolist() == [1.0, 1.0, 1.0]
    # Only the conflicting pair is touched: task 2 is orthogonal-free of conflicts here.
    g = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    projected, _ = project_conflicting(g, [[1, 2], [0, 2], [0, 1]])
    torch.testing.assert_close(projected[2], g[2])
    torch.testing.assert_close(projected[0], torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("seed", range(8))
def test_no_conflict_with_the_gradient_last_projected_against(seed: int) -> None:
    """After the projection onto the normal plane of g_j, <g_i^PC, g_j> = 0; a later projection
    (against g_k) can re-introduce a conflict with g_j in general, so the invariant that always
    holds is with the last gradient visited; with two tasks that is the whole property."""
    gen = torch.Generator().manual_seed(seed)
    t = 2 + seed % 3
    g = torch.randn(t, 6, generator=gen, dtype=torch.float64)
    weighting = Pcgrad([f"task{i}" for i in range(t)], PcgradConfig(seed=seed))
    orders = weighting.orders(t)
    projected, coef = project_conflicting(g, orders)
    scale = float((g * g).sum(1).max())
    for i, order in enumerate(orders):
        assert sorted(order) == [j for j in range(t) if j != i]
        assert float(projected[i] @ g[order[-1]]) >= -EPS * scale
        if t == 2:
            assert float(projected[i] @ g[1 - i]) >= -EPS * scale
    torch.testing.assert_close(projected, coef @ g)
    # Each single projection step removes exactly the conflict with the gradient it used.
    for i, order in enumerate(orders):
        gi = g[i].clone()
        for j in order:
            if gi @ g[j] < 0:
                gi = gi - (gi @ g[j]) / (g[j] @ g[j]) * g[j]
                assert abs(float(gi @ g[j])) <= EPS * scale
        torch.testing.assert_close(gi, projected[i])


def test_seeded_and_resumable() -> None:
    g = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a, b = Pcgrad(TASKS, PcgradConfig(seed=7)), Pcgrad(TASKS, PcgradConfig(seed=7))
    assert a.orders(3) == b.orders(3)
    a.combine(g, torch.ones(3))
    a.combine(g, torch.ones(3))
    resumed = Pcgrad(TASKS, PcgradConfig(seed=7))
    resumed.load_state_dict(a.state_dict())
    assert int(resumed.step) == 2 and resumed.orders(3) == a.orders(3)
    # Over many steps the orders differ (they are random).
    seen = set()
    for _ in range(20):
        seen.add(tuple(map(tuple, b.orders(3))))
        b.combine(g, torch.ones(3))
    assert len(seen) > 1


def test_a_task_without_labels_in_the_batch_is_left_out() -> None:
    assert_zero_gradient_task_is_left_out(lambda tasks: Pcgrad(tasks, PcgradConfig()), TASKS)


# --- integration -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["representation", "parameters"])
def test_integration_tiny_model(mode: str) -> None:
    weighting = build_from_raw({"name": "pcgrad", "mode": mode}, TASKS)
    assert isinstance(weighting, Pcgrad)
    train_a_few_steps(weighting, TASKS)
    assert int(weighting.step) == 3


@pytest.mark.parametrize(("field", "value"), [("seed", -1), ("seed", "x"), ("mode", "both")])
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        PcgradConfig(**{field: value})
    assert field in str(info.value)
