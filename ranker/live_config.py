"""The ``[live]`` section of the config: feedback events, point-in-time counters and the user's
recent history (``docs/live-features.md``). Part of the one typed config (:class:`ranker.config.
Config` holds a :class:`LiveConfig`), kept in its own module because it is its own subject."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


EVENT_NAME = r"^[a-z][a-z0-9_]*$"


class EventSpec(Strict):
    """One kind of feedback event: what ``POST /v1/events`` calls ``type``, and the log column
    whose value it is on an impression row (a 0/1 label, or an amount such as watch time)."""

    name: str = Field(pattern=EVENT_NAME, description="event type, e.g. click, like")
    column: str = Field(min_length=1, description="the log column holding it on each impression")
    scale: float = Field(default=1.0, gt=0, description="column units to event units (ms -> s)")


class CounterSpec(Strict):
    """A point-in-time counter: per entity, impressions and event totals so far, strictly before
    each row (events at the same time are not "before"), served as smoothed rates.

    ``keys`` name the entity: ``user``, ``video``, ``video:<column>`` (a column of the videos
    table, e.g. ``video:author_id``; integers or strings), ``context:<feature>`` (a declared
    context feature, e.g. ``context:tab``); several keys make a joint entity (the user per tab).
    A multi-valued video column (``separator``, e.g. KuaiRand's ``tag = "3,17,5"``, or a list
    column) makes each value an entity: an impression counts once for each of its video's
    values, and a row reads the sums over its video's values (impressions and event totals
    added, the latest last impression), so a video's rates pool what its tags have seen. Each counter adds
    ``log1p(impressions)`` (unless ``log_impressions = false``), per event ``(sum + prior_strength * prior) / (impressions +
    prior_strength)`` with the training rows' mean as the prior (Beta-binomial smoothing, the
    standard empirical-Bayes CTR estimate), and with ``since_last`` ``log1p`` of the seconds
    since the entity's last impression; all standardised on the training rows.
    """

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    keys: list[str] = Field(min_length=1, max_length=3)
    events: list[str] = Field(default=[], description="event names from live.events")
    prior_strength: float = Field(default=20.0, gt=0)
    since_last: bool = False
    half_life_s: float | None = Field(
        default=None,
        gt=0,
        description="decay: an event counts exp(-ln2 * age / half_life_s); None counts all alike",
    )
    separator: str | None = Field(
        default=None,
        min_length=1,
        description="the video:<column> key's column is a string of values joined by this "
        "(a multi-valued entity such as tags); list columns are multi-valued without it",
    )
    log_impressions: bool = Field(
        default=True,
        description="add log1p(impressions): a count grows with the log's age, so a model "
        "trained on early days meets larger ones later (a shift the rates do not have)",
    )

    @field_validator("keys")
    @classmethod
    def _keys(cls, v: list[str]) -> list[str]:
        import re

        for k in v:
            if not re.fullmatch(r"user|video|(video|context):[A-Za-z_][A-Za-z0-9_]*", k):
                raise ValueError(f"{k!r} is not user, video, video:<column> or context:<feature>")
        if len(set(v)) != len(v):
            raise ValueError("a key is repeated")
        return v

    @model_validator(mode="after")
    def _separator(self) -> CounterSpec:
        if self.separator is not None and sum(k.startswith("video:") for k in self.keys) != 1:
            raise ValueError(
                f"separator: counter {self.name!r} needs exactly one video:<column> key to split"
            )
        return self

    @property
    def multi_key(self) -> str | None:
        """The ``video:<column>`` key split by ``separator`` (``None``: none is)."""
        if self.separator is None:
            return None
        return next(k for k in self.keys if k.startswith("video:"))

    @property
    def per_request(self) -> bool:
        """The same value for every candidate of one request (keyed without the video)."""
        return not any(k == "video" or k.startswith("video:") for k in self.keys)

    @property
    def outputs(self) -> list[str]:
        """Names of the numeric columns it adds, in order."""
        names = [f"{self.name}.log_impressions"] if self.log_impressions else []
        names += [f"{self.name}.{e}_rate" for e in self.events]
        return names + ([f"{self.name}.log_since_last_s"] if self.since_last else [])


class HistorySpec(Strict):
    """The user's recent history: the last ``length`` videos the user engaged with (an
    ``engaged`` event, e.g. a click) strictly before each row, most recent first. The videos are
    looked up in the video id feature's vocabulary and embedding table (shared, not a copy) and
    pooled into one vector per candidate: ``attention`` is the target attention of Zhou et al.,
    "Deep Interest Network for Click-Through Rate Prediction" (KDD 2018): an MLP on
    ``[h, t, h - t, h * t]`` weighs each history video ``h`` against the candidate ``t``,
    padding masked, no softmax (DIN keeps the weights' sum as the interest's intensity);
    ``mean`` averages them. A user with no history gets a learned empty-history vector."""

    kind: Literal["history"] = "history"
    name: str = Field(default="history", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    engaged: str = Field(description="the live.events name whose events (value > 0) count")
    length: int = Field(default=20, ge=1, le=200, description="videos kept per user")
    pooling: Literal["attention", "mean"] = "attention"
    attention_hidden: list[int] = Field(
        default=[16],
        description="attention only: hidden layers of the activation unit ([16]: scores as "
        "[32] on the drifting world over 6 seeds at half its FLOPs; docs/live-features.md)",
    )
    side: list[str] = Field(
        default=[],
        description="single-valued categorical video features (e.g. the category) whose "
        "embeddings are added to each history video's id embedding and to the candidate's, as "
        "DIN represents a behaviour by its goods id and category id: a user's recent interest "
        "then shows through videos the model has rarely seen",
    )


class LiveConfig(Strict):
    """Features that move with time, kept current by events (``docs/live-features.md``)."""

    events: list[EventSpec] = Field(min_length=1)
    counters: list[CounterSpec] = Field(default=[])
    history: HistorySpec | None = None
    max_event_ids: int = Field(
        default=1_000_000, gt=0, description="event ids remembered for idempotence (serving)"
    )

    @model_validator(mode="after")
    def _known_events(self) -> LiveConfig:
        names = [e.name for e in self.events]
        if "impression" in names or len(set(names)) != len(names):
            raise ValueError("live.events: names must be unique and not 'impression' (implicit)")
        for c in self.counters:
            bad = [e for e in c.events if e not in names]
            if bad:
                raise ValueError(f"live.counters: {c.name!r} counts unknown event(s) {bad}")
        split: dict[str, str | None] = {}
        for c in self.counters:
            for k in (k for k in c.keys if k.startswith("video:")):
                sep = c.separator if k == c.multi_key else None
                if split.setdefault(k, sep) != sep:
                    raise ValueError(
                        f"live.counters: {k!r} is split by {split[k]!r} in one counter and by "
                        f"{sep!r} in {c.name!r}: one column, one separator"
                    )
        cn = [c.name for c in self.counters]
        if len(set(cn)) != len(cn):
            raise ValueError("live.counters: duplicate names")
        if not self.counters and self.history is None:
            raise ValueError("live: declares neither counters nor a history")
        if self.history is not None and self.history.engaged not in names:
            raise ValueError(
                f"live.history.engaged: {self.history.engaged!r} is not one of live.events {names}"
            )
        return self

    @property
    def width(self) -> int:
        return sum(len(c.outputs) for c in self.counters)
