"""The one typed config: feature schema, tasks, model, weighting, training and export settings.

Every model forbids unknown keys, so a misspelt key fails with its dotted path. The CLI validates
once (:func:`load_config`) and passes the object down; the resolved config travels inside the
artifact and the service re-validates it with these same classes.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ranker.allocator import GlibcMalloc
from ranker.errors import ConfigError
from ranker.live_config import (  # noqa: F401 - re-exported: part of the one config
    EVENT_NAME,
    CounterSpec,
    EventSpec,
    HistorySpec,
    LiveConfig,
)
from ranker.scoring import HeadWeight, RankingConfig
from ranker.weighting import WeightingConfig
from ranker.weighting.equal import EqualConfig

Source = Literal["user", "video", "context", "bias"]
SOURCES: tuple[Source, ...] = ("user", "video", "context")
"""Sources of the main model's input, in input order. ``bias`` features (position, device for
the shallow tower) are encoded by the same encoder but feed only the training-time bias tower."""
DEFAULT_MAX_VALUES = 8
"""Values kept per row of a multi-valued feature whose ``max_values`` is not set."""


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
    serving_default: str | int | float | None = Field(
        default=None,
        description="context only: the value the service uses when a request does not give one",
    )
    separator: str | None = Field(
        default=None, description="categorical only: the column holds several values joined by it"
    )
    max_values: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="multi-valued only: values kept per row (known ones first, in order); "
        f"default {DEFAULT_MAX_VALUES}; the model mean-pools their embeddings",
    )

    @property
    def source_column(self) -> str:
        return self.column or self.name

    @property
    def width(self) -> int:
        """Encoded ``cat`` columns of this feature: 1, or ``max_values`` for a multi-valued one."""
        if self.kind != "categorical":
            return 0
        if self.separator is None:
            return 1
        return self.max_values or DEFAULT_MAX_VALUES

    @model_validator(mode="after")
    def _kind_options(self) -> FeatureSpec:
        if self.kind == "numeric" and (self.max_vocab is not None or self.separator is not None):
            raise ValueError("max_vocab and separator apply to categorical features only")
        if self.max_values is not None and self.separator is None:
            raise ValueError("max_values applies to multi-valued features (set separator)")
        if self.kind == "categorical" and self.transform != "none":
            raise ValueError("transform applies to numeric features only")
        return self


BINARY_LOSSES = ("bce",)
REGRESSION_LOSSES = ("mse", "mse_log1p", "huber_log1p", "weighted_logistic", "ziln", "ordinal")


class TaskSpec(Strict):
    """One head. Rows whose label is null never count; ``only_where`` narrows the task to rows
    where another column is non-zero (a "task space", e.g. rating only on clicked rows)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    kind: Literal["binary", "regression"]
    label: str = Field(min_length=1, description="label column in the impression log")
    loss: Literal["bce", "mse", "mse_log1p", "huber_log1p", "weighted_logistic", "ziln", "ordinal"]
    """``weighted_logistic``: watch time as in Covington et al. 2016 (rows with a positive label
    are positives weighted by it, others unit-weight negatives; the odds estimate the expected
    value). ``ziln``: zero-inflated lognormal (Wang, Liu & Miao 2019), serves the mean in label
    units. ``ordinal``: cumulative-link regression over the integer labels 1..``levels``."""
    levels: int | None = Field(default=None, ge=2, le=100, description="ordinal: number of levels")
    weight_column: str | None = Field(
        default=None, description="a log column whose value weights each row's loss"
    )
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
        if (self.loss == "ordinal") != (self.levels is not None):
            raise ValueError("levels is required by, and only allowed with, loss = 'ordinal'")
        if self.value_range is not None and not self.value_range[0] < self.value_range[1]:
            raise ValueError("value_range must be (low, high) with low < high")
        return self


