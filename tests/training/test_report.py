"""`ranker report`: one folder, index.html plus its pictures, for a trained artifact."""

import json
import re
from pathlib import Path

import pytest

from ranker.cli import main
from training.report import ReportError, build_report, read_train_log

PICTURES = {
    "calibration.png",
    "calibration_quantiles.png",
    "calibration_regression.png",
    "losses.png",
    "validation.png",
    "task_weights.png",
    "gates.png",
    "gates_over_training.png",
}


def test_ranker_report_writes_index_and_pictures(tiny_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main(["report", "--artifact", str(tiny_artifact), "--out", str(out), "--quiet"]) == 0
    index = out / "index.html"
    page = index.read_text()
    written = {p.name for p in out.glob("*.png")}
    assert written >= PICTURES
    linked = set(re.findall(r'<img src="([^"]+)"', page))
    assert linked == written  # every picture is shown, and every link resolves
    assert "<script" not in page and "http" not in page  # self-contained
    for text in ("Evaluation (validation split)", "Gate utilisation", "Task weights", "auc"):
        assert text in page
    for task in ("click", "watch_time", "like", "rating"):
        assert f"<td>{task}</td>" in page


def test_a_model_without_gates_gets_a_note(tiny_trained, tmp_path: Path) -> None:  # noqa: ANN001
    run = tmp_path / "run"
    run.mkdir()
    src = Path(tiny_trained.config.training.run_dir) / "train_log.jsonl"
    records = [json.loads(line) for line in src.read_text().splitlines()]
    for r in records:
        r.pop("gates", None)
        r.pop("gate_experts", None)
        r.pop("gate_utilisation", None)
    (run / "train_log.jsonl").write_text("\n".join(json.dumps(r) for r in records if r) + "\n")
    index = build_report(tiny_trained.artifact, tmp_path / "r", run_dir=run, progress=False)
    page = index.read_text()
    assert "has no gates" in page
    assert not (tmp_path / "r" / "gates.png").exists()


def test_a_missing_training_log_is_said_not_fatal(tiny_artifact: Path, tmp_path: Path) -> None:
    index = build_report(
        tiny_artifact, tmp_path / "r", run_dir=tmp_path / "nowhere", progress=False
    )
    assert "No training log at" in index.read_text()
    assert (tmp_path / "r" / "calibration.png").is_file()


def test_a_corrupt_training_log_names_file_and_line(tmp_path: Path) -> None:
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1, "epoch": 1, "losses": {}}\n{not json\n{"step": 2}\n')
    with pytest.raises(ReportError, match=r"train_log.jsonl:2: not a JSON record"):
        read_train_log(log)
    log.write_text('{"step": 1, "epoch": 1, "losses": {}}\n{"step": 2, "ep')  # still writing
    assert len(read_train_log(log).steps) == 1
