"""service/respond.py writes the same bytes as orjson on the item dicts it replaces."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from service.respond import items_json, rank_response_json


def _reference(ids: np.ndarray, scores: np.ndarray, preds: dict[str, np.ndarray]) -> bytes:
    tasks = list(preds)
    return orjson.dumps(
        [
            {
                "video_id": int(ids[i]),
                "score": float(scores[i]),
                "predictions": {t: float(preds[t][i]) for t in tasks},
            }
            for i in range(len(ids))
        ]
    )


@pytest.mark.parametrize("n", [0, 1, 2, 500])
@pytest.mark.parametrize("tasks", [["click", "watch_time", "like", "rating"], ["a"], []])
def test_items_are_byte_identical_to_orjson_on_dicts(n: int, tasks: list[str]) -> None:
    rng = np.random.default_rng(n)
    ids = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)
    scores = rng.standard_normal(n) * 10.0 ** rng.integers(-30, 30, n)
    preds = {t: rng.random(n) for t in tasks}
    if n > 2:  # values JSON writes specially
        scores[:3] = [np.nan, 0.0, -0.0]
        for t in tasks:
            preds[t][:2] = [1e-300, 123456789.0]
    got = items_json(ids, scores, preds)
    assert got == _reference(ids, scores, preds)
    assert len(orjson.loads(got)) == n


def test_the_envelope_keeps_every_field_and_appends_items() -> None:
    items = items_json(np.array([5]), np.array([0.5]), {"click": np.array([0.25])})
    body = orjson.loads(rank_response_json({"model_version": "v", "degraded": False}, items))
    assert body == {
        "model_version": "v",
        "degraded": False,
        "items": [{"video_id": 5, "score": 0.5, "predictions": {"click": 0.25}}],
    }
    assert orjson.loads(rank_response_json({}, b"[]")) == {"items": []}
