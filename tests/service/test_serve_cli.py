"""``ranker serve`` start-up errors end the command as every other command ends on bad input:
one ``error: ...`` line on stderr naming the file or key, exit status 2, and one structured
record in the JSON log on stdout; never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import RANKING_CONFIG

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent.parent


def serve(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ranker", "serve", "--port", "0", *args]
    env = os.environ | {"RANKER_THREADS": "1", "RANKER_RANKING_CONFIG": str(RANKING_CONFIG)} | env
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def assert_one_line_error(r: subprocess.CompletedProcess, *names: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    for name in names:
        assert name in lines[0]
    assert "Traceback" not in r.stdout + r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]  # every stdout line is JSON
    failed = [x for x in records if x["level"] == "error"]
    assert len(failed) == 1 and failed[0]["msg"] == "start-up failed: " + lines[0][7:]


@pytest.fixture
def corrupt_artifact(tiny_artifact: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "corrupt" / tiny_artifact.name
    shutil.copytree(tiny_artifact, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    return copy


def test_no_artifact_is_one_error_line(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    assert_one_line_error(serve({"RANKER_ARTIFACT": str(missing)}), str(missing))


def test_a_corrupt_artifact_is_one_error_line(corrupt_artifact: Path) -> None:
    r = serve({}, "--artifact", str(corrupt_artifact))
    assert_one_line_error(r, "model.safetensors", "checksum")


def test_a_bad_ranking_config_is_one_error_line(tiny_artifact: Path, tmp_path: Path) -> None:
    bad = tmp_path / "ranking.toml"
    bad.write_text(RANKING_CONFIG.read_text().replace("weight = 1.0", 'weight = "x"', 1))
    r = serve({"RANKER_ARTIFACT": str(tiny_artifact)}, "--ranking", str(bad))
    assert_one_line_error(r, "click")


def test_a_bad_setting_is_one_error_line(tiny_artifact: Path) -> None:
    r = serve({"RANKER_ARTIFACT": str(tiny_artifact), "RANKER_MAX_CANDIDATES": "many"})
    assert r.returncode == 2 and r.stderr.startswith("error: RANKER_MAX_CANDIDATES")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_with_several_workers_too(corrupt_artifact: Path) -> None:
    r = serve({}, "--artifact", str(corrupt_artifact), "--workers", "2")
    assert_one_line_error(r, "model.safetensors", "checksum")
