"""Tests for GradNorm (Chen et al., ICML 2018)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import TypeAdapter, ValidationError
from torch import Tensor, nn

from ranker.weighting import SharedPart, WeightingConfig, build_weighting, registry
from ranker.weighting.gradnorm import GradNorm, GradNormConfig
from tests.ranker.weighting.toy import click_watch_losses, train_a_few_steps

torch.set_num_threads(1)

TASKS = ["click", "watch_time"]


class TwoTaskLinear:
    """A linear shared layer and two linear heads; task ``a`` has targets 10x task ``b``'s, so
    its loss is ~100x larger and its gradient on the shared representation ~10x larger."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(32, 6, generator=gen)
        self.y_a = 3.0 * (self.x @ torch.randn(6, 1, generator=gen))
        self.y_b = 0.3 * (self.x @ torch.randn(6, 1, generator=gen))
        torch.manual_seed(0)
        self.shared = nn.Linear(6, 4)
        self.head_a = nn.Linear(4, 1)
        self.head_b = nn.Linear(4, 1)

    def losses(self) -> tuple[Tensor, dict[str, Tensor]]:
        rep = self.shared(self.x)
        return rep, {
            "a": F.mse_loss(self.head_a(rep), self.y_a),
            "b": F.mse_loss(self.head_b(rep), self.y_b),
        }

    def grad_norms(self) -> Tensor:
        rep, losses = self.losses()
        return torch.stack(
            [torch.autograd.grad(losses[t], rep, retain_graph=True)[0].norm() for t in "ab"]
        )

    @torch.no_grad()
    def train_head_a_partly(self) -> None:
        """Moves head a 30% of the way to its least-squares fit: task a 'trains faster'."""
        feats = torch.cat([self.shared(self.x), torch.ones(len(self.x), 1)], 1)
        sol = torch.linalg.lstsq(feats, self.y_a).solution
        self.head_a.weight.mul_(0.7).add_(0.3 * sol[:4].T)
        self.head_a.bias.mul_(0.7).add_(0.3 * sol[4])


def test_registered() -> None:
    assert registry()["gradnorm"] is GradNorm
    config = TypeAdapter(WeightingConfig).validate_python({"name": "gradnorm", "alpha": 0.5})
    assert isinstance(config, GradNormConfig) and config.alpha == 0.5
    assert isinstance(build_weighting(config, TASKS), GradNorm)
    assert GradNormConfig().alpha == 1.5


@pytest.mark.parametrize("alpha", [0.0, 1.5])
def test_weighted_gradient_norms_move_to_their_targets(alpha: float) -> None:
    """After a first step (which records L(0)), head a is moved toward its fit, so task a has
    trained faster (r_a < r_b); the model is then frozen and only the weights learn:
    G_a / G_b must approach the target ratio (r_a / r_b)^alpha (1 for alpha = 0)."""
    toy = TwoTaskLinear()
    gn = GradNorm(["a", "b"], GradNormConfig(alpha=alpha))
    opt = torch.optim.Adam(gn.parameters(), lr=0.02)

    def step() -> dict[str, float]:
        rep, losses = toy.losses()
        opt.zero_grad(set_to_none=True)
        out = gn.backward(losses, SharedPart(list(toy.shared.parameters()), rep))
        opt.step()
        return out

    def log_gap(weights: dict[str, float]) -> float:
        """log(G_a / G_b) - log(target_a / target_b), 0 when the norms have their targets."""
        _, losses = toy.losses()
        inverse_rate = torch.stack([losses["a"], losses["b"]]).detach() / gn.initial_losses
        g = torch.tensor([weights["a"], weights["b"]]) * toy.grad_norms()
        return math.log(g[0] / g[1]) - alpha * math.log(inverse_rate[0] / inverse_rate[1])

    first = step()  # records L(0)
    assert first == {"a": 1.0, "b": 1.0}
    toy.train_head_a_partly()
    start = log_gap({"a": 1.0, "b": 1.0})
    assert start > 2.0  # task a's gradient is far above its target at equal weights
    for _ in range(200):
        weights = step()
        assert all(v > 0 for v in weights.values())
        assert sum(weights.values()) == pytest.approx(2.0, rel=1e-5)
    assert abs(log_gap(weights)) < 0.1 * start
    assert weights["a"] < weights["b"]


