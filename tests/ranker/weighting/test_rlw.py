"""Tests for Random Loss Weighting (Lin et al., TMLR 2022)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from ranker.weighting import SharedPart, WeightingConfig, build_weighting, registry
from ranker.weighting.rlw import RLW, RLWConfig
from tests.ranker.weighting.toy import click_watch_losses, train_a_few_steps

torch.set_num_threads(1)

TASKS = ["click", "watch_time"]


THREE = ["click", "like", "watch_time"]


def draws(w: RLW, n: int) -> list[list[float]]:
    losses = torch.ones(len(w.tasks))
    return [w.weights(losses).tolist() for _ in range(n)]


def test_registered() -> None:
    assert registry()["rlw"] is RLW
    config = TypeAdapter(WeightingConfig).validate_python({"name": "rlw", "seed": 3})
    assert isinstance(config, RLWConfig) and config.seed == 3
    assert isinstance(build_weighting(config, TASKS), RLW)


def test_weights_positive_sum_to_t_and_change_every_step() -> None:
    samples = draws(RLW(THREE, RLWConfig(seed=0)), 50)
    for ws in samples:
        assert all(v > 0 for v in ws)
        assert sum(ws) == pytest.approx(3.0, rel=1e-6)
    assert all(a != b for a, b in zip(samples, samples[1:], strict=False))


def test_weights_are_t_times_softmax_of_standard_normal_samples() -> None:
    got = torch.tensor(draws(RLW(THREE, RLWConfig(seed=7)), 4), dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)
    eps = torch.stack([torch.randn(3, generator=gen, dtype=torch.float64) for _ in range(4)])
    torch.testing.assert_close(got, 3 * torch.softmax(eps, dim=1).float().double())
    # each task's weight has mean 1 (the softmax of i.i.d. samples is exchangeable)
    many = torch.tensor(draws(RLW(THREE, RLWConfig(seed=1)), 3000))
    assert many.mean(0).tolist() == pytest.approx([1.0, 1.0, 1.0], abs=0.05)


def test_reproducible_with_a_seed() -> None:
    assert draws(RLW(THREE, RLWConfig(seed=5)), 5) == draws(RLW(THREE, RLWConfig(seed=5)), 5)
    assert draws(RLW(THREE, RLWConfig(seed=5)), 5) != draws(RLW(THREE, RLWConfig(seed=6)), 5)
    # without a seed: fixed by torch's global seed at construction
    with torch.random.fork_rng():
        torch.manual_seed(123)
        first = draws(RLW(THREE, RLWConfig()), 5)
        torch.manual_seed(123)
        assert draws(RLW(THREE, RLWConfig()), 5) == first


def test_sampler_state_survives_a_resume() -> None:
    w = RLW(THREE, RLWConfig(seed=9))
    draws(w, 3)
    state = w.state_dict()
    resumed = RLW(THREE, RLWConfig(seed=1))
    resumed.load_state_dict(state)
    assert draws(resumed, 4) == draws(w, 4)


def test_backward_uses_and_reports_the_sampled_weights() -> None:
    w = RLW(TASKS, RLWConfig(seed=2))
    expected = draws(RLW(TASKS, RLWConfig(seed=2)), 1)[0]
    losses = torch.tensor([0.3, 8.0], requires_grad=True)
    out = w.backward(dict(zip(TASKS, losses, strict=True)), SharedPart([]))
    assert [out[t] for t in TASKS] == pytest.approx(expected)
    assert losses.grad.tolist() == pytest.approx(expected)


def test_integration_tiny_model() -> None:
    w = RLW(TASKS, RLWConfig(seed=0))
    logged = train_a_few_steps(w, TASKS, steps=4, losses=click_watch_losses)
    for entry in logged:
        assert set(entry) == set(TASKS)
        assert all(math.isfinite(v) and v > 0 for v in entry.values())
        assert sum(entry.values()) == pytest.approx(2.0, rel=1e-6)
    assert len({entry["click"] for entry in logged}) == len(logged)


@pytest.mark.parametrize("bad", [-1, 2**63, "abc"])
def test_config_rejects_a_bad_seed(bad: object) -> None:
    with pytest.raises(ValidationError) as info:
        RLWConfig(seed=bad)
    assert info.value.errors()[0]["loc"][0] == "seed"