class DataConfig(Strict):
    """Where the data is. ``users`` and ``videos`` are optional: a log that carries every
    feature in its own columns (census-income style data) needs neither; its features are then
    all ``source = "context"`` (read from the log in training, from the request at serving). The
    log still needs the id columns: ``user_key`` groups rows for GAUC, ``request_key`` makes the
    lists of the per-request metrics."""

    log: Path = Field(description="a Parquet file or a directory of them (the impression log)")
    users: Path | None = Field(default=None, description="users table; needed by source 'user'")
    videos: Path | None = Field(default=None, description="videos table; needed by 'video'")
    user_key: str = "user_id"
    video_key: str = "video_id"
    request_key: str = "request_id"
    time_column: str = "timestamp"
    event_time_column: str | None = Field(
        default=None,
        description="the impression's own time, finer than time_column where that is a day "
        "(sessions, live counters); default: time_column",
    )
    time_unit_s: float = Field(
        default=1.0, gt=0, description="seconds per unit of the event time (0.001 for ms)"
    )
    validation_fraction: float = Field(
        default=0.1, gt=0, lt=1, description="the last fraction of the time span validates"
    )
    validation_from: float | None = Field(
        default=None,
        description="explicit time cutoff; overrides validation_fraction; a cutoff that leaves "
        "no validation row is an error (set validation = false to train on every row)",
    )
    validation: bool = Field(
        default=True,
        description="false: no validation split, every row trains (what training.refit does "
        "after selection); the last epoch's weights are kept",
    )

    @property
    def event_time(self) -> str:
        return self.event_time_column or self.time_column


class ModelConfig(Strict):
    """Architecture and sizes of :class:`ranker.model.RankingModel`.

    ``architecture``:

    * ``shared_bottom``: one shared MLP under every tower (Caruana 1997);
    * ``omoe``: ``num_experts`` experts mixed by one softmax gate shared by all tasks (the MMoE
      paper's one-gate ablation, Ma et al., KDD 2018);
    * ``mmoe``: the same experts, one gate per task (Ma et al., KDD 2018);
    * ``ple``: Progressive Layered Extraction (Tang et al., RecSys 2020): per level,
      ``task_experts`` experts per task plus ``shared_experts`` shared experts; each task's gate
      mixes its own and the shared experts, a shared gate mixes all of them for the next level;
      ``ple_levels = 1`` is CGC (Customized Gate Control). Every expert of every level is an MLP
      with ``expert_hidden`` layers.
    * ``cross_stitch``: one column of ``expert_hidden`` layers per task, and after every layer
      a learned ``T x T`` cross-stitch unit that mixes the tasks' activations (Misra et al.,
      CVPR 2016), initialised with ``stitch_self`` on its diagonal (1: independent columns).

    ``gate`` (mmoe, omoe, ple): ``softmax``, or ``dselect_k``: DSelect-k (Hazimeh et al.,
    NeurIPS 2021), ``dselect_k`` single-expert selectors with smooth-step binary codes of width
    ``dselect_gamma``, sparse once trained (at most ``dselect_k`` experts per gate), with an
    entropy regulariser of weight ``dselect_entropy`` (:mod:`ranker.dselect`).

    ``gate_dropout``: in training, each expert's gate weight is dropped with this probability and
    the remaining weights renormalised (Zhao et al., RecSys 2019, section 4.2: it keeps gates
    from polarising onto one expert); no effect in evaluation or serving.
    """

    architecture: Literal["mmoe", "omoe", "shared_bottom", "ple", "cross_stitch"] = "mmoe"
    embedding_dim: int = Field(default=16, gt=0)
    num_experts: int = Field(default=6, gt=0, description="mmoe/omoe: experts in the bank")
    expert_hidden: list[int] = Field(default=[256, 128], min_length=1)
    tower_hidden: list[int] = Field(default=[64])
    dropout: float = Field(default=0.0, ge=0, lt=1)
    gate_dropout: float = Field(default=0.0, ge=0, lt=1, description="gated architectures only")
    task_experts: int = Field(default=2, ge=0, description="ple: experts per task per level")
    shared_experts: int = Field(default=2, ge=0, description="ple: shared experts per level")
    ple_levels: int = Field(default=1, ge=1, le=8, description="ple: levels; 1 = CGC")
    gate: Literal["softmax", "dselect_k"] = Field(
        default="softmax", description="mmoe/omoe/ple: how a gate weighs its experts"
    )
    dselect_k: int = Field(default=2, ge=1, description="dselect_k: experts a gate may select")
    dselect_gamma: float = Field(default=1.0, gt=0, description="dselect_k: smooth-step width")
    dselect_entropy: float = Field(
        default=1e-3, ge=0, description="dselect_k: weight of the selectors' entropy in the loss"
    )
    stitch_self: float = Field(
        default=0.9, gt=0, le=1, description="cross_stitch: initial self weight of every unit"
    )

    @field_validator("expert_hidden", "tower_hidden")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(h <= 0 for h in v):
            raise ValueError("layer sizes must be positive")
        return v

    @field_validator("task_experts", "shared_experts")
    @classmethod
    def _ple_needs_both(cls, v: int, info: ValidationInfo) -> int:
        # Checked per field (not after the model) so that the error names the key itself.
        if v < 1 and info.data.get("architecture") == "ple":
            what = (
                "without shared experts the tasks share nothing but the embeddings"
                if info.field_name == "shared_experts"
                else "without task experts PLE degenerates to MMoE over the shared experts"
            )
            raise ValueError(f"architecture 'ple' needs >= 1 ({what})")
        return v

    @field_validator("gate")
    @classmethod
    def _gate_fits(cls, v: str, info: ValidationInfo) -> str:
        arch = info.data.get("architecture")
        if v == "dselect_k" and arch not in ("mmoe", "omoe", "ple"):
            raise ValueError(f"'dselect_k' is a gate; architecture {arch!r} has no gates")
        if v == "dselect_k" and info.data.get("gate_dropout", 0.0) > 0:
            raise ValueError("gate_dropout drops softmax logits; 'dselect_k' does not take it")
        return v

    @field_validator("dselect_k")
    @classmethod
    def _k_fits(cls, v: int, info: ValidationInfo) -> int:
        if info.data.get("gate") != "dselect_k":
            return v
        d = info.data
        if d.get("architecture") == "ple":  # a task gate sees its own and the shared experts
            n = d.get("task_experts", 0) + d.get("shared_experts", 0)
        else:
            n = d.get("num_experts", 0)
        if v > n:
            raise ValueError(f"k = {v} is more than the {n} experts a gate sees")
        return v


