"""Synthetic world generator: the project's embedded default data.

Why a synthetic world: ranking quality and debiasing can only be *measured* against a truth that
real logs never contain. This module draws users and videos with latent interests, serves requests
of K candidates through a noisy logging policy, lets a position-dependent examination bias the
clicks, and writes -- next to every logged label -- the position-free expectation of that label
(``true_*`` columns), so that a ranking score computed from the truth is the true utility.

Why the objectives conflict on purpose: in a world where every label follows one preference score,
MMoE, shared-bottom and PLE all landed within 0.002 AUC of each other, and no task-weighting
strategy can beat another. Here three latents pull the labels apart, each with a knob:

* clickbait (per video, concentrated in some channels) raises click appeal but lowers like
  probability, rating and completion;
* long videos are watched for many seconds but liked less;
* niche videos have low broad click appeal but are liked and rated highly by the few users whose
  interests match them.

The latents are never written as features; the model can learn them only indirectly (video and
channel embeddings, and weak correlates such as popularity, duration and account age). They are
written to ``truth/videos.parquet`` for analysis only.

Every formula is documented in ``docs/synthetic-world.md``; keep the two in step.

Performance (measured on the 2-core development machine, shared with other work): the default
world, 50,000 requests x 20 candidates = 1,000,000 impressions (44 MB of parquet), takes 3-6 s end
to end; 4,000,000 impressions take about 23 s. Memory is bounded by one chunk of requests (2,048
requests): peak RSS was 172 MB for both 1M and 4M impressions.

Determinism: every random draw comes from a ``numpy.random.Generator`` seeded from
``SeedSequence(seed)`` with a fixed spawn key per stage and per chunk; the chunk size is a module
constant, so the same config gives byte-identical files, and ``rows_per_file`` changes only how the
same rows are split across files.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

__all__ = [
    "DEVICES",
    "LOG_SCHEMA",
    "USERS_SCHEMA",
    "VIDEOS_SCHEMA",
    "WorldConfig",
    "WorldSummary",
    "examination_probability",
    "generate",
]

FORMAT = "synthetic-world/1"
DEVICES: tuple[str, ...] = ("android", "ios", "web", "tv")
N_COUNTRIES = 20
N_AGE_GROUPS = 7
# Requests per generation chunk. A module constant (not a config key) because the random stream
# of each chunk is derived from its index: changing it changes the data.
CHUNK_REQUESTS = 2048
_REFERENCE_DURATION_S = 240.0
_MIN_DURATION_S = 15.0
_MAX_DURATION_S = 3 * 3600.0

USERS_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("age_group", pa.int64()),
        ("country", pa.string()),
        ("activity", pa.float64()),
        ("account_age_days", pa.float64()),
    ]
)
VIDEOS_SCHEMA = pa.schema(
    [
        ("video_id", pa.int64()),
        ("category", pa.int64()),
        ("channel_id", pa.int64()),
        ("duration_s", pa.float64()),
        ("age_days", pa.float64()),
        ("popularity", pa.float64()),
    ]
)
VIDEO_TRUTH_SCHEMA = pa.schema(
    [
        ("video_id", pa.int64()),
        ("clickbait", pa.float64()),
        ("niche", pa.int64()),
        ("quality", pa.float64()),
    ]
)
LOG_SCHEMA = pa.schema(
    [
        ("request_id", pa.int64()),
        ("user_id", pa.int64()),
        ("video_id", pa.int64()),
        ("position", pa.int64()),
        ("device", pa.string()),
        ("hour", pa.int64()),
        ("timestamp", pa.int64()),
        ("click", pa.int64()),
        ("watch_time", pa.float64()),
        ("like", pa.int64()),
        ("rating", pa.float64()),
        ("true_click", pa.float64()),
        ("true_watch_time", pa.float64()),
        ("true_like", pa.float64()),
        ("true_rating", pa.float64()),
    ]
)


class WorldConfig(BaseModel):
    """Everything that defines a synthetic world; the same config gives byte-identical data.

    Sizes default to the embedded default data set (1,000,000 impressions); :meth:`small` gives a
    world that generates in well under a second, for tests.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, ge=0, description="Root of every random stream.")
    n_users: int = Field(20_000, ge=1)
    n_videos: int = Field(10_000, ge=1)
    n_categories: int = Field(20, ge=1)
    n_channels: int = Field(500, ge=1)
    n_requests: int = Field(50_000, ge=1)
    candidates_per_request: int = Field(20, ge=1, description="K: videos shown per request.")
    rows_per_file: int = Field(
        200_000, ge=1, description="Log rows per parquet file (rounded down to whole requests)."
    )
    start_time: int = Field(1_767_225_600, ge=0, description="Unix seconds; 2026-01-01 UTC.")
    days: float = Field(14.0, gt=0, description="Span of the log, in days.")
    latent_dim: int = Field(16, ge=2, description="Dimension of user and video latents.")

    position_bias: float = Field(
        1.0, ge=0, description="P(examined | position p) = 1 / (1 + p) ** position_bias."
    )
    clickbait_fraction: float = Field(
        0.15, ge=0, le=1, description="Expected fraction of clickbait videos."
    )
    clickbait_strength: float = Field(
        1.0, ge=0, description="Scales clickbait effects on click, completion, like, rating."
    )
    long_video_effect: float = Field(
        1.0, ge=0, description="How much less long videos are liked and rated (0 = not at all)."
    )
    niche_fraction: float = Field(0.15, ge=0, le=1, description="Fraction of niche videos.")
    niche_strength: float = Field(
        1.0, ge=0, description="Scales the niche click penalty and the niche like/rating bonus."
    )
    rating_rate: float = Field(
        0.1, ge=0, le=1, description="Fraction of clicked impressions that get a rating."
    )
    label_noise: float = Field(
        0.3, ge=0, description="Std of per-impression logit shocks no feature explains."
    )
    policy_noise: float = Field(
        1.0, ge=0, description="Std of the logging policy's error on the click logit."
    )
    interest_share: float = Field(
        0.7, ge=0, le=1, description="Share of candidates drawn from the user's interests."
    )
    interest_drift: float = Field(
        0.0,
        ge=0,
        description="Opt-in: strength of each user's current topic, a category that changes "
        "every drift_period_days (0: interests never move; the default world).",
    )
    drift_period_days: float = Field(
        2.0, gt=0, description="How long a user's current topic lasts (with interest_drift > 0)."
    )

    @model_validator(mode="after")
    def _check_sizes(self) -> Self:
        if self.n_videos < self.candidates_per_request:
            raise ValueError(
                f"n_videos ({self.n_videos}) must be >= candidates_per_request "
                f"({self.candidates_per_request}): a request shows K distinct videos"
            )
        if self.rows_per_file < self.candidates_per_request:
            raise ValueError(
                f"rows_per_file ({self.rows_per_file}) must be >= candidates_per_request "
                f"({self.candidates_per_request}): files hold whole requests"
            )
        return self

    @classmethod
    def small(cls, **overrides: Any) -> WorldConfig:
        """A tiny world for tests: 200 users, 300 videos, 500 requests (10,000 impressions)."""
        values: dict[str, Any] = {
            "n_users": 200,
            "n_videos": 300,
            "n_categories": 8,
            "n_channels": 30,
            "n_requests": 500,
            "days": 2.0,
        }
        values.update(overrides)
        return cls(**values)

    @property
    def n_rows(self) -> int:
        """Impressions in the log: every candidate of every request is shown."""
        return self.n_requests * self.candidates_per_request


