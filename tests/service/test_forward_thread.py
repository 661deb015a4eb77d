"""The forward pass off the event loop (``service.engine.rank(forward_thread=True)``): while one
request computes, the loop keeps running other coroutines (other requests' I/O)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from service.engine import ServingModel, load_formula, rank
from service.settings import Settings
from tests.conftest import RANKING_CONFIG

SLOW_S = 0.3  # a forward pass this long (a sleep: it releases the GIL, as torch's kernels do)


@pytest.fixture(scope="module")
def slow_model(tiny_artifact: Path) -> ServingModel:
    model = ServingModel.load(Settings(artifact=tiny_artifact, backend="eager", threads=1))
    base = model.predictor.scorer

    def slow(cat: np.ndarray, num: np.ndarray):  # noqa: ANN202
        time.sleep(SLOW_S)
        return base(cat, num)

    model.predictor.scorer = slow
    return model


async def _ticks_during_rank(model: ServingModel, forward_thread: bool) -> tuple[int, object]:
    """How often a 10 ms heartbeat ran on the loop while one request was ranked."""
    formula = load_formula(RANKING_CONFIG, model.artifact.config.task_names)
    vids = model.store.videos.keys[:20]  # type: ignore[attr-defined] - the in-process store
    ticks = 0
    done = asyncio.Event()

    async def heartbeat() -> None:
        nonlocal ticks
        while not done.is_set():
            await asyncio.sleep(0.01)
            ticks += 1

    beat = asyncio.create_task(heartbeat())
    await asyncio.sleep(0)  # the heartbeat is running before the request starts
    ranked = await rank(model, formula, 1, {}, np.asarray(vids), None, forward_thread)
    done.set()
    await beat
    return ticks, ranked


def test_forward_thread_leaves_the_event_loop_free(slow_model: ServingModel) -> None:
    ticks, ranked = asyncio.run(_ticks_during_rank(slow_model, forward_thread=True))
    assert ticks >= 0.5 * SLOW_S / 0.01  # the loop kept turning through the forward pass
    assert ranked.timings["forward"] >= SLOW_S
    # the same request on the loop: the heartbeat waits the whole forward pass out
    blocked, same = asyncio.run(_ticks_during_rank(slow_model, forward_thread=False))
    assert blocked <= 3
    np.testing.assert_array_equal(ranked.video_ids, same.video_ids)
    np.testing.assert_array_equal(ranked.scores, same.scores)


def test_forward_thread_is_the_default() -> None:
    assert Settings().forward_thread is True
