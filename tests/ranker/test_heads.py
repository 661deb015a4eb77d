"""Each head's loss on hand-computed examples, and what its served prediction means."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from ranker.config import TaskSpec, parse_config
from ranker.errors import ConfigError
from ranker.heads import HeadStats, head_distribution, head_loss, head_prediction, output_dim
from tests.conftest import DEFAULT_CONFIG, tiny_overrides

WL = TaskSpec(name="watch_time", kind="regression", label="watch_time", loss="weighted_logistic")
ORD = TaskSpec(name="rating", kind="regression", label="rating", loss="ordinal", levels=3)
ALL = torch.ones(4, dtype=torch.bool)


def test_bce_with_row_weights_is_the_weighted_mean() -> None:
    t = TaskSpec(name="click", kind="binary", label="click", loss="bce")
    raw = torch.tensor([0.0, 2.0, -1.0, 0.5])
    y = torch.tensor([1.0, 0.0, 0.0, 1.0])
    w = torch.tensor([1.0, 3.0, 0.0, 2.0])
    per = [
        math.log(2),
        math.log(1 + math.exp(2)),
        math.log(1 + math.exp(-1)),
        math.log(1 + math.exp(-0.5)),
    ]
    expected = (per[0] * 1 + per[1] * 3 + per[3] * 2) / 6
    assert head_loss(t, raw, y, ALL, w).item() == pytest.approx(expected, rel=1e-6)


def test_weighted_logistic_on_a_hand_example() -> None:
    raw = torch.tensor([0.0, 0.0, math.log(3.0), 0.0])
    y = torch.tensor([10.0, 0.0, 30.0, 0.0])  # two watched rows weighted 10 and 30
    lp = math.log(1 + math.exp(-math.log(3.0)))  # -log sigmoid(log 3)
    expected = (10 * math.log(2) + 1 * math.log(2) + 30 * lp + 1 * math.log(2)) / (10 + 1 + 30 + 1)
    assert head_loss(WL, raw, y, ALL).item() == pytest.approx(expected, rel=1e-6)
    assert head_prediction(WL, raw).tolist() == pytest.approx([1.0, 1.0, 3.0, 1.0])


def test_weighted_logistic_odds_recover_mean_watch_time() -> None:
    """Covington et al.: the odds of the weighted logistic equal sum(T) / N_negative, which is
    close to E[T] per impression when watching is rare."""
    rng = np.random.default_rng(0)
    n = 20000
    watched = rng.random(n) < 0.05
    y = torch.tensor(np.where(watched, rng.exponential(120.0, n), 0.0), dtype=torch.float32)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([b], lr=1, max_iter=100)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = head_loss(WL, b.expand(n), y, torch.ones(n, dtype=torch.bool))
        loss.backward()
        return loss

    opt.step(closure)
    odds = head_prediction(WL, b.detach()).item()
    assert odds == pytest.approx(y.sum().item() / (n - watched.sum()), rel=1e-3)
    assert odds == pytest.approx(y.mean().item(), rel=0.08)
    stats = HeadStats(WL)
    stats.add(y.numpy())
    assert math.exp(stats.bias()[0]) == pytest.approx(odds, rel=1e-3)


def test_ordinal_distribution_loss_and_expectation_by_hand() -> None:
    raw = torch.zeros(1, 2)  # c1 = 0, c2 = -softplus(0) = -log 2
    probs = head_distribution(ORD, raw)[0]
    assert probs.tolist() == pytest.approx([0.5, 1 / 6, 1 / 3], abs=1e-6)
    assert head_prediction(ORD, raw).item() == pytest.approx(1 + 0.5 + 1 / 3, abs=1e-6)
    loss = head_loss(ORD, raw, torch.tensor([2.0]), torch.ones(1, dtype=torch.bool))
    assert loss.item() == pytest.approx(-math.log(1 / 6), rel=1e-5)
    assert output_dim(ORD) == 2


def test_ordinal_distribution_is_valid_for_any_raw_output() -> None:
    raw = torch.randn(200, 4) * 5
    t = TaskSpec(name="r", kind="regression", label="r", loss="ordinal", levels=5)
    p = head_distribution(t, raw)
    assert (p >= 0).all() and torch.allclose(p.sum(1), torch.ones(200), atol=1e-5)
    e = head_prediction(t, raw)
    assert ((e >= 1) & (e <= 5)).all()


def test_ordinal_start_bias_reproduces_the_label_histogram() -> None:
    t = TaskSpec(name="r", kind="regression", label="r", loss="ordinal", levels=5)
    labels = np.repeat([1, 2, 3, 4, 5], [10, 5, 20, 40, 25]).astype(float)
    stats = HeadStats(t)
    stats.add(labels)
    probs = head_distribution(t, torch.tensor([stats.bias()]))[0]
    assert probs.tolist() == pytest.approx([0.10, 0.05, 0.20, 0.40, 0.25], abs=1e-3)


def test_ordinal_requires_levels() -> None:
    with pytest.raises(ValueError, match="levels"):
        TaskSpec(name="r", kind="regression", label="r", loss="ordinal")


def _config(world: Path, tmp: Path, edit) -> object:  # noqa: ANN001
    from ranker.config import _apply_override

    data = tomllib.loads(DEFAULT_CONFIG.read_text())
    for o in tiny_overrides(world, tmp):
        _apply_override(data, o)
    edit(data)
    return parse_config(data)


def test_trainer_runs_weighted_logistic_ordinal_task_spaces_and_weights(
    tiny_world: Path, tmp_path: Path
) -> None:
    from training.loop import train

    def edit(d: dict) -> None:
        tasks = {t["name"]: t for t in d["tasks"]}
        tasks["watch_time"]["loss"] = "weighted_logistic"
        tasks["rating"].update(loss="ordinal", levels=5, only_where="click")
        tasks["like"].update(only_where="click", weight_column="watch_time")
        d["training"]["epochs"] = 1

    r = train(_config(tiny_world, tmp_path, edit), progress=False, export=True)
    assert r.metrics["like"]["count"] < r.metrics["click"]["count"]  # task space: clicked rows
    from ranker.artifact import load_artifact

    a = load_artifact(r.artifact)
    assert a.model.output_dims["rating"] == 4
    assert np.isfinite(r.metrics["rating"]["rmse"]) and np.isfinite(r.metrics["watch_time"]["rmse"])


def test_unknown_weight_column_is_named(tiny_world: Path, tmp_path: Path) -> None:
    from ranker.errors import DataError
    from training.loop import train

    def edit(d: dict) -> None:
        d["tasks"][0]["weight_column"] = "no_such_column"

    with pytest.raises(DataError, match=r"no_such_column"):
        train(_config(tiny_world, tmp_path, edit), progress=False, export=False)


def test_ordinal_loss_on_a_binary_task_is_refused(tiny_world: Path, tmp_path: Path) -> None:
    def edit(d: dict) -> None:
        d["tasks"][0].update(loss="ordinal", levels=5)

    with pytest.raises(ConfigError, match=r"tasks\[0\]"):
        _config(tiny_world, tmp_path, edit)


ZILN = TaskSpec(name="watch_time", kind="regression", label="watch_time", loss="ziln")


def _ziln_sample(rng: np.random.Generator, n: int) -> tuple[np.ndarray, float, float, float]:
    p, mu, sigma = rng.uniform(0.05, 0.95), rng.uniform(-3, 5), rng.uniform(0.1, 2.5)
    y = np.where(rng.random(n) < p, rng.lognormal(mu, sigma, n), 0.0)
    return y, p, mu, sigma


def test_ziln_loss_is_the_closed_form_negative_log_likelihood() -> None:
    """Against the zero-inflated lognormal density written out by hand, over many random
    parameter sets (tiny and wide sigmas, rare and common zeros)."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        y, p, mu, sigma = _ziln_sample(rng, 64)
        start = [math.log(p / (1 - p)), mu, math.log(math.expm1(sigma))]
        raw = torch.tensor([start] * len(y), dtype=torch.float64)
        pos = y > 0
        y1 = np.where(pos, y, 1.0)
        dens = np.exp(-((np.log(y1) - mu) ** 2) / (2 * sigma**2)) / (
            y1 * sigma * math.sqrt(2 * math.pi)
        )
        nll = np.where(pos, -np.log(p) - np.log(np.where(pos, dens, 1.0)), -np.log(1 - p))
        got = head_loss(ZILN, raw, torch.tensor(y), torch.ones(len(y), dtype=torch.bool))
        assert got.item() == pytest.approx(nll.mean(), rel=1e-9, abs=1e-9)
        mean = head_prediction(ZILN, raw[:1]).item()
        assert mean == pytest.approx(p * math.exp(mu + sigma**2 / 2), rel=1e-9)


