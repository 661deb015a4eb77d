"""The offline path (training's join and encoder, the Predictor) and the HTTP service give the
same scores for the same rows."""

from __future__ import annotations

import httpx
import numpy as np
import pyarrow.compute as pc
import pytest

from ranker.artifact import load_artifact
from ranker.predictor import Predictor
from ranker.scoring import RankingFormula, load_ranking_config
from ranker.tables import FeatureTable
from tests.conftest import RANKING_CONFIG
from training.data import BatchBuilder, ImpressionLog

pytestmark = pytest.mark.slow


def test_offline_scores_equal_service_scores(service_url: str, tiny_artifact) -> None:  # noqa: ANN001
    a = load_artifact(tiny_artifact)
    cfg, d = a.config, a.config.data
    builder = BatchBuilder(
        cfg,
        a.encoder,
        FeatureTable.from_parquet(d.users, d.user_key, a.encoder, "user"),
        FeatureTable.from_parquet(d.videos, d.video_key, a.encoder, "video"),
    )
    log = ImpressionLog(cfg)
    formula = RankingFormula(load_ranking_config(RANKING_CONFIG), cfg.task_names)
    checked = 0
    for file, rb in log.record_batches("validation", batch_size=200):
        for req in np.unique(rb.column(d.request_key).to_numpy())[:3]:
            rows = rb.filter(pc.equal(rb.column(d.request_key), req))
            enc, uid, vid = builder.features(rows, file)
            offline = formula.score(Predictor(a.model, cfg.tasks).predict(enc))
            body = {
                "user_id": int(uid[0]),
                "context": {
                    "device": rows.column("device")[0].as_py(),
                    "hour": rows.column("hour")[0].as_py(),
                },
                "candidates": [{"video_id": int(v)} for v in vid],
            }
            r = httpx.post(f"{service_url}/v1/rank", json=body, timeout=10)
            assert r.status_code == 200, r.text
            out = r.json()
            served = {i["video_id"]: i["score"] for i in out["items"]}
            assert np.allclose([served[int(v)] for v in vid], offline, rtol=1e-6, atol=1e-9)
            checked += 1
        break
    assert checked == 3