class WorldSummary(BaseModel):
    """What :func:`generate` wrote and the label rates it measured while writing.

    File paths are relative to ``out`` so that ``world.json`` does not depend on where the world
    was written (and stays byte-identical per config).
    """

    model_config = ConfigDict(extra="forbid")

    format: str = FORMAT
    out: Path = Field(exclude=True)
    users_file: str
    videos_file: str
    video_truth_file: str
    log_files: list[str]
    n_users: int
    n_videos: int
    n_requests: int
    n_rows: int
    click_rate: float = Field(description="Logged clicks per impression.")
    like_rate: float = Field(description="Likes per impression.")
    like_per_click: float
    rating_per_click: float = Field(description="Fraction of clicked rows with a rating.")
    mean_rating: float | None = Field(description="Mean observed rating (None when none).")
    watch_time_per_click: float = Field(description="Mean watch seconds over clicked rows.")
    mean_true_click: float
    ctr_by_position: list[float]
    true_click_by_position: list[float]
    elapsed_s: float = Field(0.0, exclude=True, description="Wall time; not in world.json.")

    @property
    def users_path(self) -> Path:
        return self.out / self.users_file

    @property
    def videos_path(self) -> Path:
        return self.out / self.videos_file

    @property
    def log_paths(self) -> list[Path]:
        return [self.out / f for f in self.log_files]


def examination_probability(position: np.ndarray | int, position_bias: float) -> np.ndarray:
    """P(examined | 0-based position) = 1 / (1 + position) ** position_bias.

    Public so that debiasing code and tests use the very formula the generator used.
    """
    return np.power(1.0 + np.asarray(position, dtype=np.float64), -position_bias)