def test_ziln_start_is_the_maximum_likelihood_fit() -> None:
    """HeadStats' start (positive rate, mean and std of log T) is the closed-form maximum of the
    likelihood: the loss gradient vanishes there, for hundreds of random zero-inflated samples."""
    rng = np.random.default_rng(1)
    for _ in range(300):
        y, *_ = _ziln_sample(rng, 500)
        if (y > 0).sum() < 2:
            continue
        stats = HeadStats(ZILN)
        stats.add(y)
        raw = torch.tensor([stats.bias()], dtype=torch.float64, requires_grad=True)
        loss = head_loss(
            ZILN, raw.expand(len(y), 3), torch.tensor(y), torch.ones(len(y), dtype=torch.bool)
        )
        (grad,) = torch.autograd.grad(loss, raw)
        assert grad.abs().max().item() < 1e-6


def test_ziln_served_mean_matches_the_sample_mean() -> None:
    """On a large lognormal sample the served mean is the label mean (in label units), which
    ``expm1`` of the log1p regression is not."""
    rng = np.random.default_rng(2)
    y = np.where(rng.random(400_000) < 0.6, rng.lognormal(2.0, 1.0, 400_000), 0.0)
    stats = HeadStats(ZILN)
    stats.add(y)
    mean = head_prediction(ZILN, torch.tensor([stats.bias()], dtype=torch.float64)).item()
    assert mean == pytest.approx(y.mean(), rel=0.02)
    log1p = HeadStats(TaskSpec(name="w", kind="regression", label="w", loss="mse_log1p"))
    log1p.add(y)
    assert math.expm1(log1p.bias()[0]) < 0.5 * y.mean()
    assert output_dim(ZILN) == 3


