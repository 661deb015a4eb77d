"""A log that carries every feature itself (census-income style: no users or videos table)
trains and exports with ``data.users`` / ``data.videos`` left out; an empty table is refused in
one line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ranker.config import parse_config
from ranker.errors import ConfigError
from tests.conftest import ROOT, tiny_overrides

CENSUS_CONFIG = """
[data]
log = "{log}"

[[features]]
name = "age"
source = "context"
kind = "numeric"

[[features]]
name = "education"
source = "context"
kind = "categorical"

[[tasks]]
name = "income"
kind = "binary"
label = "income_over_50k"
loss = "bce"

[model]
num_experts = 2
expert_hidden = [8]
tower_hidden = [4]
embedding_dim = 4

[training]
epochs = 1
batch_size = 128
shuffle_buffer = 512
threads = 1
run_dir = "{tmp}/run"

[export]
artifact_root = "{tmp}/artifacts"
name = "census"
"""


def ranker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ranker", *args], cwd=ROOT, capture_output=True, text=True
    )


def census_log(path: Path, n: int = 2000, seed: int = 0) -> None:
    """Rows that are people: every column is in the log, ids are row numbers."""
    rng = np.random.default_rng(seed)
    age = rng.integers(17, 90, n)
    education = rng.choice(["hs", "college", "bachelors", "masters", "phd"], n)
    logit = 0.05 * (age - 45) + np.select(
        [education == "masters", education == "phd"], [1.0, 1.5], -0.5
    )
    income = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    table = pa.table(
        {
            "request_id": np.arange(n) // 10,
            "user_id": np.arange(n),
            "video_id": np.arange(n),
            "timestamp": np.arange(n, dtype=np.float64),
            "age": age.astype(np.float64),
            "education": education,
            "income_over_50k": income,
        }
    )
    pq.write_table(table, path)


def test_a_log_with_every_feature_trains_without_tables(tmp_path: Path) -> None:
    census_log(tmp_path / "census.parquet")
    cfg = tmp_path / "census.toml"
    cfg.write_text(CENSUS_CONFIG.format(log=tmp_path / "census.parquet", tmp=tmp_path))
    r = ranker("train", "--quiet", "--config", str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "artifact:" in r.stdout
    (version,) = (tmp_path / "artifacts" / "census").iterdir()
    e = ranker("evaluate", "--quiet", "--json", "--artifact", str(version))
    assert e.returncode == 0, e.stderr[-3000:]
    assert re.search(r"^income\s", e.stdout, re.M) and "ranking score vs logged" in e.stdout


def test_a_user_feature_without_a_users_table_is_refused() -> None:
    data = {
        "data": {"log": "l", "videos": "v"},
        "features": [{"name": "age", "source": "user", "kind": "numeric"}],
        "tasks": [{"name": "click", "kind": "binary", "label": "click", "loss": "bce"}],
    }
    with pytest.raises(ConfigError, match=r"'age' has source 'user' but data.users is not set"):
        parse_config(data)


def test_an_empty_users_table_is_named(tiny_world: Path, tmp_path: Path) -> None:
    empty = tmp_path / "users.parquet"
    pq.write_table(pq.read_table(tiny_world / "users.parquet").slice(0, 0), empty)
    over = [*tiny_overrides(tiny_world, tmp_path), f'data.users="{empty}"', "training.epochs=1"]
    r = ranker("train", "--quiet", "--no-export", *[a for o in over for a in ("--set", o)])
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(empty) in lines[0] and "has no rows" in lines[0]


def test_push_features_without_tables_says_so(tmp_path: Path) -> None:
    cfg = tmp_path / "census.toml"
    cfg.write_text(CENSUS_CONFIG.format(log=tmp_path / "census.parquet", tmp=tmp_path))
    r = ranker("push-features", "--config", str(cfg), "--quiet")
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "names no users table" in lines[0] and str(cfg) in lines[0]