def test_model_gets_the_weighted_sum_and_weights_get_only_the_gradnorm_loss() -> None:
    toy = TwoTaskLinear()
    toy.train_head_a_partly()
    gn = GradNorm(["a", "b"], GradNormConfig(alpha=1.5))
    with torch.no_grad():
        gn.loss_weights.copy_(torch.tensor([0.5, 1.5]))
        gn.initial_losses.copy_(torch.tensor([400.0, 1.0]))
        gn.initialised.fill_(True)
    norms = toy.grad_norms()
    rep, losses = toy.losses()
    params = [*toy.shared.parameters(), *toy.head_a.parameters(), *toy.head_b.parameters()]
    out = gn.backward(losses, SharedPart(list(toy.shared.parameters()), rep))
    got = [p.grad.clone() for p in params]

    assert out == pytest.approx({"a": 0.5, "b": 1.5})
    _, again = toy.losses()
    expected = torch.autograd.grad(0.5 * again["a"] + 1.5 * again["b"], params)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)

    # by hand: G_t = w_t n_t, target_t = mean(G) r_t^alpha, grad_w = sign(G - target) * n
    w = torch.tensor([0.5, 1.5])
    ratio = torch.stack([again["a"], again["b"]]).detach() / torch.tensor([400.0, 1.0])
    r = ratio / ratio.mean()
    g = w * norms
    target = g.mean() * r**1.5
    torch.testing.assert_close(gn.loss_weights.grad, torch.sign(g - target) * norms)


def test_weights_are_renormalised_before_use() -> None:
    toy = TwoTaskLinear()
    gn = GradNorm(["a", "b"], GradNormConfig())
    with torch.no_grad():
        gn.loss_weights.copy_(torch.tensor([3.0, 1.0]))  # as if after an optimizer step
    rep, losses = toy.losses()
    assert gn.backward(losses, SharedPart([], rep)) == pytest.approx({"a": 1.5, "b": 0.5})
    with torch.no_grad():
        gn.loss_weights.copy_(torch.tensor([-0.2, 1.0]))  # a too-large step
    rep, losses = toy.losses()
    out = gn.backward(losses, SharedPart([], rep))
    assert out["a"] > 0 and out["a"] + out["b"] == pytest.approx(2.0)


def test_initial_losses_are_the_first_steps_and_survive_a_resume() -> None:
    toy = TwoTaskLinear()
    gn = GradNorm(["a", "b"], GradNormConfig())
    rep, losses = toy.losses()
    first = torch.stack([losses["a"], losses["b"]]).detach()
    gn.backward(losses, SharedPart([], rep))
    toy.train_head_a_partly()
    rep, losses = toy.losses()
    gn.backward(losses, SharedPart([], rep))
    torch.testing.assert_close(gn.initial_losses, first)
    resumed = GradNorm(["a", "b"], GradNormConfig())
    resumed.load_state_dict(gn.state_dict())
    torch.testing.assert_close(resumed.initial_losses, first)
    assert bool(resumed.initialised.all())


def test_a_task_without_labels_in_the_batch_is_left_out() -> None:
    """A loss of exactly 0 (no labelled row) gets no GradNorm gradient, does not enter G_avg or
    the mean training rate, and its L(0) waits for its first positive loss."""
    toy = TwoTaskLinear()
    three = GradNorm(["a", "b", "c"], GradNormConfig())
    two = GradNorm(["a", "b"], GradNormConfig())
    for step in range(2):
        three.loss_weights.grad = two.loss_weights.grad = None
        rep, losses = toy.losses()
        empty = rep.sum() * 0.0
        three.backward({**losses, "c": empty}, SharedPart([], rep))
        rep, losses = toy.losses()
        two.backward(losses, SharedPart([], rep))
        if step == 0:
            assert three.initialised.tolist() == [True, True, False]
            toy.train_head_a_partly()
    assert three.loss_weights.grad[2] == 0
    torch.testing.assert_close(three.loss_weights.grad[:2], two.loss_weights.grad)
    rep, losses = toy.losses()
    three.backward({**losses, "c": rep.mean() ** 2}, SharedPart([], rep))
    assert bool(three.initialised.all())
    assert three.initial_losses[2] == pytest.approx((rep.mean() ** 2).item())


@pytest.mark.parametrize("mode", ["representation", "parameters"])
def test_integration_tiny_model(mode: str) -> None:
    w = GradNorm(TASKS, GradNormConfig(mode=mode))
    logged = train_a_few_steps(w, TASKS, steps=4, losses=click_watch_losses)
    for entry in logged:
        assert set(entry) == set(TASKS)
        assert all(math.isfinite(v) and v > 0 for v in entry.values())
        assert sum(entry.values()) == pytest.approx(2.0, rel=1e-5)
    assert logged[-1] != logged[0]  # the weights learn


@pytest.mark.parametrize("bad", [-0.1, float("nan")])
def test_config_rejects_negative_alpha(bad: float) -> None:
    with pytest.raises(ValidationError) as info:
        GradNormConfig(alpha=bad)
    assert info.value.errors()[0]["loc"] == ("alpha",)