HIGHER_IS_BETTER = ("auc", "gauc", "xauc", "gxauc")
LOWER_IS_BETTER = ("loss", "logloss", "ece", "rmse", "rmse_log1p", "mae")


class SelectionConfig(Strict):
    """Which validation point's weights are kept, and when training stops
    (``training/selection.py``).

    ``criterion``: ``relative_loss`` (the mean over tasks of each task's validation loss divided
    by its value after the first epoch, so that no head's scale dominates), or ``task.metric``
    with a metric of :func:`training.evaluate.head_metrics` or ``loss`` (``click.gauc``,
    ``watch_time.rmse``, ``like.loss``). ``keep``: ``best`` restores the weights of the best
    point, ``last`` keeps the final ones; ``per_head`` restores the shared layers at the best
    point and each task's tower at the point where that task's own validation loss was lowest
    (heads that peak at different epochs, e.g. a sparse head still improving when the dense ones
    overfit). ``patience``: stop after that many epochs without improvement (none: run every
    epoch)."""

    criterion: str = Field(default="relative_loss", pattern=r"^(relative_loss|\w+\.\w+)$")
    keep: Literal["best", "last", "per_head"] = "best"
    patience: int | None = Field(default=None, gt=0)
    min_delta: float = Field(default=0.0, ge=0, description="smaller gains do not count")

    @field_validator("criterion")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        if v != "relative_loss" and v.split(".", 1)[1] not in HIGHER_IS_BETTER + LOWER_IS_BETTER:
            raise ValueError(
                f"unknown metric in {v!r}; use relative_loss or task.metric with a metric in "
                f"{HIGHER_IS_BETTER + LOWER_IS_BETTER}"
            )
        return v