# --------------------------------------------------------------------------------------------
# Helpers


def _rng(seed: int, *key: int) -> np.random.Generator:
    """One independent stream per (stage, chunk): chunking cannot change another chunk's draws."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _softmax_rows(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _cdf(weights: np.ndarray) -> np.ndarray:
    c = np.cumsum(weights, dtype=np.float64)
    c /= c[-1]
    c[-1] = 1.0
    return c


def _sample_rows(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF sampling from a different categorical distribution per row, vectorised.

    ``probs`` is (R, C), ``u`` is (R, M) uniforms; returns (R, M) indices. The per-row CDFs are
    shifted by the row index and concatenated, so one ``searchsorted`` serves every row.
    """
    n_rows, n_cols = probs.shape
    cdf = np.cumsum(probs, axis=1)
    cdf /= cdf[:, -1:]
    offsets = np.arange(n_rows, dtype=np.float64)[:, None]
    flat = (cdf + offsets).ravel()
    q = (np.minimum(u, 1.0 - 1e-9) + offsets).ravel()
    idx = np.searchsorted(flat, q, side="right").reshape(u.shape)
    idx -= (np.arange(n_rows) * n_cols)[:, None]
    return np.clip(idx, 0, n_cols - 1)


# --------------------------------------------------------------------------------------------
# The world: users, videos and their latents


@dataclass
class _World:
    """Users, videos and every latent; held in memory (O(n_users + n_videos))."""

    # users
    age_group: np.ndarray
    country: np.ndarray
    activity: np.ndarray
    account_age_days: np.ndarray
    main_device: np.ndarray
    interest: np.ndarray  # (n_users, d)
    cb_susceptibility: np.ndarray
    long_preference: np.ndarray
    # videos
    category: np.ndarray
    channel: np.ndarray
    duration_s: np.ndarray
    age_days: np.ndarray
    popularity: np.ndarray
    topic: np.ndarray  # (n_videos, d)
    clickbait: np.ndarray
    niche: np.ndarray
    quality: np.ndarray
    # derived, for sampling
    category_topic: np.ndarray  # (n_categories, d)
    category_present: np.ndarray  # bool (n_categories,)
    user_cdf: np.ndarray  # requests pick users by activity
    video_cdf: np.ndarray  # popularity-weighted global pool
    by_category: np.ndarray  # video ids sorted by category
    by_category_cdf: np.ndarray  # category + within-category popularity CDF
    category_start: np.ndarray
    category_end: np.ndarray


