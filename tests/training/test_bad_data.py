"""Bad data files stop ``ranker train`` and ``ranker evaluate`` with one ``error:`` line naming
the file (exit 2), never a traceback; every case goes through real Parquet files and the real
command."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from tests.conftest import ROOT, tiny_overrides


def ranker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ranker", *args], cwd=ROOT, capture_output=True, text=True
    )


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    return lines[0]


def truncated_log(world: Path, tmp: Path, which: int) -> tuple[Path, Path]:
    log = tmp / "log"
    shutil.copytree(world / "log", log)
    victim = sorted(log.glob("*.parquet"))[which]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    return log, victim


def test_truncated_log_file_is_named_by_train(tiny_world: Path, tmp_path: Path) -> None:
    log, victim = truncated_log(tiny_world, tmp_path, -1)
    over = [*tiny_overrides(tiny_world, tmp_path), f'data.log="{log}"', "training.epochs=1"]
    line = one_error_line(ranker("train", "--quiet", "--no-export", *sets(over)))
    assert str(victim) in line


def test_truncated_log_file_is_named_by_evaluate(
    tiny_world: Path, tiny_artifact: Path, tmp_path: Path
) -> None:
    log, victim = truncated_log(tiny_world, tmp_path, -1)
    line = one_error_line(
        ranker("evaluate", "--quiet", "--artifact", str(tiny_artifact), "--log", str(log))
    )
    assert str(victim) in line


def test_regression_labels_outside_value_range_are_refused(
    tiny_world: Path, tmp_path: Path
) -> None:
    """Ratings x10 against ``value_range = [1, 5]`` used to train to an RMSE of 33, silently."""
    log = tmp_path / "log"
    log.mkdir()
    for f in sorted((tiny_world / "log").glob("*.parquet")):
        t = pq.read_table(f)
        i = t.schema.get_field_index("rating")
        t = t.set_column(i, "rating", pc.multiply(t.column(i), 10))
        pq.write_table(t, log / f.name)
    over = [*tiny_overrides(tiny_world, tmp_path), f'data.log="{log}"', "training.epochs=1"]
    line = one_error_line(ranker("train", "--quiet", "--no-export", *sets(over)))
    assert "'rating'" in line and "value_range [1, 5]" in line and str(log) in line
    assert re.search(r"has \d+ values outside", line) and "request_id=" in line