class TrainingConfig(Strict):
    epochs: int = Field(default=2, gt=0, description="the most epochs (selection may stop sooner)")
    batch_size: int = Field(default=2048, gt=0)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    seed: int = 0
    threads: int | None = Field(default=None, gt=0, description="torch threads; default: all")
    shuffle_buffer: int = Field(
        default=65536, ge=0, description="rows shuffled together while streaming; 0: no shuffle"
    )
    max_steps_per_epoch: int | None = Field(default=None, gt=0)
    checkpoint_every_steps: int = Field(
        default=500, ge=0, description="mid-epoch checkpoints for --resume; 0: at epoch ends only"
    )
    device: str = "cpu"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description="bf16: the forward pass under bfloat16 autocast (losses, gradients' "
        "accumulation and the optimizer stay fp32); auto: bf16 on a CPU with bf16 matrix units "
        "(AMX), fp32 elsewhere (training.loop.training_precision)",
    )
    selection: SelectionConfig = SelectionConfig()
    refit: bool = Field(
        default=False,
        description="after selection, retrain from scratch on every row (validation days "
        "included) for the selected number of epochs",
    )
    run_dir: Path = Path("runs/default")
    glibc_malloc: GlibcMalloc = Field(
        default="retain",
        description="retain: keep freed memory in the process (no page faults per step, "
        "ranker/allocator.py); default: glibc's own behaviour",
    )


class PositionConfig(Strict):
    """How the position a video was shown at is handled (Zhao et al., RecSys 2019, section 5).

    * ``none``: position is ignored; clicks on top slots teach the model that top videos are good.
    * ``feature``: position is an ordinary context feature, fixed to ``serving_value`` at serving.
    * ``shallow_tower``: a small network on ``columns`` (position, device) outputs a logit added to
      the ``tasks`` heads in training only; it absorbs the position effect and is dropped at
      serving, so the main model learns position-free relevance. ``dropout`` replaces the
      position by "unknown" on that fraction of training rows, as the paper does.
    """

    mode: Literal["none", "feature", "shallow_tower"] = "none"
    column: str = Field(default="position", description="the log column with the shown position")
    extra_columns: list[str] = Field(
        default=["device"], description="shallow tower only: more bias inputs from the log"
    )
    tasks: list[str] = Field(
        default=["click"],
        description="shallow tower only: heads the bias logit is added to (checked in that mode)",
    )
    dropout: float = Field(default=0.1, ge=0, lt=1)
    hidden: list[int] = Field(default=[16])
    serving_value: int = Field(
        default=0, description="feature mode: the position assumed at serving"
    )

    def bias_features(self) -> list[FeatureSpec]:
        """The shallow tower's inputs, as categorical features of the internal ``bias`` source."""
        cols = [self.column, *self.extra_columns]
        return [
            FeatureSpec(name=f"bias_{c}", column=c, source="bias", kind="categorical") for c in cols
        ]

    def position_feature(self) -> FeatureSpec:
        return FeatureSpec(
            name=self.column,
            source="context",
            kind="categorical",
            serving_default=self.serving_value,
        )


class EngineGuard(Strict):
    """How close to fp32 eager a scoring engine must stay, on the artifact's sample requests,
    for the service's ``auto`` backend to serve it (:mod:`ranker.autoselect`). An engine that
    misses any bound is never served by ``auto``, however fast.

    The defaults admit the bf16 expert layers measured on trained default models (max
    probability error 5.7e-4 on a Xeon, 1.9e-3 scaled error on an EPYC; Spearman 0.99999, top-50
    overlap 0.996-0.998, docs/performance.md) and refuse ONNX int8 there (errors 1.6e-2 to
    5.9e-2, 26-41x larger; top-10 overlap 0.8 on the worst request).
    """

    max_error: float = Field(
        default=5e-3,
        gt=0,
        description="largest served-prediction error per head, over the head's scale: "
        "|engine - fp32| / max(1, max |fp32|) (absolute for probabilities)",
    )
    max_error_per_head: dict[str, float] = Field(
        default={}, description="per-head overrides of max_error, by task name"
    )
    min_spearman: float = Field(
        default=0.999,
        ge=-1,
        le=1,
        description="lowest Spearman correlation of the ranking score with fp32's, per request",
    )
    top_k: int = Field(default=50, gt=0, description="k of the top-k overlap")
    min_topk_overlap: float = Field(
        default=0.98,
        ge=0,
        le=1,
        description="lowest mean overlap of the top-k by ranking score with fp32's top-k",
    )

    def max_error_for(self, task: str) -> float:
        return self.max_error_per_head.get(task, self.max_error)


