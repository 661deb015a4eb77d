"""ranker/allocator.py: freed heap memory stays mapped for the next step, when configured so.

mallopt settings are per process and cannot be undone, so each case runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from ranker.config import parse_config
from ranker.errors import ConfigError
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only"
)

# A training step's pattern: several large blocks allocated, written, and freed together.
CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    from ranker.allocator import apply_glibc_malloc

    applied = apply_glibc_malloc(sys.argv[1])
    again = apply_glibc_malloc(sys.argv[1])

    def step():
        blocks = [np.ones(3 << 20, np.float32) for _ in range(8)]  # 8 x 12 MiB, written
        del blocks

    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
    print(json.dumps({"applied": applied, "again": again, "faults": faults}))
    """
)


def _child(choice: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, choice], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_blocks_are_reused_without_page_faults() -> None:
    r = _child("retain")
    assert r["applied"] and r["again"]
    # 96 MiB per step would be 24,576 fresh pages; retained, the step finds them mapped.
    assert r["faults"] < 500, r


def test_default_keeps_glibc_behaviour() -> None:
    r = _child("default")
    assert not r["applied"] and not r["again"]
    # glibc's own thresholds hand the freed top of the heap back, and the next step faults it
    # in again: the cost the setting removes (and proof the test above can fail).
    assert r["faults"] > 2_000, r


def test_both_configs_default_to_retain_and_name_a_bad_value() -> None:
    assert Settings().glibc_malloc == "retain"
    assert Settings(glibc_malloc="default").glibc_malloc == "default"
    with pytest.raises(ValueError, match="glibc_malloc"):
        Settings(glibc_malloc="jemalloc")
    base = tomllib.loads((ROOT / "configs" / "default.toml").read_text())
    assert parse_config(base).training.glibc_malloc == "retain"
    base.setdefault("training", {})["glibc_malloc"] = "off"
    with pytest.raises(ConfigError, match="training.glibc_malloc"):
        parse_config(base)
