"""Runs a loaded model on encoded rows and returns every head's served prediction.

Used by the service, the offline evaluator and the parity test, so "what the model predicts"
has exactly one definition.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ranker.backends import build_scorer
from ranker.config import LiveConfig, TaskSpec
from ranker.features import Encoded, FeatureEncoder
from ranker.heads import head_prediction
from ranker.model import RankingModel
from ranker.modules import ColumnSplit

if TYPE_CHECKING:
    from ranker.autoselect import Selection


def request_split(
    model: RankingModel, encoder: FeatureEncoder, live: LiveConfig | None = None
) -> ColumnSplit:
    """The model's input columns that are the same for every candidate of one ranking request:
    the user's and the context's features (everything but the video's), and the live counters
    keyed without the video (they follow the features' numeric columns)."""
    cat = [i for i, f in enumerate(encoder.categorical) if f.source != "video"]
    num = [j for j, f in enumerate(encoder.numeric) if f.source != "video"]
    j = len(encoder.numeric)
    for c in live.counters if live is not None else []:
        num += list(range(j, j + len(c.outputs))) if c.per_request else []
        j += len(c.outputs)
    return model.column_split(cat, num)


class Predictor:
    """``backend`` picks the engine that runs the forward pass (:mod:`ranker.backends`:
    ``eager``, ``torchscript``, ``onnx``, ``onnx-int8``); ``threads`` sets ONNX Runtime's
    intra-op threads. The head transforms stay in torch for every backend, so they cannot
    drift apart.

    ``split`` (:func:`request_split`) makes a per-request predictor: every batch it is given
    must be one request's candidates, agreeing on the split's shared columns (the service's
    case), whose first-layer share is then computed once per batch. Without it any rows go.
    """

    def __init__(
        self,
        model: RankingModel,
        tasks: list[TaskSpec],
        backend: str = "eager",
        threads: int | None = None,
        split: ColumnSplit | None = None,
    ) -> None:
        self.model = model.eval()
        self.tasks = list(tasks)
        self.backend = backend
        self.scorer = build_scorer(self.model, backend, threads, split)
        # How ``auto`` chose this engine; None when the engine was named.
        self.selection: Selection | None = None

    @torch.inference_mode()
    def predict(self, rows: Encoded) -> dict[str, np.ndarray]:
        """One batched forward pass; ``task -> (n,)`` float64 in served units."""
        raw = self.scorer(rows.cat, rows.num)
        return {
            t.name: head_prediction(t, raw[t.name]).to(torch.float64).numpy() for t in self.tasks
        }
