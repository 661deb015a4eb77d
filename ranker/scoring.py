"""The ranking formula: how head predictions combine into the one score a list is sorted by.

This is where engagement is traded against satisfaction, so it lives in its own config
(``configs/ranking.toml``) that can change without retraining:

* ``weighted_sum``:      ``score = sum_t w_t * f_t(pred_t)`` with per-head transforms ``f_t``;
* ``weighted_product``:  ``score = prod_t pred_t ** w_t`` (computed as ``exp(sum_t w_t log pred_t)``).

A config may also declare **variants** (``[[variants]]``: a name, a traffic share, head weights
and optionally its own formula) for an A/B test of the score: a user is assigned to one by a
salted hash of the user id (:mod:`ranker.variants`), the users no variant takes get the base
weights (``control``). Controlled experiments on live traffic are how ranking changes are judged
(Kohavi, Tang and Xu, *Trustworthy Online Controlled Experiments*, 2020): offline metrics pick
candidates (``ranker tune``), a share of users tells which one they prefer.
"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ranker.errors import ConfigError
from ranker.variants import CONTROL, VARIANT_NAME, assign_one

Transform = Literal["identity", "log1p", "sqrt", "log"]
_EPS = 1e-6


class HeadWeight(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    weight: float = Field(allow_inf_nan=False)
    transform: Transform = "identity"


def _some_weight(v: dict[str, HeadWeight]) -> dict[str, HeadWeight]:
    if all(h.weight == 0 for h in v.values()):
        raise ValueError("at least one head needs a non-zero weight")
    return v


class Variant(BaseModel):
    """One arm of an experiment: its own weights for a share of users."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=VARIANT_NAME, description="a label in metrics and logs")
    share: float = Field(gt=0, le=1, allow_inf_nan=False, description="fraction of users")
    formula: Literal["weighted_sum", "weighted_product"] | None = Field(
        default=None, description="default: the base config's"
    )
    heads: dict[str, HeadWeight] = Field(min_length=1)

    @field_validator("heads")
    @classmethod
    def _some_weight(cls, v: dict[str, HeadWeight]) -> dict[str, HeadWeight]:
        return _some_weight(v)


class RankingConfig(BaseModel):
    """Weights per head; heads the artifact has but the config omits get weight 0."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    formula: Literal["weighted_sum", "weighted_product"] = "weighted_sum"
    salt: str = Field(
        default="",
        max_length=128,
        description="mixed into the user hash: a new salt reshuffles users between variants",
    )
    heads: dict[str, HeadWeight] = Field(min_length=1)
    variants: list[Variant] = Field(default_factory=list)

    @field_validator("heads")
    @classmethod
    def _some_weight(cls, v: dict[str, HeadWeight]) -> dict[str, HeadWeight]:
        return _some_weight(v)

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: list[Variant]) -> list[Variant]:
        seen: set[str] = set()
        for i, var in enumerate(v):
            if var.name == CONTROL:
                raise ValueError(f"{i}.name: {CONTROL!r} is reserved for the base weights")
            if var.name in seen:
                raise ValueError(f"{i}.name: duplicate variant name {var.name!r}")
            seen.add(var.name)
        total = sum(var.share for var in v)
        if total > 1 + 1e-9:
            shares = ", ".join(f"{var.name} {var.share:g}" for var in v)
            raise ValueError(f"shares sum to {total:g} ({shares}); at most 1")
        return v

    @property
    def version(self) -> str:
        """Content hash: identical configs have identical versions, in logs and responses. A
        config without variants hashes as it did before variants existed."""
        exclude = None if self.variants or self.salt else {"salt", "variants"}
        return hashlib.sha256(self.model_dump_json(exclude=exclude).encode()).hexdigest()[:12]

    def arm(self, name: str) -> RankingConfig:
        """The plain config (no variants) that variant ``name`` (or ``control``) scores with."""
        if name == CONTROL:
            return RankingConfig(formula=self.formula, heads=self.heads)
        for v in self.variants:
            if v.name == name:
                return RankingConfig(formula=v.formula or self.formula, heads=v.heads)
        raise KeyError(name)


def load_ranking_config(path: str | Path) -> RankingConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"ranking config {path} does not exist") from None
    return parse_ranking_config(text, str(path))


def parse_ranking_config(text: str, source: str) -> RankingConfig:
    """The config in TOML ``text``; a :class:`ConfigError` of one line naming ``source`` and
    every bad key (``variants.1.share: ...``)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"ranking config {source} is not valid TOML: {e}") from None
    try:
        return RankingConfig.model_validate(data)
    except ValidationError as e:
        problems = []  # one line: the CLI's error line, a log record, /readyz's last error
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = "unknown key (misspelt?)" if err["type"] == "extra_forbidden" else err["msg"]
            msg = msg.removeprefix("Value error, ")
            if loc == "variants" and msg[:1].isdigit():  # the validator names the entry
                entry, _, msg = msg.partition(": ")
                loc = f"variants.{entry}"
            problems.append(f"{loc}: {msg}")
        raise ConfigError(f"invalid ranking config {source}: {'; '.join(problems)}") from None


