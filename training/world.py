"""The synthetic world itself: who its users and videos are, and how a user responds to a shown
video. ``training/synth.py`` serves requests in this world through a logging policy and writes
the log; the loop test (tests/training/test_loop.py) serves them through the real service
instead and draws the feedback from the same response model (:func:`simulate_feedback`), so both
logs come from one truth.

Every formula is documented in ``docs/synthetic-world.md``; keep the two in step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "DEVICES",
    "TRUTH_COLUMNS",
    "Feedback",
    "Response",
    "World",
    "WorldConfig",
    "build_world",
    "draw_feedback",
    "examination_probability",
    "logits",
    "response",
    "simulate_feedback",
]

DEVICES: tuple[str, ...] = ("android", "ios", "web", "tv")
N_COUNTRIES = 20
N_AGE_GROUPS = 7
_REFERENCE_DURATION_S = 240.0
_MIN_DURATION_S = 15.0
_MAX_DURATION_S = 3 * 3600.0


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


def examination_probability(position: np.ndarray | int, position_bias: float) -> np.ndarray:
    """P(examined | 0-based position) = 1 / (1 + position) ** position_bias.

    Public so that debiasing code and tests use the very formula the generator used.
    """
    return np.power(1.0 + np.asarray(position, dtype=np.float64), -position_bias)


# --------------------------------------------------------------------------------------------
# Helpers


def rng_stream(seed: int, *key: int) -> np.random.Generator:
    """One independent stream per (stage, chunk): chunking cannot change another chunk's draws."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _cdf(weights: np.ndarray) -> np.ndarray:
    c = np.cumsum(weights, dtype=np.float64)
    c /= c[-1]
    c[-1] = 1.0
    return c


