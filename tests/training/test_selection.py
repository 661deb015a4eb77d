"""Best-epoch selection, early stopping, refit on every row, and the empty-split error."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from ranker.config import Config, SelectionConfig, _apply_override, parse_config
from ranker.errors import ConfigError, DataError
from tests.conftest import DEFAULT_CONFIG, tiny_overrides
from training.data import ImpressionLog
from training.selection import Selector


class _Towers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(2, 2)
        self.towers = nn.ModuleDict({"a": nn.Linear(2, 1), "b": nn.Linear(2, 1)})


def _set(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def _losses(a: float, b: float) -> dict[str, dict[str, float]]:
    return {"a": {"loss": a, "auc": 1 - a}, "b": {"loss": b, "auc": 1 - b}}


def test_selector_stops_after_patience_and_restores_the_best_point() -> None:
    """Mean relative loss: (a, b) = (1, 1) -> (0.5, 1.0) -> (0.6, 1.2) -> (0.7, 1.3): the
    second point is best (0.75), two later points without gain stop with patience 2."""
    model = _Towers()
    sel = Selector(SelectionConfig(patience=2), ["a", "b"])
    seq = [(1.0, 1.0), (0.5, 1.0), (0.6, 1.2), (0.7, 1.3)]
    stops = []
    for epoch, (a, b) in enumerate(seq, 1):
        _set(model, float(epoch))
        stops.append(sel.update(epoch, 10 * epoch, _losses(a, b), model))
    assert stops == [False, False, False, True]
    kept = sel.restore(model)
    assert kept is not None and (kept.epoch, kept.steps) == (2, 20)
    assert kept.score == pytest.approx(0.75)
    assert all((p == 2.0).all() for p in model.parameters())


def test_selector_metric_criterion_and_per_head_towers() -> None:
    """``a.auc`` (higher is better) picks epoch 3; per-head keeps b's tower at epoch 1, where
    b's own loss was lowest, and everything else at epoch 3."""
    model = _Towers()
    sel = Selector(SelectionConfig(criterion="a.auc", keep="per_head"), ["a", "b"])
    for epoch, (a, b) in enumerate([(0.5, 0.3), (0.4, 0.4), (0.3, 0.5)], 1):
        _set(model, float(epoch))
        assert not sel.update(epoch, epoch, _losses(a, b), model)
    kept = sel.restore(model)
    assert kept is not None and kept.epoch == 3 and kept.task_epochs == {"a": 3, "b": 1}
    assert (model.towers["b"].weight == 1.0).all() and (model.towers["a"].weight == 3.0).all()
    assert (model.shared.weight == 3.0).all()


def test_selector_keep_last_leaves_the_weights() -> None:
    model = _Towers()
    sel = Selector(SelectionConfig(keep="last"), ["a", "b"])
    for epoch, loss in enumerate([1.0, 0.5, 0.9], 1):
        _set(model, float(epoch))
        sel.update(epoch, epoch, _losses(loss, loss), model)
    assert sel.restore(model).epoch == 2  # type: ignore[union-attr]
    assert all((p == 3.0).all() for p in model.parameters())


# The flipped world makes the click head's validation loss rise from epoch 1 on at lr 0.01 under
# equal weighting; under the default FAMO it fell from epoch 1 to 2 (2.057 -> 2.033), so these
# tests of selection pin the weighting their data was built for.
EQUAL = 'weighting.name="equal"'


def _config(world: Path, tmp: Path, *overrides: str) -> Config:
    data = tomllib.loads(DEFAULT_CONFIG.read_text())
    for o in [*tiny_overrides(world, tmp), *overrides]:
        _apply_override(data, o)
    return parse_config(data)


def _flipped_world(world: Path, tmp: Path) -> Path:
    """The tiny world with the click labels of the validation period inverted: the better the
    model learns the training days, the worse its validation loss, from the first epoch on."""
    out = tmp / "flipped"
    (out / "log").mkdir(parents=True)
    cutoff = ImpressionLog(_config(world, tmp)).cutoff
    for f in sorted((world / "log").glob("*.parquet")):
        t = pq.read_table(f)
        late = pc.greater_equal(t.column("timestamp"), cutoff)
        flipped = pc.if_else(late, pc.subtract(1, t.column("click")), t.column("click"))
        t = t.set_column(
            t.schema.get_field_index("click"), "click", flipped.cast(t.schema.field("click").type)
        )
        pq.write_table(t, out / "log" / f.name)
    for name in ("users.parquet", "videos.parquet"):
        (out / name).write_bytes((world / name).read_bytes())
    return out