def _build_world(cfg: WorldConfig) -> _World:
    """Draws users, channels and videos. Visible features are informative about the latents
    (age group and country shift interests, account age shifts clickbait susceptibility, channel
    carries clickbait and quality, popularity is a weak correlate of both) but never equal them."""
    d = cfg.latent_dim
    n_cat = cfg.n_categories
    rng = _rng(cfg.seed, 0)

    # Categories: nearly orthogonal topic directions with unit expected norm.
    category_topic = rng.normal(0.0, 1.0 / math.sqrt(d), size=(n_cat, d))
    category_base = rng.normal(0.0, 0.5, size=n_cat)  # some categories are broadly popular
    category_duration = rng.normal(0.0, 0.6, size=n_cat)  # e.g. music short, gaming long

    # Users.
    n_u = cfg.n_users
    age_p = np.array([0.08, 0.20, 0.22, 0.18, 0.14, 0.10, 0.08])
    age_group = rng.choice(N_AGE_GROUPS, size=n_u, p=age_p)
    country_p = 1.0 / np.arange(1, N_COUNTRIES + 1) ** 1.1
    country = rng.choice(N_COUNTRIES, size=n_u, p=country_p / country_p.sum())
    activity = np.clip(np.exp(rng.normal(1.0, 0.9, size=n_u)), 0.1, 100.0)
    account_age_days = np.clip(rng.exponential(700.0, size=n_u), 1.0, 6000.0)
    device_logits = np.array([0.6, 0.4, 0.0, -0.8])[None, :] + np.outer(
        age_group - 3.0, [-0.10, -0.05, 0.10, 0.30]
    )
    main_device = _sample_rows(_softmax_rows(device_logits), rng.random((n_u, 1)))[:, 0]
    age_pref = rng.normal(0.0, 0.8, size=(N_AGE_GROUPS, n_cat))
    country_pref = rng.normal(0.0, 0.6, size=(N_COUNTRIES, n_cat))
    pref = category_base[None, :] + age_pref[age_group] + country_pref[country]
    main_cat = np.argmax(pref + rng.gumbel(size=(n_u, n_cat)), axis=1)
    second_cat = np.argmax(pref + rng.gumbel(size=(n_u, n_cat)), axis=1)
    interest = (
        category_topic[main_cat]
        + 0.5 * category_topic[second_cat]
        + rng.normal(0.0, 0.5 / math.sqrt(d), size=(n_u, d))
    )
    interest *= np.exp(rng.normal(0.0, 0.25, size=n_u))[:, None]  # pickiness
    cb_susceptibility = np.clip(
        0.6 + 0.8 * np.exp(-account_age_days / 365.0) + rng.normal(0.0, 0.2, size=n_u), 0.1, 2.0
    )
    long_preference = 0.15 * (age_group - 3.0) + rng.normal(0.0, 0.3, size=n_u)

    # Channels: Zipf-sized, one main category each, clickbait propensity ~ Beta with mean
    # clickbait_fraction and low concentration (most channels clean, a few mostly clickbait).
    n_ch = cfg.n_channels
    channel_w = 1.0 / np.arange(1, n_ch + 1) ** 0.8
    channel_w = rng.permutation(channel_w)
    channel_cat = rng.choice(n_cat, size=n_ch, p=_softmax_rows(category_base[None, :])[0])
    f = cfg.clickbait_fraction
    if f <= 0.0 or f >= 1.0:
        channel_cb = np.full(n_ch, f)
    else:
        channel_cb = rng.beta(2.0 * f, 2.0 * (1.0 - f), size=n_ch)
    channel_quality = rng.normal(0.0, 1.0, size=n_ch)
    channel_pop = rng.normal(0.0, 1.0, size=n_ch)
    channel_duration = rng.normal(0.0, 0.4, size=n_ch)

    # Videos.
    n_v = cfg.n_videos
    channel = rng.choice(n_ch, size=n_v, p=channel_w / channel_w.sum())
    own_cat = rng.random(n_v) < 0.8
    category = np.where(
        own_cat,
        channel_cat[channel],
        rng.choice(n_cat, size=n_v, p=_softmax_rows(category_base[None, :])[0]),
    )
    niche = rng.random(n_v) < cfg.niche_fraction
    is_cb = rng.random(n_v) < channel_cb[channel]
    clickbait = np.where(is_cb, rng.uniform(0.6, 1.0, size=n_v), 0.0)
    noise = rng.normal(0.0, 1.0 / math.sqrt(d), size=(n_v, d))
    # Niche videos sit away from their category centroid (a sub-topic) and are "sharper": only
    # users whose own interests point the same way have a high affinity.
    topic = np.where(
        niche[:, None],
        1.4 * (0.5 * category_topic[category] + 1.0 * noise),
        category_topic[category] + 0.4 * noise,
    )
    quality = 0.6 * channel_quality[channel] + 0.8 * rng.normal(size=n_v) - 0.6 * is_cb
    log_duration = (
        math.log(_REFERENCE_DURATION_S)
        + category_duration[category]
        + channel_duration[channel]
        + 0.3 * niche
        + 0.9 * rng.normal(size=n_v)
    )
    duration_s = np.round(np.clip(np.exp(log_duration), _MIN_DURATION_S, _MAX_DURATION_S))
    age_days = np.round(np.clip(rng.exponential(400.0, size=n_v), 0.5, 4000.0), 2)
    popularity = np.maximum(
        6.0
        + 1.0 * channel_pop[channel]
        + 0.6 * quality
        + 1.2 * clickbait
        - 1.2 * niche
        + 0.4 * np.log1p(age_days)
        + 0.8 * rng.normal(size=n_v),
        0.0,
    )

    # Sampling tables.
    user_cdf = _cdf(activity)
    pool_w = np.exp(0.5 * (popularity - popularity.max()))  # ~ sqrt(view count)
    video_cdf = _cdf(pool_w)
    by_category = np.argsort(category, kind="stable")
    counts = np.bincount(category, minlength=n_cat)
    category_end = np.cumsum(counts)
    category_start = category_end - counts
    within = np.empty(n_v)
    w_sorted = pool_w[by_category]
    for c in np.flatnonzero(counts):  # one iteration per category, not per row
        s, e = category_start[c], category_end[c]
        within[s:e] = _cdf(w_sorted[s:e])
    by_category_cdf = category[by_category] + within

    return _World(
        age_group=age_group,
        country=country,
        activity=np.round(activity, 3),
        account_age_days=np.round(account_age_days, 1),
        main_device=main_device,
        interest=interest,
        cb_susceptibility=cb_susceptibility,
        long_preference=long_preference,
        category=category,
        channel=channel,
        duration_s=duration_s,
        age_days=age_days,
        popularity=np.round(popularity, 4),
        topic=topic,
        clickbait=clickbait,
        niche=niche,
        quality=quality,
        category_topic=category_topic,
        category_present=counts > 0,
        user_cdf=user_cdf,
        video_cdf=video_cdf,
        by_category=by_category,
        by_category_cdf=by_category_cdf,
        category_start=category_start,
        category_end=category_end,
    )