@pytest.mark.parametrize("loss", ["ziln", "weighted_logistic"])
def test_trained_mean_head_serves_the_mean_label_in_seconds(
    tiny_world: Path, tmp_path: Path, loss: str
) -> None:
    """The world's watch time (duration x a Beta fraction) is not lognormal: the raw ZILN mean
    overshoots; a weighted-logistic head trained under FAMO stops short of its optimum. The
    calibration on the training rows makes either the mean label there."""
    from training.data import BatchBuilder, ImpressionLog
    from training.evaluate import predict_split
    from training.loop import train

    def edit(d: dict) -> None:
        {t["name"]: t for t in d["tasks"]}["watch_time"]["loss"] = loss
        d["training"]["epochs"] = 1
        d["weighting"] = {"name": "famo"}

    cfg = _config(tiny_world, tmp_path, edit)
    r = train(cfg, progress=False, export=False)
    assert set(r.calibration) == {"watch_time"} and r.calibration["watch_time"] != 1.0
    builder = BatchBuilder(cfg, r.encoder, r.users, r.videos, serving=True)
    p = predict_split(r.model, builder, ImpressionLog(cfg), "train")
    m = p.masks["watch_time"]
    mean_pred = p.preds["watch_time"][m].mean()
    assert mean_pred == pytest.approx(p.labels["watch_time"][m].mean(), rel=1e-4)
    assert r.metrics["watch_time"]["mean_pred"] == pytest.approx(
        r.metrics["watch_time"]["mean_label"], rel=0.5
    )
