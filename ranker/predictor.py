"""Runs a loaded model on encoded rows and returns every head's served prediction.

Used by the service, the offline evaluator and the parity test, so "what the model predicts"
has exactly one definition.
"""

from __future__ import annotations

import numpy as np
import torch

from ranker.config import TaskSpec
from ranker.features import Encoded
from ranker.heads import head_prediction
from ranker.model import RankingModel


class Predictor:
    def __init__(self, model: RankingModel, tasks: list[TaskSpec]) -> None:
        self.model = model.eval()
        self.tasks = list(tasks)

    @torch.inference_mode()
    def predict(self, rows: Encoded) -> dict[str, np.ndarray]:
        """One batched forward pass; ``task -> (n,)`` float64 in served units."""
        raw = self.model(torch.from_numpy(rows.cat), torch.from_numpy(rows.num))
        return {
            t.name: head_prediction(t, raw[t.name]).to(torch.float64).numpy() for t in self.tasks
        }
