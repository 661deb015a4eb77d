"""What a request is served with: the model bundle and the ranking formula, swapped as a whole.

Its own module so that the app (which reads it) and the reloader (which replaces it) both
depend on it and not on each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from ranker.scoring import RankingFormula
from service.engine import ServingModel


@dataclass
class ServingState:
    """What requests read; replaced as a whole, never mutated, so readers need no lock."""

    model: ServingModel
    formula: RankingFormula
