"""A test-only build of the service whose forward passes wait at a gate, so a test can hold
rank requests in flight for as long as it likes (no sleeps, no timing): the overload tests
(``tests/service/test_overload.py``) run it under uvicorn with
``uvicorn tests.service.gated_app:create --factory``.

The gate is closed while the file named by ``RANKER_TEST_GATE_FILE`` exists. Nothing in the
service imports this module.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from fastapi import FastAPI

import service.engine as engine
from service.app import create_app
from service.settings import Settings

GATE_ENV = "RANKER_TEST_GATE_FILE"
_forward_rows = engine.forward_rows


def _gated_forward_rows(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    gate = Path(os.environ[GATE_ENV])
    while gate.exists():
        time.sleep(0.005)
    return _forward_rows(*args, **kwargs)


def create() -> FastAPI:
    """The service's app (settings from ``RANKER_*``) with every forward pass held while the
    gate file exists."""
    engine.forward_rows = _gated_forward_rows
    return create_app(Settings())