class ExportConfig(Strict):
    artifact_root: Path = Path("artifacts")
    name: str = Field(default="ranker", pattern=r"^[A-Za-z0-9_.-]+$")
    sample_requests: int = Field(
        default=16,
        ge=0,
        description="validation requests stored in the artifact for the service to time and "
        "check its engines on (ranker/samples.py); 0: none (auto then serves fp32)",
    )
    sample_candidates: int = Field(default=500, gt=0, description="candidates per sample request")
    guard: EngineGuard = EngineGuard()


class Config(Strict):
    data: DataConfig
    features: list[FeatureSpec] = Field(min_length=1)
    tasks: list[TaskSpec] = Field(min_length=1)
    model: ModelConfig = ModelConfig()
    weighting: WeightingConfig = EqualConfig()
    training: TrainingConfig = TrainingConfig()
    export: ExportConfig = ExportConfig()
    position: PositionConfig = PositionConfig()
    live: LiveConfig | None = None
    ranking: RankingConfig | None = Field(
        default=None,
        description="the ranking formula the exported artifact carries (the schema of "
        "configs/ranking.toml); default: derived from the heads (see effective_ranking)",
    )

    @property
    def effective_ranking(self) -> RankingConfig:
        """The ranking config written into the artifact: ``[ranking]`` when given, else every
        head at weight 1 in its served unit, heavy-tailed regression heads (the log-scale
        losses, e.g. watch time) through ``log1p`` so that seconds do not drown probabilities.
        A starting point that fits the model's heads, not tuned weights: ``ranker tune``
        chooses those."""
        if self.ranking is not None:
            return self.ranking
        log_scale = ("mse_log1p", "huber_log1p", "weighted_logistic")
        return RankingConfig(
            heads={
                t.name: HeadWeight(
                    weight=1.0, transform="log1p" if t.loss in log_scale else "identity"
                )
                for t in self.tasks
            }
        )

    @property
    def effective_features(self) -> list[FeatureSpec]:
        """Every feature the encoder fits: the declared ones plus what position handling adds."""
        if self.position.mode == "feature":
            return [*self.features, self.position.position_feature()]
        if self.position.mode == "shallow_tower":
            return [*self.features, *self.position.bias_features()]
        return list(self.features)

    def history_side_features(self) -> list[FeatureSpec]:
        """The ``live.history.side`` features, each a single-valued categorical feature of the
        video table other than the id (the model maps every history video to its value)."""
        if self.live is None or self.live.history is None:
            return []
        by_name = {f.name: f for f in self.features}
        out: list[FeatureSpec] = []
        for name in self.live.history.side:
            f = by_name.get(name)
            if f in out:
                raise ValueError(f"live.history.side: {name!r} is listed twice")
            if (
                f is None
                or f.source != "video"
                or f.kind != "categorical"
                or f.separator is not None
                or f.source_column == self.data.video_key
            ):
                raise ValueError(
                    f"live.history.side: {name!r} is not a single-valued categorical video "
                    f"feature other than the video id; video features are "
                    f"{[g.name for g in self.features if g.source == 'video']}"
                )
            out.append(f)
        return out

    def history_feature(self) -> FeatureSpec:
        """The video id feature whose vocabulary and embedding the history shares."""
        for f in self.features:
            if (
                f.source == "video"
                and f.kind == "categorical"
                and f.separator is None
                and f.source_column == self.data.video_key
            ):
                return f
        raise ValueError(
            f"live.history: needs a single-valued categorical video feature on column "
            f"{self.data.video_key!r} (data.video_key) to share its vocabulary and embedding"
        )

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
        # position.tasks is read by the shallow tower only: a config without a "click" task
        # must not be refused for a default it never uses.
        unknown = [t for t in self.position.tasks if t not in self.task_names]
        if unknown and self.position.mode == "shallow_tower":
            raise ValueError(
                f"position.tasks: unknown task(s) {unknown}; tasks are {self.task_names}"
            )
        if self.position.mode != "none" and self.position.column in {
            f.source_column for f in self.features
        }:
            raise ValueError(
                f"position.column: {self.position.column!r} is also a declared feature; "
                "position handling adds it itself"
            )
        crit = self.training.selection.criterion
        if crit != "relative_loss" and crit.split(".")[0] not in self.task_names:
            raise ValueError(
                f"training.selection.criterion: unknown task in {crit!r}; tasks are "
                f"{self.task_names}"
            )
        if self.training.refit and not self.data.validation:
            raise ValueError(
                "training.refit: needs a validation split to select on (data.validation = false)"
            )
        if self.live is not None:
            ctx = {f.name for f in self.features if f.source == "context"}
            split = {
                f.source_column: f.separator
                for f in self.features
                if f.source == "video" and f.separator is not None
            }
            for c in self.live.counters:
                for k in c.keys:
                    if k.startswith("context:") and k.split(":", 1)[1] not in ctx:
                        raise ValueError(
                            f"live.counters: {c.name!r} key {k!r} is not a declared context "
                            "feature (the service reads it from the request's context)"
                        )
                    col = k.partition(":")[2]
                    if k.startswith("video:") and col in split and c.separator != split[col]:
                        raise ValueError(
                            f"live.counters: {c.name!r} key {k!r}: the feature on column {col!r} "
                            f"splits it by {split[col]!r}; set separator = {split[col]!r} on the "
                            "counter (without it every combination of values is one entity)"
                        )
        if self.live is not None and self.live.history is not None:
            self.history_feature()  # raises when there is no video id feature to share
            self.history_side_features()  # raises on a side feature that cannot be looked up
        for f in self.features:
            if f.source == "bias":
                raise ValueError(f"features: {f.name!r} has source 'bias', which is internal")
            if f.source in ("user", "video") and getattr(self.data, f"{f.source}s") is None:
                raise ValueError(
                    f"features: {f.name!r} has source {f.source!r} but data.{f.source}s is not "
                    "set; a feature read from the log itself has source 'context'"
                )
        if self.ranking is not None:
            parts = [("ranking.heads", self.ranking.heads)]
            parts += [
                (f"ranking.variants.{i}.heads", v.heads)
                for i, v in enumerate(self.ranking.variants)
            ]
            for where, heads in parts:
                unknown = sorted(set(heads) - set(self.task_names))
                if unknown:
                    raise ValueError(
                        f"{where}: unknown head(s) {unknown}; tasks are {self.task_names}"
                    )
        try:
            self.weighting.check_tasks(self.task_names)
        except ValueError as e:
            raise ValueError(f"weighting.{e}") from e
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


