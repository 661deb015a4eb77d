"""What a request is served with: the model bundle and the ranking formula, swapped as a whole.

Its own module so that the app (which reads it) and the reloader (which replaces it) both
depend on it and not on each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ranker.scoring import RankingFormula
from service.engine import ServingModel, serving_formula
from service.settings import Settings, default_threads


@dataclass
class ServingState:
    """What requests read; replaced as a whole, never mutated, so readers need no lock."""

    model: ServingModel
    formula: RankingFormula


def load_serving_state(settings: Settings) -> ServingState:
    """The model, its feature store and the ranking formula ``settings`` name, loaded and
    checked; a :class:`~ranker.errors.RankerError` names what is wrong (no artifact, a corrupt
    one, a ranking config that is invalid or does not fit the model's heads, a missing table)."""
    # Before the model: RANKER_BACKEND=auto times the engines while loading, with the
    # threads the service will run (one per worker unless set), not torch's one per core.
    torch.set_num_threads(default_threads(settings))
    model = ServingModel.load(settings)
    formula = serving_formula(settings.ranking_config, model)
    return ServingState(model, formula)
