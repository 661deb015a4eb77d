"""ranker/allocator.py: freed heap memory stays mapped for the next step, unless opted out.

mallopt settings are per process and cannot be undone, so each case runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from ranker.allocator import OPT_OUT

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only"
)

# A training step's pattern: several large blocks allocated, written, and freed together.
CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    from ranker.allocator import retain_freed_memory

    applied = retain_freed_memory()
    again = retain_freed_memory()

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


def _child(**env: str) -> dict:
    full = {k: v for k, v in os.environ.items() if k != OPT_OUT} | env
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=full, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_blocks_are_reused_without_page_faults() -> None:
    r = _child()
    assert r["applied"] and r["again"]
    # 96 MiB per step would be 24,576 fresh pages; retained, the step finds them mapped.
    assert r["faults"] < 500, r


def test_opt_out_keeps_glibc_behaviour() -> None:
    r = _child(**{OPT_OUT: "default"})
    assert not r["applied"] and not r["again"]
    # glibc's own thresholds hand the freed top of the heap back, and the next step faults it
    # in again: the cost the setting removes (and proof the test above can fail).
    assert r["faults"] > 2_000, r
