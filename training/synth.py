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
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from training.world import (
    DEVICES,
    N_COUNTRIES,
    TRUTH_COLUMNS,
    World,
    WorldConfig,
    build_world,
    current_interest,
    draw_feedback,
    examination_probability,
    logits,
    response,
    rng_stream,
    sample_rows,
    softmax_rows,
)

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
# Requests per generation chunk. A module constant (not a config key) because the random stream
# of each chunk is derived from its index: changing it changes the data.
CHUNK_REQUESTS = 2048

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


def _candidates(
    cfg: WorldConfig, w: World, interest: np.ndarray, rng: np.random.Generator
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
    cats = sample_rows(softmax_rows(cat_logits), rng.random((n_req, m)))
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


def _chunk(cfg: WorldConfig, w: World, index: int) -> pa.Table:
    """Generates requests [index * CHUNK_REQUESTS, ...) as one table, rows in request then
    position order. Everything is vectorised over (requests, K)."""
    rng = rng_stream(cfg.seed, 1, index)
    first = index * CHUNK_REQUESTS
    n = min(CHUNK_REQUESTS, cfg.n_requests - first)
    k = cfg.candidates_per_request

    users = np.minimum(np.searchsorted(w.user_cdf, rng.random(n), side="right"), cfg.n_users - 1)
    timestamp = _timestamps(cfg, first, n, rng)
    hour = (timestamp // 3600) % 24
    device = np.where(
        rng.random(n) < 0.85, w.main_device[users], rng.integers(0, len(DEVICES), size=n)
    )
    interest = current_interest(cfg, w, users, timestamp)  # (n, d): drifts where configured
    vids = _candidates(cfg, w, interest, rng)  # (n, k)

    # Label noise first, then the policy's noise: the order of draws defines the data.
    eps = rng.normal(0.0, cfg.label_noise, size=(4, n, k)) if cfg.label_noise > 0 else None
    z = logits(cfg, w, users, vids, device, hour, interest)
    # The logging policy: a noisy estimate of the click logit (a click-optimised legacy system),
    # so position correlates with relevance and position bias is confounded.
    policy = z[0] + rng.normal(0.0, cfg.policy_noise, size=(n, k))
    r = response(cfg, w, vids, z, eps)

    # Display order: position 0 = highest policy score.
    order = np.argsort(-policy, axis=1, kind="stable")
    vids = np.take_along_axis(vids, order, axis=1)
    r = r.take(order)
    position = np.broadcast_to(np.arange(k, dtype=np.int64), (n, k))
    fb = draw_feedback(cfg, r, position, rng)
    truth = r.truth()

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
        pa.array(fb.click.ravel().astype(np.int64), pa.int64()),
        pa.array(fb.watch_time.ravel(), pa.float64()),
        pa.array(fb.like.ravel().astype(np.int64), pa.int64()),
        pa.array(fb.rating.ravel(), pa.float64(), mask=~fb.rated.ravel()),
        *(pa.array(truth[c].ravel(), pa.float64()) for c in TRUTH_COLUMNS),
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
    w = build_world(cfg)
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