def test_rising_validation_loss_stops_early_and_keeps_the_best_weights(
    tiny_world: Path, tmp_path: Path
) -> None:
    from training.data import BatchBuilder
    from training.evaluate import head_metrics, predict_split
    from training.loop import train

    world = _flipped_world(tiny_world, tmp_path)
    cfg = _config(
        world,
        tmp_path,
        "training.epochs=6",
        "training.lr=0.01",
        'training.selection.criterion="click.loss"',
        "training.selection.patience=2",
        EQUAL,
    )
    r = train(cfg, progress=False, export=True)
    losses = [h["validation"]["click"]["loss"] for h in r.history]
    assert losses[1] > losses[0] and losses[2] > losses[0]  # the flipped labels did their job
    assert r.selection is not None and r.selection.epoch == 1 and r.selection.stopped_early
    assert len(r.history) == 3  # epoch 1, then two without gain: stopped before epoch 6
    # the returned (and exported) model is the epoch-1 one: its validation loss is epoch 1's
    log = ImpressionLog(cfg)
    builder = BatchBuilder(cfg, r.encoder, r.users, r.videos, serving=True)
    again = head_metrics(cfg, predict_split(r.model, builder, log, "validation"))
    assert again["click"]["loss"] == pytest.approx(losses[0], rel=1e-5)
    assert r.metrics["click"]["loss"] == pytest.approx(losses[0], rel=1e-9)
    from ranker.artifact import load_artifact

    report = load_artifact(r.artifact).manifest["metrics"]
    assert report["selection"]["epoch"] == 1


def test_validation_split_that_is_empty_is_an_error_naming_the_key(
    tiny_world: Path, tmp_path: Path
) -> None:
    from training.loop import train

    cfg = _config(tiny_world, tmp_path, "data.validation_from=1e18")
    with pytest.raises(DataError, match=r"data\.validation_from = 1e\+18 leaves no validation"):
        train(cfg, progress=False, export=False)


def test_training_without_validation_uses_every_row(tiny_world: Path, tmp_path: Path) -> None:
    from training.loop import train

    cfg = _config(tiny_world, tmp_path, "data.validation=false", "training.epochs=1")
    r = train(cfg, progress=False, export=False)
    rows = ImpressionLog(cfg).count_rows("all")
    assert r.history[-1]["steps"] == math.ceil(rows / cfg.training.batch_size)
    assert "validation" not in r.history[-1] and r.selection is None


def test_refit_retrains_on_every_row_for_the_selected_epochs(
    tiny_world: Path, tmp_path: Path
) -> None:
    from ranker.artifact import load_artifact
    from training.loop import train

    world = _flipped_world(tiny_world, tmp_path)
    cfg = _config(
        world,
        tmp_path,
        "training.epochs=3",
        "training.lr=0.01",
        'training.selection.criterion="click.loss"',
        "training.refit=true",
        EQUAL,
    )
    r = train(cfg, progress=False, export=True)
    assert r.selection is not None and r.selection.epoch == 1
    selection_runs = [h for h in r.history if "refit" not in h]
    refits = [h["refit"] for h in r.history if "refit" in h]
    assert len(selection_runs) == 3 and len(refits) == 1  # 3 epochs to select, 1 refit epoch
    rows = ImpressionLog(cfg).count_rows("all")
    assert refits[0]["steps"] == math.ceil(rows / cfg.training.batch_size)
    manifest = load_artifact(r.artifact).manifest
    assert manifest["metrics"]["selection"]["refit"] is True
    assert manifest["metrics"]["validation"]["click"]["loss"] == pytest.approx(
        selection_runs[0]["validation"]["click"]["loss"]
    )


def test_selection_criterion_names_an_unknown_task_or_metric(
    tiny_world: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"training.selection.criterion: unknown task"):
        _config(tiny_world, tmp_path, 'training.selection.criterion="nope.auc"')
    with pytest.raises(ConfigError, match=r"training.selection.criterion"):
        _config(tiny_world, tmp_path, 'training.selection.criterion="click.nope"')
    with pytest.raises(ConfigError, match=r"training.refit"):
        _config(tiny_world, tmp_path, "training.refit=true", "data.validation=false")


def test_cli_names_the_key_of_an_empty_validation_split(tiny_world: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    args = [a for o in tiny_overrides(tiny_world, tmp_path) for a in ("--set", o)]
    r = subprocess.run(
        [sys.executable, "-m", "ranker", "train", "--config", str(DEFAULT_CONFIG), *args]
        + ["--set", "data.validation_from=1e18", "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "data.validation_from" in lines[0]
