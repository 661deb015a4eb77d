"""The one typed config: feature schema, tasks, model, weighting, training and export settings.

Every model forbids unknown keys, so a misspelt key fails with its dotted path. The CLI validates
once (:func:`load_config`) and passes the object down; the resolved config travels inside the
artifact and the service re-validates it with these same classes.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ranker.errors import ConfigError
from ranker.weighting import WeightingConfig
from ranker.weighting.equal import EqualConfig

Source = Literal["user", "video", "context"]
SOURCES: tuple[Source, ...] = ("user", "video", "context")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureSpec(Strict):
    """One model input. ``source`` says whose it is: the users table, the videos table, or the
    request context (a column of the impression log at training time, a request field at serving)."""

    name: str = Field(min_length=1)
    source: Source
    kind: Literal["categorical", "numeric"]
    column: str | None = Field(default=None, description="column in the source; default: name")
    max_vocab: int | None = Field(default=None, gt=0, description="keep the most frequent values")
    min_count: int = Field(default=1, ge=1, description="rarer values share the unknown bucket")
    transform: Literal["none", "log1p"] = "none"
    separator: str | None = Field(
        default=None, description="categorical only: the column holds several values joined by it"
    )

    @property
    def source_column(self) -> str:
        return self.column or self.name

    @model_validator(mode="after")
    def _kind_options(self) -> FeatureSpec:
        if self.kind == "numeric" and (self.max_vocab is not None or self.separator is not None):
            raise ValueError("max_vocab and separator apply to categorical features only")
        if self.kind == "categorical" and self.transform != "none":
            raise ValueError("transform applies to numeric features only")
        return self


BINARY_LOSSES = ("bce",)
REGRESSION_LOSSES = ("mse", "mse_log1p", "huber_log1p")


class TaskSpec(Strict):
    """One head. Rows whose label is null never count; ``only_where`` narrows the task to rows
    where another column is non-zero (a "task space", e.g. rating only on clicked rows)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    kind: Literal["binary", "regression"]
    label: str = Field(min_length=1, description="label column in the impression log")
    loss: Literal["bce", "mse", "mse_log1p", "huber_log1p"]
    label_scale: float = Field(default=1.0, gt=0, description="label multiplier, e.g. ms -> s")
    only_where: str | None = Field(default=None, description="column that must be non-zero")
    value_range: tuple[float, float] | None = Field(
        default=None, description="predictions are clipped to it (e.g. rating 1..5)"
    )
    unit: str = Field(default="", description="unit of the served prediction, for humans")

    @model_validator(mode="after")
    def _loss_fits_kind(self) -> TaskSpec:
        allowed = BINARY_LOSSES if self.kind == "binary" else REGRESSION_LOSSES
        if self.loss not in allowed:
            raise ValueError(f"loss {self.loss!r} does not fit a {self.kind} task; use {allowed}")
        if self.value_range is not None and not self.value_range[0] < self.value_range[1]:
            raise ValueError("value_range must be (low, high) with low < high")
        return self


class DataConfig(Strict):
    log: Path = Field(description="a Parquet file or a directory of them (the impression log)")
    users: Path
    videos: Path
    user_key: str = "user_id"
    video_key: str = "video_id"
    request_key: str = "request_id"
    time_column: str = "timestamp"
    validation_fraction: float = Field(
        default=0.1, gt=0, lt=1, description="the last fraction of the time span validates"
    )
    validation_from: float | None = Field(
        default=None, description="explicit time cutoff; overrides validation_fraction"
    )


class ModelConfig(Strict):
    architecture: Literal["mmoe", "omoe", "shared_bottom"] = "mmoe"
    embedding_dim: int = Field(default=16, gt=0)
    num_experts: int = Field(default=6, gt=0)
    expert_hidden: list[int] = Field(default=[256, 128], min_length=1)
    tower_hidden: list[int] = Field(default=[64])
    dropout: float = Field(default=0.0, ge=0, lt=1)

    @field_validator("expert_hidden", "tower_hidden")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(h <= 0 for h in v):
            raise ValueError("layer sizes must be positive")
        return v


class TrainingConfig(Strict):
    epochs: int = Field(default=2, gt=0)
    batch_size: int = Field(default=2048, gt=0)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    seed: int = 0
    threads: int | None = Field(default=None, gt=0, description="torch threads; default: all")
    shuffle_buffer: int = Field(
        default=65536, ge=0, description="rows shuffled together while streaming; 0: no shuffle"
    )
    max_steps_per_epoch: int | None = Field(default=None, gt=0)
    device: str = "cpu"
    run_dir: Path = Path("runs/default")


class ExportConfig(Strict):
    artifact_root: Path = Path("artifacts")
    name: str = Field(default="ranker", pattern=r"^[A-Za-z0-9_.-]+$")


class Config(Strict):
    data: DataConfig
    features: list[FeatureSpec] = Field(min_length=1)
    tasks: list[TaskSpec] = Field(min_length=1)
    model: ModelConfig = ModelConfig()
    weighting: WeightingConfig = EqualConfig()
    training: TrainingConfig = TrainingConfig()
    export: ExportConfig = ExportConfig()

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        for what, names in (
            ("features", [f.name for f in self.features]),
            ("tasks", self.task_names),
        ):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{what}: duplicate names {dup}")
        try:
            self.weighting.check_tasks(self.task_names)
        except ValueError as e:
            raise ValueError(f"weighting.weights: {e}") from e
        return self


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config {origin}:"]
    for e in err.errors():
        parts = [str(p) if not isinstance(p, int) else f"[{p}]" for p in e["loc"]]
        if len(parts) >= 2 and parts[0] == "weighting":
            del parts[1]  # the discriminated union's tag, not a key of the file
        path = "".join(p if p.startswith("[") or i == 0 else "." + p for i, p in enumerate(parts))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (misspelt?)"
        if not path and ": " in msg:  # cross-field checks say "section: problem"
            path, msg = msg.split(": ", 1)
        lines.append(f"  {path or '<top>'}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], origin: str = "<dict>") -> Config:
    """Validates a config mapping; raises :class:`ConfigError` naming every bad key's path."""
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, origin)) from None


def _apply_override(data: dict[str, Any], assignment: str) -> None:
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {assignment!r} is not of the form key.path=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string
    node = data
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {p} is not a table")
    node[parts[-1]] = value


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Reads a TOML config, applies ``key.path=value`` overrides (TOML values), validates it."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    for o in overrides or []:
        _apply_override(data, o)
    return parse_config(data, str(path))
