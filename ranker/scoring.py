"""The ranking formula: how head predictions combine into the one score a list is sorted by.

This is where engagement is traded against satisfaction, so it lives in its own config
(``configs/ranking.toml``) that can change without retraining:

* ``weighted_sum``:      ``score = sum_t w_t * f_t(pred_t)`` with per-head transforms ``f_t``;
* ``weighted_product``:  ``score = prod_t pred_t ** w_t`` (computed as ``exp(sum_t w_t log pred_t)``).
"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ranker.errors import ConfigError

Transform = Literal["identity", "log1p", "sqrt", "log"]
_EPS = 1e-6


class HeadWeight(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    weight: float = Field(allow_inf_nan=False)
    transform: Transform = "identity"


class RankingConfig(BaseModel):
    """Weights per head; heads the artifact has but the config omits get weight 0."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    formula: Literal["weighted_sum", "weighted_product"] = "weighted_sum"
    heads: dict[str, HeadWeight] = Field(min_length=1)

    @field_validator("heads")
    @classmethod
    def _some_weight(cls, v: dict[str, HeadWeight]) -> dict[str, HeadWeight]:
        if all(h.weight == 0 for h in v.values()):
            raise ValueError("at least one head needs a non-zero weight")
        return v

    @property
    def version(self) -> str:
        """Content hash: identical configs have identical versions, in logs and responses."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:12]


def load_ranking_config(path: str | Path) -> RankingConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"ranking config {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"ranking config {path} is not valid TOML: {e}") from None
    try:
        return RankingConfig.model_validate(data)
    except ValidationError as e:
        problems = []  # one line: the CLI's error line, a log record, /readyz's last error
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = "unknown key (misspelt?)" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{loc}: {msg}")
        raise ConfigError(f"invalid ranking config {path}: {'; '.join(problems)}") from None


def _apply(transform: Transform, x: np.ndarray) -> np.ndarray:
    if transform == "identity":
        return x
    if transform == "log1p":
        return np.log1p(np.maximum(x, 0.0))
    if transform == "sqrt":
        return np.sqrt(np.maximum(x, 0.0))
    return np.log(np.maximum(x, _EPS))


class RankingFormula:
    """A ranking config checked against a model's heads."""

    def __init__(self, config: RankingConfig, tasks: list[str]) -> None:
        unknown = sorted(set(config.heads) - set(tasks))
        if unknown:
            raise ConfigError(
                f"ranking config names head(s) {unknown} the model does not have; heads are {tasks}"
            )
        self.config = config
        self.tasks = list(tasks)
        self.version = config.version

    def score(self, preds: dict[str, np.ndarray]) -> np.ndarray:
        """Score ``(n,)`` float64 from served predictions ``task -> (n,)``."""
        heads = [(t, h) for t, h in self.config.heads.items() if h.weight != 0]
        n = len(next(iter(preds.values())))
        acc = np.zeros(n, dtype=np.float64)
        if self.config.formula == "weighted_sum":
            for t, h in heads:
                acc += h.weight * _apply(h.transform, np.asarray(preds[t], dtype=np.float64))
            return acc
        for t, h in heads:
            x = _apply(h.transform, np.asarray(preds[t], dtype=np.float64))
            acc += h.weight * np.log(np.maximum(x, _EPS))
        return np.exp(acc)