PATH_KEYS: tuple[tuple[str, str], ...] = (
    ("data", "log"),
    ("data", "users"),
    ("data", "videos"),
    ("training", "run_dir"),
    ("export", "artifact_root"),
)
"""The config's file and folder paths: made absolute by :func:`load_config`."""


def _anchor(data: dict[str, Any], base: Path, keys: set[tuple[str, str]]) -> None:
    """Makes the relative paths under ``keys`` absolute against ``base`` (normalised, links not
    followed), so the resolved config (the one in checkpoints and artifacts) means the same
    files from any working directory."""
    for section, key in keys:
        node = data.get(section)
        value = node.get(key) if isinstance(node, dict) else None
        if isinstance(value, str) and value:
            p = Path(value).expanduser()
            node[key] = os.path.normpath(p if p.is_absolute() else base / p)  # type: ignore[index]


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Reads a TOML config, applies ``key.path=value`` overrides (TOML values), validates it.

    Relative paths in the file resolve against the file's own folder (``configs/default.toml``
    says ``../data/default/log``), so a config means the same files from any working directory;
    relative paths given as overrides resolve against the working directory, as paths typed on
    a command line do. Both end up absolute in the returned config.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    _anchor(data, path.absolute().parent, set(PATH_KEYS))
    overridden: set[tuple[str, str]] = set()
    for o in overrides or []:
        _apply_override(data, o)
        parts = tuple(o.partition("=")[0].strip().split("."))
        if parts in PATH_KEYS:
            overridden.add(parts)  # type: ignore[arg-type]
    _anchor(data, Path.cwd(), overridden)
    return parse_config(data, str(path))