def _apply(transform: Transform, x: np.ndarray) -> np.ndarray:
    if transform == "identity":
        return x
    if transform == "log1p":
        return np.log1p(np.maximum(x, 0.0))
    if transform == "sqrt":
        return np.sqrt(np.maximum(x, 0.0))
    return np.log(np.maximum(x, _EPS))


class _Arm:
    """One set of weights, ready to score."""

    def __init__(self, config: RankingConfig) -> None:
        self.formula = config.formula
        self.heads = [(t, h) for t, h in config.heads.items() if h.weight != 0]

    def score(self, preds: dict[str, np.ndarray]) -> np.ndarray:
        n = len(next(iter(preds.values())))
        acc = np.zeros(n, dtype=np.float64)
        if self.formula == "weighted_sum":
            for t, h in self.heads:
                acc += h.weight * _apply(h.transform, np.asarray(preds[t], dtype=np.float64))
            return acc
        for t, h in self.heads:
            x = _apply(h.transform, np.asarray(preds[t], dtype=np.float64))
            acc += h.weight * np.log(np.maximum(x, _EPS))
        return np.exp(acc)


class RankingFormula:
    """A ranking config checked against a model's heads, with its variants ready to score."""

    def __init__(self, config: RankingConfig, tasks: list[str]) -> None:
        parts = [("", config.heads)]
        parts += [(f"variant {v.name!r} ", v.heads) for v in config.variants]
        for where, heads in parts:
            unknown = sorted(set(heads) - set(tasks))
            if unknown:
                raise ConfigError(
                    f"ranking config {where}names head(s) {unknown} the model does not have; "
                    f"heads are {tasks}"
                )
        self.config = config
        self.tasks = list(tasks)
        self.version = config.version
        self._arms = {CONTROL: _Arm(config)} | {
            v.name: _Arm(config.arm(v.name)) for v in config.variants
        }
        self._shares = [v.share for v in config.variants]
        self._names = [v.name for v in config.variants]
        self.variant_names: tuple[str, ...] = (CONTROL, *self._names) if config.variants else ()

    def assign(self, user_id: int) -> str | None:
        """The variant ``user_id`` is in (``control``: the base weights); None when the config
        declares no variants. The same on every worker, replica and process start."""
        if not self._names:
            return None
        i = assign_one(user_id, self.config.salt, self._shares)
        return CONTROL if i < 0 else self._names[i]

    def score(self, preds: dict[str, np.ndarray], variant: str | None = None) -> np.ndarray:
        """Score ``(n,)`` float64 from served predictions ``task -> (n,)``, with the weights of
        ``variant`` (None or ``control``: the base weights)."""
        return self._arms[variant or CONTROL].score(preds)