def sample_rows(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
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
class World:
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


def build_world(cfg: WorldConfig) -> World:
    """Draws users, channels and videos. Visible features are informative about the latents
    (age group and country shift interests, account age shifts clickbait susceptibility, channel
    carries clickbait and quality, popularity is a weak correlate of both) but never equal them."""
    d = cfg.latent_dim
    n_cat = cfg.n_categories
    rng = rng_stream(cfg.seed, 0)

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
    main_device = sample_rows(softmax_rows(device_logits), rng.random((n_u, 1)))[:, 0]
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
    channel_cat = rng.choice(n_cat, size=n_ch, p=softmax_rows(category_base[None, :])[0])
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
        rng.choice(n_cat, size=n_v, p=softmax_rows(category_base[None, :])[0]),
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

    return World(
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
# How a user responds to a shown video


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


def current_interest(
    cfg: WorldConfig, w: World, users: np.ndarray, timestamp: np.ndarray | None
) -> np.ndarray:
    """Each request's interest vector ``(n, d)``. With ``interest_drift`` the user's lasting
    interest plus ``interest_drift`` times the topic of the category the user is into *now*: a
    category drawn per (user, period), periods of ``drift_period_days`` starting at a per-user
    offset. No feature says which; only what the user just engaged with shows it."""
    base = w.interest[users]
    if cfg.interest_drift <= 0 or timestamp is None:
        return base
    period = cfg.drift_period_days * 86400.0
    offset = (_hash64(np.full_like(users, cfg.seed), users) % np.uint64(1 << 20)) / float(1 << 20)
    phase = np.floor((timestamp - cfg.start_time) / period + offset).astype(np.int64)
    present = np.flatnonzero(w.category_present)
    pick = _hash64(np.full_like(users, cfg.seed + 1), users, phase) % np.uint64(len(present))
    return base + cfg.interest_drift * w.category_topic[present[pick.astype(np.int64)]]


TRUTH_COLUMNS = ("true_click", "true_watch_time", "true_like", "true_rating")
_WATCH_KAPPA = 3.0  # Beta concentration of the watched fraction: mass near 0 and near 1


def logits(
    cfg: WorldConfig,
    w: World,
    users: np.ndarray,
    vids: np.ndarray,
    device: np.ndarray,
    hour: np.ndarray,
    interest: np.ndarray | None = None,
) -> np.ndarray:
    """The noise-free logits of click, completion, like and rating, shape ``(4, n, k)``, for
    ``users`` (n,) shown ``vids`` (n, k) on ``device`` (n,; indices into :data:`DEVICES`) at
    ``hour`` (n,), with the users' interest vectors now (:func:`current_interest`; default their
    lasting ones). No randomness: the truth of the world."""
    uu = users[:, None]
    interest = w.interest[users] if interest is None else interest
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
    return np.stack([click_logit, completion_logit, like_logit, rating_logit])


@dataclass
class Response:
    """Position-free probabilities of each (request, shown video), all of shape (n, k)."""

    p_click: np.ndarray
    completion: np.ndarray  # expected watched fraction once clicked
    p_like: np.ndarray  # given a click
    p_rating: np.ndarray  # stars are 1 + Binomial(4, p_rating)
    duration: np.ndarray  # seconds

    def take(self, order: np.ndarray) -> Response:
        """Reordered along the candidates (``take_along_axis``), e.g. into display order."""
        return Response(*(np.take_along_axis(a, order, axis=1) for a in self.__dict__.values()))

    def truth(self) -> dict[str, np.ndarray]:
        """The log's ``true_*`` columns: every label's expectation without position bias."""
        return {
            "true_click": self.p_click,
            "true_watch_time": self.p_click * self.duration * self.completion,
            "true_like": self.p_click * self.p_like,
            "true_rating": 1.0 + 4.0 * self.p_rating,
        }


def response(
    cfg: WorldConfig, w: World, vids: np.ndarray, z: np.ndarray, eps: np.ndarray | None
) -> Response:
    """Probabilities from :func:`logits` ``z`` plus per-impression label noise ``eps`` (the
    shocks no feature explains; same shape as ``z``, or None)."""
    if eps is not None:
        z = z + eps
    return Response(
        p_click=_sigmoid(z[0]),
        completion=np.clip(_sigmoid(z[1]), 0.01, 0.99),
        p_like=_sigmoid(z[2]),
        p_rating=_sigmoid(z[3]),
        duration=w.duration_s[vids],
    )


@dataclass
class Feedback:
    """What users did with what they were shown, all of shape (n, k)."""

    click: np.ndarray  # bool
    watch_time: np.ndarray  # seconds, 0 unless clicked
    like: np.ndarray  # bool
    rated: np.ndarray  # bool
    rating: np.ndarray  # stars, meaningful where rated


def draw_feedback(
    cfg: WorldConfig, r: Response, position: np.ndarray, rng: np.random.Generator
) -> Feedback:
    """Clicks, watch seconds, likes and ratings of impressions at 0-based ``position``: a click
    needs the user to examine the slot (:func:`examination_probability`) and to want the video."""
    shape = r.p_click.shape
    examined = rng.random(shape) < examination_probability(position, cfg.position_bias)
    click = examined & (rng.random(shape) < r.p_click)
    frac = rng.beta(_WATCH_KAPPA * r.completion, _WATCH_KAPPA * (1.0 - r.completion))
    watch_time = np.where(click, np.round(r.duration * frac, 2), 0.0)
    watch_time = np.minimum(watch_time, r.duration)
    like = click & (rng.random(shape) < r.p_like)
    rated = click & (rng.random(shape) < cfg.rating_rate)
    rating = 1.0 + rng.binomial(4, r.p_rating)
    return Feedback(click, watch_time, like, rated, rating)


def simulate_feedback(
    cfg: WorldConfig,
    w: World,
    users: np.ndarray,
    vids: np.ndarray,
    device: np.ndarray,
    hour: np.ndarray,
    position: np.ndarray,
    rng: np.random.Generator,
    timestamp: np.ndarray | None = None,
) -> tuple[Feedback, Response]:
    """The world's feedback to ``vids`` (n, k) shown at ``position`` (n, k) by any ranker, not
    only the generator's logging policy: the same response model and draws as the generated
    log, with fresh label noise from ``rng``; ``timestamp`` (n,) places the requests in time for
    a world whose interests drift."""
    eps = rng.normal(0.0, cfg.label_noise, size=(4, *vids.shape)) if cfg.label_noise > 0 else None
    interest = current_interest(cfg, w, users, timestamp)
    r = response(cfg, w, vids, logits(cfg, w, users, vids, device, hour, interest), eps)
    return draw_feedback(cfg, r, position, rng), r
