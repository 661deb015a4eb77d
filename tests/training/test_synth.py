"""Tests of the synthetic world: the output contract other code reads, determinism, label
semantics, the position-bias formula, and that the objectives really conflict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from training.synth import (
    DEVICES,
    LOG_SCHEMA,
    USERS_SCHEMA,
    VIDEOS_SCHEMA,
    WorldConfig,
    WorldSummary,
    examination_probability,
    generate,
)

# Big enough for rates and position effects to be measured to a few percent, small enough to
# generate in well under a second.
MODERATE = {
    "n_users": 1000,
    "n_videos": 1000,
    "n_categories": 10,
    "n_channels": 60,
    "n_requests": 3000,
    "days": 3.0,
}


def _log(summary: WorldSummary) -> dict[str, np.ndarray]:
    table = pa.concat_tables([pq.read_table(p) for p in summary.log_paths])
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


@pytest.fixture(scope="module")
def moderate(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[WorldSummary, dict[str, np.ndarray]]:
    summary = generate(WorldConfig(**MODERATE), tmp_path_factory.mktemp("moderate"), progress=False)
    return summary, _log(summary)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> WorldSummary:
    return generate(WorldConfig.small(), tmp_path_factory.mktemp("small"), progress=False)


# ---------------------------------------------------------------------------------------------
# Contract


def test_schemas_are_exact(small: WorldSummary) -> None:
    assert pq.read_schema(small.users_path).remove_metadata() == USERS_SCHEMA
    assert pq.read_schema(small.videos_path).remove_metadata() == VIDEOS_SCHEMA
    for path in small.log_paths:
        assert pq.read_schema(path).remove_metadata() == LOG_SCHEMA
    expected_log = [
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
    assert [(f.name, f.type) for f in LOG_SCHEMA] == expected_log


def test_users_and_videos_columns(small: WorldSummary) -> None:
    cfg = WorldConfig.small()
    users = pq.read_table(small.users_path).to_pydict()
    assert users["user_id"] == list(range(cfg.n_users))
    assert set(users["age_group"]) <= set(range(7))
    assert all(c in {f"c{i:02d}" for i in range(20)} for c in users["country"])
    assert min(users["activity"]) > 0 and min(users["account_age_days"]) > 0
    act = np.array(users["activity"])
    assert act.mean() > np.median(act)  # skewed
    videos = pq.read_table(small.videos_path).to_pydict()
    assert videos["video_id"] == list(range(cfg.n_videos))
    assert set(videos["category"]) <= set(range(cfg.n_categories))
    assert set(videos["channel_id"]) <= set(range(cfg.n_channels))
    dur = np.array(videos["duration_s"])
    assert dur.min() >= 15.0 and dur.max() <= 3 * 3600.0
    assert np.median(dur) < dur.mean()  # lognormal-ish
    assert min(videos["age_days"]) >= 0 and min(videos["popularity"]) >= 0


def test_log_structure(moderate: tuple[WorldSummary, dict[str, np.ndarray]]) -> None:
    summary, log = moderate
    cfg = WorldConfig(**MODERATE)
    k = cfg.candidates_per_request
    n = cfg.n_requests
    assert summary.n_rows == log["request_id"].size == n * k
    np.testing.assert_array_equal(log["request_id"], np.repeat(np.arange(n), k))
    np.testing.assert_array_equal(log["position"], np.tile(np.arange(k), n))
    vids = log["video_id"].reshape(n, k)
    assert (np.sort(vids, axis=1)[:, 1:] != np.sort(vids, axis=1)[:, :-1]).all()  # distinct
    assert vids.min() >= 0 and vids.max() < cfg.n_videos
    # one user, device and time per request
    for col in ("user_id", "device", "hour", "timestamp"):
        per_req = log[col].reshape(n, k)
        assert (per_req == per_req[:, :1]).all(), col
    ts = log["timestamp"]
    assert (np.diff(ts) >= 0).all()
    assert ts.min() >= cfg.start_time and ts.max() < cfg.start_time + cfg.days * 86400
    np.testing.assert_array_equal(log["hour"], (ts // 3600) % 24)
    assert set(log["device"]) <= set(DEVICES)
    # a user mostly uses one device
    users, devices = log["user_id"][::k], log["device"][::k]
    codes = np.array([DEVICES.index(d) for d in devices])
    counts = np.zeros((cfg.n_users, len(DEVICES)))
    np.add.at(counts, (users, codes), 1)
    active = counts.sum(axis=1) >= 5
    assert counts[active].max(axis=1).sum() / counts[active].sum() > 0.75


def test_world_json(small: WorldSummary) -> None:
    world = json.loads((small.out / "world.json").read_text())
    assert WorldConfig(**world["config"]) == WorldConfig.small()
    assert world["summary"]["n_rows"] == small.n_rows
    assert world["summary"]["log_files"] == small.log_files
    assert (small.out / "truth" / "videos.parquet").exists()


# ---------------------------------------------------------------------------------------------
# Determinism and files


def _bytes(summary: WorldSummary) -> list[bytes]:
    paths = [summary.users_path, summary.videos_path, *summary.log_paths]
    return [p.read_bytes() for p in paths] + [(summary.out / "world.json").read_bytes()]


def test_same_seed_same_bytes(tmp_path: Path, small: WorldSummary) -> None:
    again = generate(WorldConfig.small(), tmp_path / "again", progress=False)
    assert _bytes(again) == _bytes(small)


def test_different_seed_differs(tmp_path: Path, small: WorldSummary) -> None:
    other = generate(WorldConfig.small(seed=1), tmp_path / "other", progress=False)
    a = pq.read_table(small.log_paths[0])
    b = pq.read_table(other.log_paths[0])
    assert not a.column("video_id").equals(b.column("video_id"))
    assert pq.read_table(small.videos_path) != pq.read_table(other.videos_path)


def test_rows_per_file_splits_the_same_rows(tmp_path: Path, small: WorldSummary) -> None:
    split = generate(WorldConfig.small(rows_per_file=1010), tmp_path / "split", progress=False)
    assert len(split.log_paths) == 10  # 10,000 rows in files of 1,000 (whole requests)
    assert [p.name for p in split.log_paths] == [f"part-{i:05d}.parquet" for i in range(10)]
    assert all(pq.read_metadata(p).num_rows == 1000 for p in split.log_paths)
    joined = pa.concat_tables([pq.read_table(p) for p in split.log_paths])
    assert joined.equals(pa.concat_tables([pq.read_table(p) for p in small.log_paths]))


def test_regenerating_smaller_removes_stale_parts(tmp_path: Path) -> None:
    generate(WorldConfig.small(rows_per_file=1000), tmp_path, progress=False)
    summary = generate(WorldConfig.small(), tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "log").iterdir()) == ["part-00000.parquet"]
    assert summary.log_files == ["log/part-00000.parquet"]


def test_tiny_catalogue_still_gives_distinct_candidates(tmp_path: Path) -> None:
    cfg = WorldConfig.small(n_videos=20, n_requests=50)  # every request must show all 20
    log = _log(generate(cfg, tmp_path, progress=False))
    vids = np.sort(log["video_id"].reshape(50, 20), axis=1)
    np.testing.assert_array_equal(vids, np.tile(np.arange(20), (50, 1)))


# ---------------------------------------------------------------------------------------------
# Labels and truth


def test_label_rates_in_documented_ranges(moderate: tuple[WorldSummary, dict]) -> None:
    summary, log = moderate
    clicks = log["click"].sum()
    assert 0.10 <= log["click"].mean() <= 0.25
    assert 0.10 <= log["like"].sum() / clicks <= 0.30
    rated = ~np.isnan(log["rating"])
    assert 0.07 <= rated.sum() / clicks <= 0.13  # rating_rate = 0.1, ~6,000 clicks
    assert summary.click_rate == pytest.approx(log["click"].mean())
    assert summary.like_per_click == pytest.approx(log["like"].sum() / clicks)


def test_label_semantics(moderate: tuple[WorldSummary, dict]) -> None:
    summary, log = moderate
    videos = pq.read_table(summary.videos_path).to_pydict()
    duration = np.array(videos["duration_s"])[log["video_id"]]
    click = log["click"] == 1
    assert set(np.unique(log["click"])) == {0, 1} and set(np.unique(log["like"])) <= {0, 1}
    assert (log["watch_time"][~click] == 0).all()
    assert (log["watch_time"] >= 0).all() and (log["watch_time"] <= duration).all()
    assert log["watch_time"][click].mean() > 0
    assert (log["like"][~click] == 0).all()
    rating = log["rating"]
    rated = ~np.isnan(rating)
    assert not (rated & ~click).any()
    assert set(np.unique(rating[rated])) <= {1.0, 2.0, 3.0, 4.0, 5.0}


def test_truth_columns_consistent(moderate: tuple[WorldSummary, dict]) -> None:
    summary, log = moderate
    videos = pq.read_table(summary.videos_path).to_pydict()
    duration = np.array(videos["duration_s"])[log["video_id"]]
    tc, tw, tl, tr = (log[c] for c in ("true_click", "true_watch_time", "true_like", "true_rating"))
    for col in (tc, tw, tl, tr):
        assert np.isfinite(col).all()
    assert ((tc > 0) & (tc < 1)).all()
    assert ((tl >= 0) & (tl <= tc)).all()  # true_like = true_click * P(like | click)
    assert ((tw >= 0) & (tw <= tc * duration + 1e-9)).all()  # E[watch | click] <= duration
    assert ((tr >= 1) & (tr <= 5)).all()
    # The truth is what the labels average to (on examined = position 0 rows for click).
    top = log["position"] == 0
    assert log["click"][top].mean() == pytest.approx(tc[top].mean(), abs=0.03)
    click = log["click"] == 1
    like_given_click = (tl / tc)[click]
    assert log["like"][click].mean() == pytest.approx(like_given_click.mean(), abs=0.02)
    rated = ~np.isnan(log["rating"])
    assert log["rating"][rated].mean() == pytest.approx(tr[rated].mean(), abs=0.1)
    watch_given_click = (tw / tc)[click]
    assert log["watch_time"][click].mean() == pytest.approx(watch_given_click.mean(), rel=0.08)


# ---------------------------------------------------------------------------------------------
# Position bias


def test_examination_formula() -> None:
    np.testing.assert_allclose(examination_probability(np.arange(4), 1.0), [1, 1 / 2, 1 / 3, 1 / 4])
    np.testing.assert_allclose(examination_probability(np.arange(4), 0.0), 1.0)
    np.testing.assert_allclose(examination_probability(3, 2.0), 1 / 16)


def _ratio_by_position(log: dict[str, np.ndarray], k: int) -> np.ndarray:
    clicks = np.bincount(log["position"], weights=log["click"], minlength=k)
    expected = np.bincount(log["position"], weights=log["true_click"], minlength=k)
    return clicks / expected


def test_position_bias_follows_the_examination_formula(moderate: tuple) -> None:
    _, log = moderate
    k = 20
    ctr = np.bincount(log["position"], weights=log["click"]) / np.bincount(log["position"])
    assert ctr[0] > ctr[1] > ctr[3] > ctr[10]
    ratio = _ratio_by_position(log, k)
    exam = examination_probability(np.arange(k), 1.0)
    np.testing.assert_allclose(ratio[:4], exam[:4], rtol=0.12)
    # log-log fit of the bias exponent over all positions, weighted by expected clicks
    x = np.log1p(np.arange(1, k))
    y = np.log(ratio[1:])
    wts = np.bincount(log["position"], weights=log["true_click"] * exam[log["position"]])[1:]
    b_hat = -np.sum(wts * x * y) / np.sum(wts * x * x)
    assert b_hat == pytest.approx(1.0, abs=0.1)


def test_policy_confounds_position_with_relevance(moderate: tuple) -> None:
    _, log = moderate
    true_ctr = np.bincount(log["position"], weights=log["true_click"]) / np.bincount(
        log["position"]
    )
    assert true_ctr[0] > true_ctr[9] > true_ctr[19]


def test_no_position_bias_ctr_follows_truth(tmp_path: Path) -> None:
    cfg = WorldConfig(**{**MODERATE, "n_requests": 1500, "position_bias": 0.0})
    log = _log(generate(cfg, tmp_path, progress=False))
    ratio = _ratio_by_position(log, cfg.candidates_per_request)
    np.testing.assert_allclose(ratio, 1.0, atol=0.08)
    # and the logged CTR still falls with position: the policy puts relevant videos first
    ctr = np.bincount(log["position"], weights=log["click"]) / np.bincount(log["position"])
    assert ctr[:5].mean() > ctr[-5:].mean() + 0.1


# ---------------------------------------------------------------------------------------------
# Conflicting objectives


def _video_means(summary: WorldSummary, log: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    truth = pq.read_table(summary.out / "truth" / "videos.parquet").to_pydict()
    videos = pq.read_table(summary.videos_path).to_pydict()
    v = log["video_id"]
    return {
        "clickbait": (np.array(truth["clickbait"]) > 0)[v],
        "niche": (np.array(truth["niche"]) == 1)[v],
        "duration": np.array(videos["duration_s"])[v],
    }


def _click_weighted(log: dict[str, np.ndarray], col: str, mask: np.ndarray) -> float:
    """E[col / true_click] weighted by true_click: the value of `col` per click."""
    return float(log[col][mask].sum() / log["true_click"][mask].sum())


def test_clickbait_raises_clicks_but_lowers_like_rating_completion(moderate: tuple) -> None:
    summary, log = moderate
    cb = _video_means(summary, log)["clickbait"]
    assert cb.mean() > 0.05
    assert log["true_click"][cb].mean() > log["true_click"][~cb].mean() + 0.05
    assert _click_weighted(log, "true_like", cb) < 0.5 * _click_weighted(log, "true_like", ~cb)
    assert log["true_rating"][cb].mean() < log["true_rating"][~cb].mean() - 0.5
    # completion: watched fraction of the duration, given a click
    m = _video_means(summary, log)
    frac = log["true_watch_time"] / (log["true_click"] * m["duration"])
    assert frac[cb].mean() < frac[~cb].mean() - 0.1


def test_long_videos_watched_longer_but_liked_less(moderate: tuple) -> None:
    summary, log = moderate
    dur = _video_means(summary, log)["duration"]
    long, short = dur > 1200, dur < 240
    assert _click_weighted(log, "true_watch_time", long) > 3 * _click_weighted(
        log, "true_watch_time", short
    )
    assert _click_weighted(log, "true_like", long) < 0.7 * _click_weighted(log, "true_like", short)


def test_niche_videos_clicked_less_but_liked_more(moderate: tuple) -> None:
    summary, log = moderate
    niche = _video_means(summary, log)["niche"]
    assert log["true_click"][niche].mean() < log["true_click"][~niche].mean() - 0.1
    assert _click_weighted(log, "true_like", niche) > _click_weighted(log, "true_like", ~niche)


def test_objectives_disagree_on_the_best_candidate(moderate: tuple) -> None:
    """Ranking by click and ranking by like pick different videos most of the time; click and
    rating are far from rank-identical across impressions."""
    _, log = moderate
    k = 20
    tc = log["true_click"].reshape(-1, k)
    tl = log["true_like"].reshape(-1, k)
    assert (tc.argmax(axis=1) == tl.argmax(axis=1)).mean() < 0.5
    rank_c = np.argsort(np.argsort(log["true_click"]))
    rank_r = np.argsort(np.argsort(log["true_rating"]))
    assert np.corrcoef(rank_c, rank_r)[0, 1] < 0.6


def test_clickbait_strength_knob(tmp_path: Path) -> None:
    def gap(strength: float) -> float:
        cfg = WorldConfig(**{**MODERATE, "n_requests": 1000, "clickbait_strength": strength})
        summary = generate(cfg, tmp_path / str(strength), progress=False)
        log = _log(summary)
        cb = _video_means(summary, log)["clickbait"]
        return _click_weighted(log, "true_like", ~cb) - _click_weighted(log, "true_like", cb)

    assert gap(2.0) > gap(0.0) + 0.05


# ---------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    "bad",
    [
        {"n_users": -1},
        {"n_requests": 0},
        {"unknown_key": 1},
        {"clickbait_fraction": 1.5},
        {"position_bias": -0.5},
        {"rating_rate": -0.1},
        {"n_videos": 10, "candidates_per_request": 20},
        {"rows_per_file": 5},
    ],
)
def test_invalid_config_rejected(bad: dict) -> None:
    with pytest.raises(ValidationError):
        WorldConfig(**bad)


def test_config_is_frozen() -> None:
    with pytest.raises(ValidationError):
        WorldConfig().seed = 3  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# The response model on its own: what the loop test draws feedback from


def test_simulated_feedback_follows_the_generators_truth(moderate: tuple) -> None:
    """Feedback drawn by ``simulate_feedback`` for the log's own impressions (same users,
    videos, context and positions) has the log's truth and, up to sampling noise, its label
    rates per position: the loop test's events and the generator's log come from one world."""
    from training.world import build_world, simulate_feedback

    _, log = moderate
    cfg = WorldConfig(**MODERATE)
    k = cfg.candidates_per_request
    shape = (-1, k)
    users = log["user_id"].reshape(shape)[:, 0]
    device = np.array([DEVICES.index(d) for d in log["device"].reshape(shape)[:, 0]])
    hour = log["hour"].reshape(shape)[:, 0]
    vids = log["video_id"].reshape(shape)
    position = log["position"].reshape(shape)
    world = build_world(cfg)

    noiseless = cfg.model_copy(update={"label_noise": 0.0})
    _, r = simulate_feedback(
        noiseless, world, users, vids, device, hour, position, np.random.default_rng(0)
    )
    # With label noise the log's truth is one draw of it; its mean over impressions is not.
    truth = r.truth()
    assert np.corrcoef(truth["true_click"].ravel(), log["true_click"])[0, 1] > 0.95

    fb, r = simulate_feedback(
        cfg, world, users, vids, device, hour, position, np.random.default_rng(1)
    )
    n = len(log["click"])
    for name, sim, logged in (
        ("click", fb.click.ravel(), log["click"]),
        ("like", fb.like.ravel(), log["like"]),
        ("rated", fb.rated.ravel(), ~np.isnan(log["rating"])),
    ):
        p = logged.mean()
        assert abs(sim.mean() - p) < 4 * np.sqrt(2 * p * (1 - p) / n), name
    # Per position: position 0 and the last slot differ in click rate by the examination bias.
    sim_pos = fb.click.mean(axis=0)
    log_pos = log["click"].reshape(shape).mean(axis=0)
    assert np.abs(sim_pos - log_pos).max() < 0.03
    watch = log["watch_time"][log["click"] == 1].mean()
    assert fb.watch_time[fb.click].mean() == pytest.approx(watch, rel=0.1)
    assert np.all(fb.watch_time <= r.duration) and np.all(fb.watch_time[~fb.click] == 0)


def test_simulated_feedback_is_exactly_the_generators_without_noise(tmp_path: Path) -> None:
    """Without label noise the truth is a function of (user, video, context) alone: the same
    numbers as the log's ``true_*`` columns."""
    from training.world import build_world, simulate_feedback

    cfg = WorldConfig.small(label_noise=0.0, n_requests=200)
    log = _log(generate(cfg, tmp_path, progress=False))
    k = cfg.candidates_per_request
    users = log["user_id"].reshape(-1, k)[:, 0]
    device = np.array([DEVICES.index(d) for d in log["device"].reshape(-1, k)[:, 0]])
    _, r = simulate_feedback(
        cfg,
        build_world(cfg),
        users,
        log["video_id"].reshape(-1, k),
        device,
        log["hour"].reshape(-1, k)[:, 0],
        log["position"].reshape(-1, k),
        np.random.default_rng(0),
    )
    for c, v in r.truth().items():
        np.testing.assert_allclose(v.ravel(), log[c], rtol=1e-12, err_msg=c)
