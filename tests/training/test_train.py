import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ranker.artifact import load_artifact
from ranker.config import Config, load_config
from ranker.errors import DataError, TrainingError
from tests.conftest import DEFAULT_CONFIG, ROOT, tiny_overrides
from training.data import ImpressionLog
from training.loop import train
from training.offline import evaluate_artifact, export_checkpoint


def test_training_learns_something_and_exports(tiny_trained) -> None:  # noqa: ANN001
    m = tiny_trained.metrics
    assert set(m) == {"click", "watch_time", "like", "rating"}
    assert m["click"]["auc"] > 0.6  # position-confounded clicks on a tiny world: far above chance
    assert m["rating"]["count"] < m["click"]["count"]  # rating is masked to rated rows
    log = (Path(tiny_trained.config.training.run_dir) / "train_log.jsonl").read_text().splitlines()
    first = json.loads(log[0])
    assert set(first["weights"]) == set(m) and set(first["losses"]) == set(m)


def test_split_is_by_time(tiny_config: Config) -> None:
    log = ImpressionLog(tiny_config)
    t = pq.read_table(tiny_config.data.log, columns=["timestamp"]).column(0).to_numpy()
    lo, hi = t.min(), t.max()
    assert log.cutoff == pytest.approx(lo + 0.85 * (hi - lo))
    n_val = log.dataset.count_rows(filter=log.filter("validation"))
    assert n_val == int((t >= log.cutoff).sum()) > 0


def test_evaluate_artifact_matches_training_validation(tiny_trained, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "m.json"
    res = evaluate_artifact(tiny_trained.artifact, progress=False, out=str(out))
    assert res["heads"]["click"]["auc"] == pytest.approx(
        tiny_trained.metrics["click"]["auc"], abs=1e-6
    )
    assert json.loads(out.read_text())["rows"] == res["rows"]
    assert 0 < res["ranking_score_logged"]["ndcg@10"] <= 1
    assert 0 < res["truth"]["ranking_score"]["ndcg@10"] <= 1
    assert out.with_suffix(".reliability.png").stat().st_size > 1000


def test_export_from_checkpoint(tiny_trained, tmp_path: Path) -> None:  # noqa: ANN001
    path = export_checkpoint(Path(tiny_trained.config.training.run_dir) / "checkpoint.pt", tmp_path)
    assert (path / "manifest.json").is_file()
    samples = load_artifact(path).samples  # the export stores sample requests as training does
    assert samples is not None and len(samples) == tiny_trained.config.export.sample_requests


def test_missing_label_column_names_column_and_file(tiny_world: Path, tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.mkdir()
    t = pq.read_table(tiny_world / "log").drop(["like"])
    pq.write_table(t, log / "part.parquet")
    cfg = load_config(DEFAULT_CONFIG, [*tiny_overrides(tiny_world, tmp_path), f'data.log="{log}"'])
    with pytest.raises(DataError, match=r"missing column\(s\) \['like'\]"):
        train(cfg, progress=False, export=False)


def test_out_of_range_binary_label_names_column_and_file(tiny_world: Path, tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.mkdir()
    t = pq.read_table(tiny_world / "log")
    clicks = t.column("click").to_numpy().copy()
    clicks[0] = 3
    t = t.set_column(t.schema.get_field_index("click"), "click", pa.array(clicks))
    pq.write_table(t, log / "part.parquet")
    cfg = load_config(DEFAULT_CONFIG, [*tiny_overrides(tiny_world, tmp_path), f'data.log="{log}"'])
    with pytest.raises(DataError, match=r"part.parquet: binary label column 'click'"):
        train(cfg, progress=False, export=False)


def test_cli_reports_config_errors_without_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text(DEFAULT_CONFIG.read_text().replace("[model]", "[modle]"))
    r = subprocess.run(
        [sys.executable, "-m", "ranker", "train", "--config", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 2
    assert "modle: unknown key" in r.stderr and "Traceback" not in r.stderr


def test_every_subcommand_has_help() -> None:
    for sub in ("generate", "train", "evaluate", "export", "serve"):
        r = subprocess.run(
            [sys.executable, "-m", "ranker", sub, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0 and "usage: ranker" in r.stdout


def _write_log(tiny_world: Path, tmp_path: Path, mutate) -> Path:  # noqa: ANN001
    log = tmp_path / "log"
    log.mkdir()
    pq.write_table(mutate(pq.read_table(tiny_world / "log")), log / "part.parquet")
    return log


def test_nan_label_names_column_and_file(tiny_world: Path, tmp_path: Path) -> None:
    def mutate(t: pa.Table) -> pa.Table:
        w = t.column("watch_time").to_numpy().copy()
        w[5] = float("nan")
        return t.set_column(t.schema.get_field_index("watch_time"), "watch_time", pa.array(w))

    log = _write_log(tiny_world, tmp_path, mutate)
    cfg = load_config(DEFAULT_CONFIG, [*tiny_overrides(tiny_world, tmp_path), f'data.log="{log}"'])
    with pytest.raises(DataError, match=r"part.parquet: label column 'watch_time' has 1 NaN"):
        train(cfg, progress=False, export=False)


def test_wrong_label_dtype_names_the_column(tiny_world: Path, tmp_path: Path) -> None:
    def mutate(t: pa.Table) -> pa.Table:
        i = t.schema.get_field_index("like")
        return t.set_column(i, "like", t.column("like").cast(pa.string()))

    log = _write_log(tiny_world, tmp_path, mutate)
    cfg = load_config(DEFAULT_CONFIG, [*tiny_overrides(tiny_world, tmp_path), f'data.log="{log}"'])
    with pytest.raises(DataError, match=r"label column 'like' has type string"):
        train(cfg, progress=False, export=False)


def test_non_finite_loss_names_step_and_task(tiny_world: Path, tmp_path: Path) -> None:
    # Its own run dir: a failed run must not overwrite the shared fixture's train_log.jsonl.
    cfg = load_config(DEFAULT_CONFIG, [*tiny_overrides(tiny_world, tmp_path), "training.lr=1e30"])
    with pytest.raises(TrainingError, match=r"non-finite loss for task '\w+' at step \d+"):
        train(cfg, progress=False, export=False)


def test_regression_heads_report_rmse_in_label_and_log1p_units(tiny_config: Config) -> None:
    """RMSE in seconds is dominated by a few long views; the log1p RMSE (the usual watch-time
    metric on real logs) is reported beside it, both from the served prediction."""
    import numpy as np

    from training.evaluate import Predictions, format_table, head_metrics

    rng = np.random.default_rng(0)
    n = 500
    names = tiny_config.task_names
    y = np.where(rng.random(n) < 0.5, rng.lognormal(2, 1.5, n), 0.0)
    pred = rng.lognormal(1, 1, n)
    labels = {t: rng.integers(0, 2, n).astype(float) for t in names} | {"watch_time": y}
    preds = {t: rng.random(n) for t in names} | {"watch_time": pred}
    masks = {t: np.ones(n, bool) for t in names}
    m = head_metrics(tiny_config, Predictions(preds, labels, masks, np.arange(n), np.arange(n)))
    w = m["watch_time"]
    assert w["rmse"] == pytest.approx(np.sqrt(np.mean((pred - y) ** 2)))
    assert w["rmse_log1p"] == pytest.approx(np.sqrt(np.mean((np.log1p(pred) - np.log1p(y)) ** 2)))
    assert "rmse_log1p" in format_table(m)