# --------------------------------------------------------------------------------------------
# Requests


def _timestamps(cfg: WorldConfig, first: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Request times: request i sits at quantile (i + U_i) / n_requests of a diurnal intensity
    (peak 20:00, trough 04:00 UTC) over ``days`` days, so times are non-decreasing in request_id
    and each chunk computes its own without seeing the others."""
    span_s = cfg.days * 86400.0
    n_bins = max(1, math.ceil(cfg.days * 24))
    edges = np.minimum(np.arange(n_bins + 1) * 3600.0, span_s)
    bin_hour = ((cfg.start_time // 3600) + np.arange(n_bins)) % 24
    intensity = 1.0 + 0.7 * np.cos(2.0 * math.pi * (bin_hour + 0.5 - 20.0) / 24.0)
    mass = intensity * np.diff(edges)
    cdf = np.concatenate([[0.0], np.cumsum(mass)])
    cdf /= cdf[-1]
    q = (first + np.arange(n) + rng.random(n)) / cfg.n_requests
    seconds = np.interp(q, cdf, edges)
    return cfg.start_time + np.minimum(np.floor(seconds), span_s - 1).astype(np.int64)


def _hash64(*parts: np.ndarray) -> np.ndarray:
    """splitmix64 over integer columns: a deterministic draw per (seed, user, phase) that any
    chunk computes alone, without a random stream shared across chunks."""
    m1, m2, g = (
        np.uint64(0xBF58476D1CE4E5B9),
        np.uint64(0x94D049BB133111EB),
        np.uint64(0x9E3779B97F4A7C15),
    )
    h = np.zeros(np.broadcast(*parts).shape, np.uint64)
    with np.errstate(over="ignore"):
        for p in parts:
            x = h ^ (np.asarray(p, np.int64).view(np.uint64) + g)
            x = (x ^ (x >> np.uint64(30))) * m1
            x = (x ^ (x >> np.uint64(27))) * m2
            h = x ^ (x >> np.uint64(31))
    return h


def _current_interest(
    cfg: WorldConfig, w: _World, users: np.ndarray, timestamp: np.ndarray
) -> np.ndarray:
    """Each request's interest vector ``(n, d)``. With ``interest_drift`` the user's lasting
    interest plus ``interest_drift`` times the topic of the category the user is into *now*: a
    category drawn per (user, period), periods of ``drift_period_days`` starting at a per-user
    offset. No feature says which; only what the user just engaged with shows it."""
    base = w.interest[users]
    if cfg.interest_drift <= 0:
        return base
    period = cfg.drift_period_days * 86400.0
    offset = (_hash64(np.full_like(users, cfg.seed), users) % np.uint64(1 << 20)) / float(1 << 20)
    phase = np.floor((timestamp - cfg.start_time) / period + offset).astype(np.int64)
    present = np.flatnonzero(w.category_present)
    pick = _hash64(np.full_like(users, cfg.seed + 1), users, phase) % np.uint64(len(present))
    return base + cfg.interest_drift * w.category_topic[present[pick.astype(np.int64)]]


def _candidates(
    cfg: WorldConfig, w: _World, interest: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """K distinct candidates per request: a mix of the popularity-weighted global pool and
    popularity-weighted videos of categories the user is interested in. Oversamples 3K draws and
    keeps the first K distinct ones; the rare request with fewer falls back to a Gumbel top-K over
    the whole catalogue."""
    k = cfg.candidates_per_request
    n_req = interest.shape[0]
    m = 3 * k
    # Interest draws: category ~ softmax(3 * <interest, category topic>), then a video of it.
    cat_logits = 3.0 * (interest @ w.category_topic.T)
    cat_logits = np.where(w.category_present[None, :], cat_logits, -np.inf)
    cats = _sample_rows(_softmax_rows(cat_logits), rng.random((n_req, m)))
    u_within = np.minimum(rng.random((n_req, m)), 1.0 - 1e-9)
    pos = np.searchsorted(w.by_category_cdf, cats + u_within, side="right")
    pos = np.clip(pos, w.category_start[cats], w.category_end[cats] - 1)
    from_interest = w.by_category[pos]
    from_pool = np.minimum(
        np.searchsorted(w.video_cdf, rng.random((n_req, m)), side="right"), cfg.n_videos - 1
    )
    draws = np.where(rng.random((n_req, m)) < cfg.interest_share, from_interest, from_pool)

    # Keep the first occurrence of each video, in draw order.
    order = np.argsort(draws, axis=1, kind="stable")
    s = np.take_along_axis(draws, order, axis=1)
    dup_sorted = np.zeros_like(s, dtype=bool)
    dup_sorted[:, 1:] = s[:, 1:] == s[:, :-1]
    dup = np.empty_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    keep = ~dup
    keep &= np.cumsum(keep, axis=1) <= k
    enough = keep.sum(axis=1) == k
    first_k = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    out = np.take_along_axis(draws, first_k, axis=1)

    bad = np.flatnonzero(~enough)
    if bad.size:
        log_w = np.log(np.diff(np.concatenate([[0.0], w.video_cdf])) + 1e-300)
        step = max(1, 2_000_000 // cfg.n_videos)
        for s0 in range(0, bad.size, step):  # sub-batches bound memory; rarely more than one
            rows = bad[s0 : s0 + step]
            keys = log_w[None, :] + rng.gumbel(size=(rows.size, cfg.n_videos))
            out[rows] = np.argpartition(-keys, k - 1, axis=1)[:, :k]
    return out


def _chunk(cfg: WorldConfig, w: _World, index: int) -> pa.Table:
    """Generates requests [index * CHUNK_REQUESTS, ...) as one table, rows in request then
    position order. Everything is vectorised over (requests, K)."""
    rng = _rng(cfg.seed, 1, index)
    first = index * CHUNK_REQUESTS
    n = min(CHUNK_REQUESTS, cfg.n_requests - first)
    k = cfg.candidates_per_request

    users = np.minimum(np.searchsorted(w.user_cdf, rng.random(n), side="right"), cfg.n_users - 1)
    timestamp = _timestamps(cfg, first, n, rng)
    hour = (timestamp // 3600) % 24
    device = np.where(
        rng.random(n) < 0.85, w.main_device[users], rng.integers(0, len(DEVICES), size=n)
    )
    interest = _current_interest(cfg, w, users, timestamp)  # (n, d)
    vids = _candidates(cfg, w, interest, rng)  # (n, k)

    # Per-impression quantities, shape (n, k).
    uu = users[:, None]
    affinity = np.einsum("rd,rkd->rk", interest, w.topic[vids])
    niche = w.niche[vids].astype(np.float64)
    cb = w.clickbait[vids]
    q = w.quality[vids]
    duration = w.duration_s[vids]
    dlog = np.log(duration / _REFERENCE_DURATION_S)
    fresh = np.exp(-w.age_days[vids] / 30.0)
    is_tv = (device == DEVICES.index("tv"))[:, None]
    is_mobile = (device <= DEVICES.index("ios"))[:, None]
    evening = ((hour >= 18) & (hour <= 23))[:, None]
    match = np.maximum(affinity - 0.5, 0.0)  # how well a niche video fits this user
    cs = cfg.clickbait_strength
    lve = cfg.long_video_effect
    ns = cfg.niche_strength
    eps = rng.normal(0.0, cfg.label_noise, size=(4, n, k)) if cfg.label_noise > 0 else None

    click_logit = (
        -0.9
        + 1.6 * affinity
        + 0.25 * q
        + 1.6 * cs * cb * w.cb_susceptibility[uu]
        - 1.2 * ns * niche
        + 0.15 * np.log(w.activity[uu])
        - 0.10 * dlog
        - 0.10 * is_mobile * dlog
        + 0.30 * fresh
        - 0.10 * is_tv
    )
    completion_logit = (
        0.2
        + 0.8 * affinity
        + 0.4 * q
        - 1.8 * cs * cb
        - 0.45 * dlog
        + 0.25 * w.long_preference[uu] * dlog
        + 0.40 * is_tv
        + 0.20 * evening
    )
    like_logit = (
        -2.4
        + 1.0 * affinity
        + 0.7 * q
        - 2.0 * cs * cb
        - 0.6 * lve * dlog
        + 2.0 * ns * niche * match
    )
    rating_logit = (
        0.3 + 0.8 * affinity + 0.9 * q - 1.5 * cs * cb - 0.3 * lve * dlog + 2.0 * ns * niche * match
    )
    # The logging policy: a noisy estimate of the click logit (a click-optimised legacy system),
    # so position correlates with relevance and position bias is confounded.
    policy = click_logit + rng.normal(0.0, cfg.policy_noise, size=(n, k))
    if eps is not None:
        click_logit = click_logit + eps[0]
        completion_logit = completion_logit + eps[1]
        like_logit = like_logit + eps[2]
        rating_logit = rating_logit + eps[3]

    p_click = _sigmoid(click_logit)
    completion = np.clip(_sigmoid(completion_logit), 0.01, 0.99)
    p_like = _sigmoid(like_logit)
    p_rating = _sigmoid(rating_logit)

    # Display order: position 0 = highest policy score.
    order = np.argsort(-policy, axis=1, kind="stable")

    def by_pos(a: np.ndarray) -> np.ndarray:
        return np.take_along_axis(a, order, axis=1)

    vids, p_click, completion, p_like, p_rating, duration = (
        by_pos(a) for a in (vids, p_click, completion, p_like, p_rating, duration)
    )
    position = np.broadcast_to(np.arange(k, dtype=np.int64), (n, k))

    examined = rng.random((n, k)) < examination_probability(position, cfg.position_bias)
    click = examined & (rng.random((n, k)) < p_click)
    kappa = 3.0  # Beta concentration of the watched fraction: mass near 0 and near 1
    frac = rng.beta(kappa * completion, kappa * (1.0 - completion))
    watch_time = np.where(click, np.round(duration * frac, 2), 0.0)
    watch_time = np.minimum(watch_time, duration)
    like = click & (rng.random((n, k)) < p_like)
    rated = click & (rng.random((n, k)) < cfg.rating_rate)
    rating_value = 1.0 + rng.binomial(4, p_rating)

    request_id = np.repeat(np.arange(first, first + n, dtype=np.int64), k)
    device_names = np.array(DEVICES, dtype=object)
    arrays = [
        pa.array(request_id, pa.int64()),
        pa.array(np.repeat(users, k).astype(np.int64), pa.int64()),
        pa.array(vids.ravel().astype(np.int64), pa.int64()),
        pa.array(position.ravel(), pa.int64()),
        pa.array(np.repeat(device_names[device], k), pa.string()),
        pa.array(np.repeat(hour, k).astype(np.int64), pa.int64()),
        pa.array(np.repeat(timestamp, k), pa.int64()),
        pa.array(click.ravel().astype(np.int64), pa.int64()),
        pa.array(watch_time.ravel(), pa.float64()),
        pa.array(like.ravel().astype(np.int64), pa.int64()),
        pa.array(rating_value.ravel(), pa.float64(), mask=~rated.ravel()),
        pa.array(p_click.ravel(), pa.float64()),
        pa.array((p_click * duration * completion).ravel(), pa.float64()),
        pa.array((p_click * p_like).ravel(), pa.float64()),
        pa.array((1.0 + 4.0 * p_rating).ravel(), pa.float64()),
    ]
    return pa.Table.from_arrays(arrays, schema=LOG_SCHEMA)


# --------------------------------------------------------------------------------------------
# Writing


class _RotatingWriter:
    """Writes tables into log/part-NNNNN.parquet, starting a new file every ``per_file`` rows."""

    def __init__(self, directory: Path, per_file: int) -> None:
        self.directory = directory
        self.per_file = per_file
        self.files: list[str] = []
        self._writer: pq.ParquetWriter | None = None
        self._in_file = 0

    def write(self, table: pa.Table) -> None:
        offset = 0
        while offset < table.num_rows:
            if self._writer is None:
                name = f"part-{len(self.files):05d}.parquet"
                self._writer = pq.ParquetWriter(self.directory / name, LOG_SCHEMA)
                self.files.append(f"log/{name}")
                self._in_file = 0
            take = min(table.num_rows - offset, self.per_file - self._in_file)
            self._writer.write_table(table.slice(offset, take))
            offset += take
            self._in_file += take
            if self._in_file >= self.per_file:
                self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class _Stats:
    """Running sums for the summary, so no chunk has to be kept."""

    def __init__(self, k: int) -> None:
        self.rows = 0
        self.clicks = 0
        self.likes = 0
        self.rated = 0
        self.rating_sum = 0.0
        self.watch_sum = 0.0
        self.true_click_sum = 0.0
        self.clicks_by_pos = np.zeros(k)
        self.true_click_by_pos = np.zeros(k)
        self.rows_by_pos = np.zeros(k)

    def add(self, t: pa.Table) -> None:
        click = t.column("click").to_numpy()
        pos = t.column("position").to_numpy()
        true_click = t.column("true_click").to_numpy()
        rating = t.column("rating").to_numpy(zero_copy_only=False)
        self.rows += t.num_rows
        self.clicks += int(click.sum())
        self.likes += int(t.column("like").to_numpy().sum())
        has = ~np.isnan(rating)
        self.rated += int(has.sum())
        self.rating_sum += float(rating[has].sum())
        self.watch_sum += float(t.column("watch_time").to_numpy().sum())
        self.true_click_sum += float(true_click.sum())
        k = self.rows_by_pos.size
        self.clicks_by_pos += np.bincount(pos, weights=click, minlength=k)
        self.true_click_by_pos += np.bincount(pos, weights=true_click, minlength=k)
        self.rows_by_pos += np.bincount(pos, minlength=k)


def _write_table(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path)


def generate(config: WorldConfig, out: Path, progress: bool = True) -> WorldSummary:
    """Generates the world described by ``config`` into directory ``out`` (created if missing).

    Writes ``users.parquet``, ``videos.parquet``, ``log/part-*.parquet`` (impressions in time
    order), ``truth/videos.parquet`` (the video latents, for analysis only: never features) and
    ``world.json`` (config and summary). Existing ``log/part-*.parquet`` files are removed first so
    that a smaller world never leaves stale parts behind. Returns the summary.
    """
    started = time.perf_counter()
    out = Path(out)
    log_dir = out / "log"
    truth_dir = out / "truth"
    log_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    for stale in log_dir.glob("part-*.parquet"):
        stale.unlink()

    cfg = config
    w = _build_world(cfg)
    countries = np.array([f"c{i:02d}" for i in range(N_COUNTRIES)], dtype=object)
    users = pa.Table.from_arrays(
        [
            pa.array(np.arange(cfg.n_users, dtype=np.int64)),
            pa.array(w.age_group.astype(np.int64)),
            pa.array(countries[w.country], pa.string()),
            pa.array(w.activity, pa.float64()),
            pa.array(w.account_age_days, pa.float64()),
        ],
        schema=USERS_SCHEMA,
    )
    videos = pa.Table.from_arrays(
        [
            pa.array(np.arange(cfg.n_videos, dtype=np.int64)),
            pa.array(w.category.astype(np.int64)),
            pa.array(w.channel.astype(np.int64)),
            pa.array(w.duration_s, pa.float64()),
            pa.array(w.age_days, pa.float64()),
            pa.array(w.popularity, pa.float64()),
        ],
        schema=VIDEOS_SCHEMA,
    )
    truth = pa.Table.from_arrays(
        [
            pa.array(np.arange(cfg.n_videos, dtype=np.int64)),
            pa.array(w.clickbait, pa.float64()),
            pa.array(w.niche.astype(np.int64)),
            pa.array(w.quality, pa.float64()),
        ],
        schema=VIDEO_TRUTH_SCHEMA,
    )
    _write_table(users, out / "users.parquet")
    _write_table(videos, out / "videos.parquet")
    _write_table(truth, truth_dir / "videos.parquet")

    k = cfg.candidates_per_request
    writer = _RotatingWriter(log_dir, max(k, cfg.rows_per_file // k * k))
    stats = _Stats(k)
    n_chunks = math.ceil(cfg.n_requests / CHUNK_REQUESTS)
    try:
        with tqdm(
            total=cfg.n_requests, unit="req", desc="synthetic world", disable=not progress
        ) as bar:
            for i in range(n_chunks):
                table = _chunk(cfg, w, i)
                writer.write(table)
                stats.add(table)
                bar.update(table.num_rows // k)
    finally:
        writer.close()

    clicks = max(stats.clicks, 1)
    safe_pos = np.maximum(stats.rows_by_pos, 1)
    summary = WorldSummary(
        out=out,
        users_file="users.parquet",
        videos_file="videos.parquet",
        video_truth_file="truth/videos.parquet",
        log_files=writer.files,
        n_users=cfg.n_users,
        n_videos=cfg.n_videos,
        n_requests=cfg.n_requests,
        n_rows=stats.rows,
        click_rate=stats.clicks / stats.rows,
        like_rate=stats.likes / stats.rows,
        like_per_click=stats.likes / clicks,
        rating_per_click=stats.rated / clicks,
        mean_rating=stats.rating_sum / stats.rated if stats.rated else None,
        watch_time_per_click=stats.watch_sum / clicks,
        mean_true_click=stats.true_click_sum / stats.rows,
        ctr_by_position=(stats.clicks_by_pos / safe_pos).round(6).tolist(),
        true_click_by_position=(stats.true_click_by_pos / safe_pos).round(6).tolist(),
    )
    world = {
        "format": FORMAT,
        "config": cfg.model_dump(mode="json"),
        "summary": summary.model_dump(mode="json"),
    }
    (out / "world.json").write_text(json.dumps(world, indent=2) + "\n")
    summary.elapsed_s = time.perf_counter() - started
    return summary
