"""``train_log.jsonl`` is strict JSON with the record kinds docs/observability.md documents."""

from __future__ import annotations

import json
from pathlib import Path


def _strict(line: str) -> dict:
    def refuse(token: str) -> None:
        raise ValueError(f"{token} is not JSON")

    return json.loads(line, parse_constant=refuse)


def test_train_log_records_are_strict_json_of_the_documented_kinds(tiny_trained) -> None:  # noqa: ANN001
    path = Path(tiny_trained.config.training.run_dir) / "train_log.jsonl"
    records = [_strict(x) for x in path.read_text().splitlines()]
    tasks = set(tiny_trained.config.task_names)
    steps = [r for r in records if "step" in r]
    epochs = [r for r in records if "validation" in r]
    selection = [r for r in records if "selection" in r]
    gates = [r for r in records if "gate_utilisation" in r]
    assert len(steps) + len(epochs) + len(selection) + len(gates) == len(records)
    assert len(selection) == 1 and records[-2] is selection[0]
    assert {"epoch", "steps", "score", "task_epochs", "stopped_early"} == set(
        selection[0]["selection"]
    )
    for r in steps:
        assert {"step", "epoch", "losses", "weights", "elapsed_s"} <= set(r)
        assert set(r) <= {
            "step",
            "epoch",
            "losses",
            "weights",
            "gates",
            "gate_experts",
            "elapsed_s",
        }
        assert set(r["losses"]) == set(r["weights"]) == tasks
        if "gates" in r:
            assert len(r["gates"]) == len(tasks)
            assert all(len(row) == len(r["gate_experts"]) for row in r["gates"])
    assert [r["epoch"] for r in epochs] == list(range(1, tiny_trained.config.training.epochs + 1))
    for r in epochs:
        assert set(r) == {
            "epoch",
            "steps",
            "train_loss",
            "validation",
            "rows",
            "selection_score",
            "elapsed_s",
        }
        assert set(r["train_loss"]) == set(r["validation"]) == tasks and r["rows"] > 0
    assert len(gates) == 1 and records[-1] is gates[0]
    assert set(gates[0]["gate_utilisation"]) == tasks
    times = [r["elapsed_s"] for r in records]
    assert times == sorted(times) and times[0] >= 0
