"""Each metric against a brute-force reference written as directly from its definition as
possible (explicit loops over pairs, rows or orderings), on small random inputs rich in ties."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from ranker import metrics as M

FAST = settings(max_examples=40, deadline=None, database=None)


# --------------------------------------------------------------------------------------------
# Brute-force references
# --------------------------------------------------------------------------------------------


def auc_ref(labels, scores) -> float:
    pos = [s for y, s in zip(labels, scores, strict=True) if y == 1]
    neg = [s for y, s in zip(labels, scores, strict=True) if y == 0]
    if not pos or not neg:
        return math.nan
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def group_auc_ref(labels, scores, groups) -> tuple[list[float], list[float]]:
    aucs, weights = [], []
    for gid in sorted(set(groups.tolist())):
        sel = groups == gid
        value = auc_ref(labels[sel], scores[sel])
        if not math.isnan(value):
            aucs.append(value)
            weights.append(float(sel.sum()))
    return aucs, weights


def xauc_ref(y, pred) -> float:
    good, total = 0.0, 0
    for i in range(len(y)):
        for j in range(i + 1, len(y)):
            if y[i] == y[j]:
                continue
            total += 1
            same_way = (y[i] - y[j]) * (pred[i] - pred[j])
            good += 1.0 if same_way > 0 else 0.5 if same_way == 0 else 0.0
    return good / total if total else math.nan


def calibration_ref(labels, probs, bins):
    edges = np.linspace(0.0, 1.0, bins + 1)
    members: list[list[int]] = [[] for _ in range(bins)]
    for i, p in enumerate(probs):
        for b in range(bins):
            last = b == bins - 1
            if edges[b] <= p and (p < edges[b + 1] or (last and p <= edges[b + 1])):
                members[b].append(i)
                break
    ece = 0.0
    mean_pred, frac_pos, count = [], [], []
    for rows in members:
        count.append(len(rows))
        if rows:
            mp = sum(probs[i] for i in rows) / len(rows)
            fp = sum(labels[i] for i in rows) / len(rows)
            ece += len(rows) / len(probs) * abs(fp - mp)
        else:
            mp = fp = math.nan
        mean_pred.append(mp)
        frac_pos.append(fp)
    return ece, mean_pred, frac_pos, count


def dcg_ref(rels_in_order, k) -> float:
    return sum(r / math.log2(pos + 2) for pos, r in enumerate(rels_in_order[:k]))


def ndcg_ref(relevance, scores, groups, k) -> tuple[float, list[float]]:
    """Expected DCG over every ordering consistent with the scores (ties permuted in all
    ways), by enumeration, over the ideal DCG."""
    values = []
    for gid in sorted(set(groups.tolist())):
        idx = np.flatnonzero(groups == gid)
        rel, sc = relevance[idx], scores[idx]
        ideal = dcg_ref(sorted(rel.tolist(), reverse=True), k)
        if ideal == 0:
            continue
        dcgs = [
            dcg_ref([rel[i] for i in perm], k)
            for perm in itertools.permutations(range(len(idx)))
            if all(sc[perm[a]] >= sc[perm[a + 1]] for a in range(len(idx) - 1))
        ]
        values.append(sum(dcgs) / len(dcgs) / ideal)
    return (sum(values) / len(values) if values else math.nan), values


# --------------------------------------------------------------------------------------------
# Strategies: few distinct values so that ties are common
# --------------------------------------------------------------------------------------------


@st.composite
def binary_case(draw, max_n=30, n_groups=4):
    n = draw(st.integers(0, max_n))
    labels = np.array(draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n, max_size=n)))
    scores = np.array(
        draw(st.lists(st.sampled_from([-1.0, 0.0, 0.25, 0.5, 0.75, 2.0]), min_size=n, max_size=n))
    )
    groups = np.array(
        draw(st.lists(st.integers(-2, n_groups - 3), min_size=n, max_size=n)), dtype=np.int64
    )
    return labels, scores, groups


@st.composite
def regression_case(draw, max_n=25, n_groups=3):
    n = draw(st.integers(0, max_n))
    y = np.array(
        draw(st.lists(st.sampled_from([0.0, 1.0, 2.5, 3.0, 10.0]), min_size=n, max_size=n))
    )
    pred = np.array(draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=n, max_size=n)))
    groups = np.array(
        draw(st.lists(st.integers(0, n_groups - 1), min_size=n, max_size=n)), dtype=np.int64
    )
    return y, pred, groups


def assert_close_or_nan(actual: float, expected: float) -> None:
    if math.isnan(expected):
        assert math.isnan(actual)
    else:
        assert actual == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------------------------
# AUC / GAUC
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "scores", "expected"),
    [
        ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),  # sklearn's roc_auc_score doc example
        ([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9], 0.875),  # one tied pair counts 1/2
        ([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3], 0.5),  # all tied
        ([0, 0, 1, 1], [1.0, 2.0, 3.0, 4.0], 1.0),
        ([1, 1, 0, 0], [1.0, 2.0, 3.0, 4.0], 0.0),
        ([True, False, True], [3, 1, 2], 1.0),  # bools and ints accepted
    ],
)
def test_auc_known_values(labels, scores, expected):
    assert M.auc(np.array(labels), np.array(scores)) == pytest.approx(expected)


def test_auc_nan_for_one_class_or_empty():
    assert math.isnan(M.auc(np.array([1.0, 1.0]), np.array([0.2, 0.3])))
    assert math.isnan(M.auc(np.array([0.0]), np.array([0.2])))
    assert math.isnan(M.auc(np.array([]), np.array([])))


@FAST
@given(binary_case())
def test_auc_matches_brute_force(case):
    labels, scores, _ = case
    assert_close_or_nan(M.auc(labels, scores), auc_ref(labels, scores))


def test_auc_matches_mann_whitney_on_larger_input():
    rng = np.random.default_rng(1)
    labels = (rng.random(3000) < 0.2).astype(float)
    scores = np.round(rng.normal(size=3000) + labels, 1)  # many ties
    u = stats.mannwhitneyu(scores[labels == 1], scores[labels == 0]).statistic
    expected = u / ((labels == 1).sum() * (labels == 0).sum())
    assert M.auc(labels, scores) == pytest.approx(expected, abs=1e-12)


@FAST
@given(binary_case())
def test_group_auc_matches_per_group_loop(case):
    labels, scores, groups = case
    per_group, weights = M.group_auc(labels, scores, groups)
    ref_aucs, ref_weights = group_auc_ref(labels, scores, groups)
    np.testing.assert_allclose(per_group, ref_aucs, atol=1e-12)
    np.testing.assert_array_equal(weights, ref_weights)
    expected = np.dot(ref_aucs, ref_weights) / sum(ref_weights) if ref_aucs else math.nan
    assert_close_or_nan(M.gauc(labels, scores, groups), expected)


def test_gauc_weights_by_impressions_and_skips_one_class_groups():
    # group 7: 4 rows, AUC 1.0; group 3: 2 rows, AUC 0.0; group 5: positives only (skipped)
    labels = np.array([0, 1, 0, 1, 1, 0, 1, 1])
    scores = np.array([0.1, 0.9, 0.2, 0.8, 0.1, 0.9, 0.5, 0.6])
    groups = np.array([7, 7, 7, 7, 3, 3, 5, 5])
    per_group, weights = M.group_auc(labels, scores, groups)
    np.testing.assert_allclose(per_group, [0.0, 1.0])  # ascending group id: 3, 7
    np.testing.assert_allclose(weights, [2.0, 4.0])
    assert M.gauc(labels, scores, groups) == pytest.approx((0.0 * 2 + 1.0 * 4) / 6)


def test_gauc_nan_when_no_group_qualifies():
    labels = np.array([0, 0, 1, 1])
    groups = np.array([1, 1, 2, 2])
    per_group, weights = M.group_auc(labels, np.array([0.1, 0.2, 0.3, 0.4]), groups)
    assert per_group.size == 0 and weights.size == 0
    assert math.isnan(M.gauc(labels, np.array([0.1, 0.2, 0.3, 0.4]), groups))


def test_gauc_one_group_equals_auc():
    rng = np.random.default_rng(2)
    labels = (rng.random(500) < 0.4).astype(float)
    scores = np.round(rng.random(500), 2)
    assert M.gauc(labels, scores, np.full(500, 9)) == pytest.approx(M.auc(labels, scores))


# --------------------------------------------------------------------------------------------
# Pointwise losses
# --------------------------------------------------------------------------------------------


def test_logloss_matches_formula_and_clips():
    labels = np.array([1.0, 0.0, 1.0, 0.0])
    probs = np.array([0.9, 0.2, 0.6, 0.5])
    expected = -np.mean([math.log(0.9), math.log(0.8), math.log(0.6), math.log(0.5)])
    assert M.logloss(labels, probs) == pytest.approx(expected)
    assert M.logloss(np.array([1.0]), np.array([0.0])) == pytest.approx(-math.log(1e-7))
    assert M.logloss(np.array([0.0]), np.array([1.0]), eps=1e-3) == pytest.approx(-math.log(1e-3))
    assert M.logloss(np.array([0.5]), np.array([0.5])) == pytest.approx(math.log(2))  # soft


def test_rmse_mae():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    pred = np.array([1.0, 4.0, 2.0, 4.0])
    assert M.rmse(y, pred) == pytest.approx(math.sqrt((0 + 4 + 1 + 0) / 4))
    assert M.mae(y, pred) == pytest.approx((0 + 2 + 1 + 0) / 4)
    assert math.isnan(M.rmse(np.array([]), np.array([])))


# --------------------------------------------------------------------------------------------
# XAUC
# --------------------------------------------------------------------------------------------


@FAST
@given(regression_case())
def test_xauc_matches_brute_force(case):
    y, pred, _ = case
    assert_close_or_nan(M.xauc(y, pred), xauc_ref(y, pred))


def test_xauc_brute_force_seeded_larger():
    rng = np.random.default_rng(3)
    for n in (2, 3, 17, 64, 129):
        y = rng.integers(0, 6, size=n).astype(float)
        pred = rng.integers(0, 8, size=n) * 0.5
        assert_close_or_nan(M.xauc(y, pred), xauc_ref(y, pred))


def test_xauc_without_ties_is_kendall_tau_transform():
    rng = np.random.default_rng(4)
    y = rng.normal(size=2000)
    pred = y + rng.normal(size=2000)
    tau = stats.kendalltau(y, pred).statistic
    assert M.xauc(y, pred) == pytest.approx((1 + tau) / 2, abs=1e-12)


def test_xauc_degenerate():
    assert math.isnan(M.xauc(np.array([1.0, 1.0, 1.0]), np.array([0.0, 1.0, 2.0])))
    assert math.isnan(M.xauc(np.array([1.0]), np.array([0.0])))
    assert M.xauc(np.array([1.0, 2.0]), np.array([5.0, 5.0])) == 0.5


def test_xauc_sampling_is_close_and_reproducible():
    rng = np.random.default_rng(5)
    y = np.round(rng.exponential(size=5000), 1)
    pred = y + rng.normal(size=5000)
    exact = M.xauc(y, pred)
    sampled = M.xauc(y, pred, max_pairs=200_000, rng=11)
    assert sampled == pytest.approx(exact, abs=0.01)
    assert sampled == M.xauc(y, pred, max_pairs=200_000, rng=11)
    assert sampled != exact  # really sampled
    inf_pred = np.where(pred > 3, np.inf, pred)
    assert M.xauc(y, inf_pred, max_pairs=200_000, rng=1) == pytest.approx(
        M.xauc(y, inf_pred), abs=0.01
    )
    # exact whenever the pair count fits in max_pairs
    small_y, small_pred = y[:100], pred[:100]
    assert M.xauc(small_y, small_pred, max_pairs=100 * 99 // 2) == M.xauc(small_y, small_pred)


@FAST
@given(regression_case())
def test_group_xauc_matches_per_group_loop(case):
    y, pred, groups = case
    per_group, weights = M.group_xauc(y, pred, groups)
    ref, ref_weights = [], []
    for gid in sorted(set(groups.tolist())):
        sel = groups == gid
        value = xauc_ref(y[sel], pred[sel])
        if not math.isnan(value):
            ref.append(value)
            ref_weights.append(float(sel.sum()))
    np.testing.assert_allclose(per_group, ref, atol=1e-12)
    np.testing.assert_array_equal(weights, ref_weights)
    expected = np.dot(ref, ref_weights) / sum(ref_weights) if ref else math.nan
    assert_close_or_nan(M.gxauc(y, pred, groups), expected)


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


@FAST
@given(
    st.integers(1, 12),
    st.lists(
        st.tuples(
            st.sampled_from([0.0, 1.0]),
            st.one_of(
                st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0]), st.floats(0.0, 1.0)
            ),
        ),
        max_size=40,
    ),
)
def test_calibration_matches_loop(bins, rows):
    labels = np.array([r[0] for r in rows])
    probs = np.array([r[1] for r in rows])
    curve = M.calibration(labels, probs, bins=bins)
    ece, mean_pred, frac_pos, count = calibration_ref(labels, probs, bins)
    assert_close_or_nan(curve.ece, ece if rows else math.nan)
    np.testing.assert_allclose(curve.bin_mean_pred, mean_pred, atol=1e-12)
    np.testing.assert_allclose(curve.bin_frac_pos, frac_pos, atol=1e-12)
    np.testing.assert_array_equal(curve.bin_count, count)
    assert curve.bin_edges.shape == (bins + 1,)


def test_calibration_edges_and_perfect_case():
    curve = M.calibration(np.array([0, 1, 1, 0, 1]), np.array([0.0, 0.1, 1.0, 0.95, 0.05]), 10)
    np.testing.assert_array_equal(curve.bin_count, [2, 1, 0, 0, 0, 0, 0, 0, 0, 2])
    # bin 0.2-0.3 with 2 of 8 positives at p=0.25, bin 0.7-0.8 with 3 of 4 at p=0.75
    labels = np.array([1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0])
    probs = np.array([0.25] * 8 + [0.75] * 4)
    perfect = M.calibration(labels, probs)
    assert perfect.ece == pytest.approx(0.0, abs=1e-15)
    shifted = M.calibration(labels, np.clip(probs + 0.05, 0, 1))
    assert shifted.ece == pytest.approx(0.05)


def test_plot_reliability_writes_png(tmp_path):
    rng = np.random.default_rng(6)
    probs = rng.random(400)
    labels = (rng.random(400) < probs).astype(float)
    curves = {
        "click": M.calibration(labels, probs),
        "like": M.calibration(labels, probs**2, bins=5),
        "empty": M.calibration(np.array([]), np.array([])),
    }
    path = tmp_path / "plots" / "reliability.png"
    M.plot_reliability(curves, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# NDCG@k
# --------------------------------------------------------------------------------------------


@st.composite
def ranking_case(draw):
    n = draw(st.integers(0, 14))
    rel = np.array(
        draw(st.lists(st.sampled_from([0.0, 0.0, 1.0, 2.0, 0.5]), min_size=n, max_size=n))
    )
    scores = np.array(draw(st.lists(st.sampled_from([0.0, 1.0, 2.0, 3.0]), min_size=n, max_size=n)))
    # at most 5 items per group so the reference can enumerate orderings
    groups = np.array(
        draw(st.permutations(np.repeat(np.arange(5), 5).tolist()))[:n], dtype=np.int64
    )
    k = draw(st.integers(1, 6))
    return rel, scores, groups, k


@FAST
@given(ranking_case())
def test_ndcg_matches_enumeration(case):
    rel, scores, groups, k = case
    mean, per_group = M.ndcg_at_k(rel, scores, groups, k=k)
    ref_mean, ref_values = ndcg_ref(rel, scores, groups, k)
    np.testing.assert_allclose(per_group, ref_values, atol=1e-12)
    assert_close_or_nan(mean, ref_mean)


def test_ndcg_is_one_for_perfect_ordering():
    rng = np.random.default_rng(7)
    groups = rng.integers(0, 30, size=600)
    rel = rng.exponential(size=600) * (rng.random(600) < 0.5)
    mean, per_group = M.ndcg_at_k(rel, rel * 3.0 + 1.0, groups, k=10)
    assert mean == pytest.approx(1.0)
    np.testing.assert_allclose(per_group, 1.0)
    assert M.ndcg_at_k(rel, -rel, groups, k=10)[0] < 0.9


def test_ndcg_hand_example_and_skipping():
    # group 1: relevance [3, 2, 0] ranked [2, 3, 0] by score; group 2 has no relevant item
    rel = np.array([3.0, 2.0, 0.0, 0.0, 0.0])
    scores = np.array([0.5, 0.9, 0.1, 0.3, 0.2])
    groups = np.array([1, 1, 1, 2, 2])
    mean, per_group = M.ndcg_at_k(rel, scores, groups, k=2)
    expected = (2 + 3 / math.log2(3)) / (3 + 2 / math.log2(3))
    assert per_group.shape == (1,)
    assert mean == pytest.approx(expected)
    assert math.isnan(M.ndcg_at_k(np.zeros(3), np.ones(3), np.zeros(3, dtype=int))[0])


# --------------------------------------------------------------------------------------------
# Summaries and validation
# --------------------------------------------------------------------------------------------


def test_binary_summary_consistent_with_metrics():
    rng = np.random.default_rng(8)
    probs = rng.random(300)
    labels = (rng.random(300) < probs).astype(float)
    groups = rng.integers(0, 20, size=300)
    out = M.binary_summary(labels, probs, groups)
    assert set(out) == {
        "auc",
        "gauc",
        "gauc_groups",
        "logloss",
        "ece",
        "positive_rate",
        "mean_pred",
        "count",
    }
    assert out["auc"] == M.auc(labels, probs)
    assert out["gauc"] == pytest.approx(M.gauc(labels, probs, groups))
    assert out["gauc_groups"] == len(M.group_auc(labels, probs, groups)[0])
    assert out["logloss"] == M.logloss(labels, probs)
    assert out["ece"] == M.calibration(labels, probs).ece
    assert out["positive_rate"] == pytest.approx(labels.mean())
    assert out["mean_pred"] == pytest.approx(probs.mean())
    assert out["count"] == 300
    assert math.isnan(M.binary_summary(labels, probs)["gauc"])


def test_regression_summary_consistent_with_metrics():
    rng = np.random.default_rng(9)
    y = np.round(rng.exponential(size=200), 1)
    pred = y + rng.normal(size=200)
    groups = rng.integers(0, 10, size=200)
    out = M.regression_summary(y, pred, groups)
    assert out["xauc"] == M.xauc(y, pred)  # 19900 pairs: exact
    assert out["rmse"] == M.rmse(y, pred) and out["mae"] == M.mae(y, pred)
    assert out["mean_label"] == pytest.approx(y.mean())
    assert out["mean_pred"] == pytest.approx(pred.mean())
    assert out["count"] == 200
    assert out["gxauc"] == pytest.approx(M.gxauc(y, pred, groups))
    assert out["gxauc_groups"] == 10
    assert "gxauc" not in M.regression_summary(y, pred)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: M.auc(np.array([0.0, np.nan]), np.array([0.1, 0.2])), "labels"),
        (lambda: M.auc(np.array([0.0, 1.0]), np.array([0.1, np.nan])), "scores"),
        (lambda: M.gauc(np.array([0.0, np.nan]), np.zeros(2), np.zeros(2, int)), "labels"),
        (lambda: M.logloss(np.array([np.nan]), np.array([0.5])), "labels"),
        (lambda: M.rmse(np.array([np.nan]), np.array([0.5])), "y"),
        (lambda: M.mae(np.array([1.0]), np.array([np.nan])), "pred"),
        (lambda: M.xauc(np.array([1.0, np.nan]), np.array([0.5, 0.1])), "y"),
        (lambda: M.calibration(np.array([np.nan]), np.array([0.5])), "labels"),
        (lambda: M.ndcg_at_k(np.array([np.nan]), np.zeros(1), np.zeros(1, int)), "relevance"),
        (lambda: M.binary_summary(np.array([np.nan]), np.array([0.5])), "labels"),
        (lambda: M.regression_summary(np.array([np.nan]), np.array([0.5])), "y"),
        (lambda: M.auc(np.array([0.0, 2.0]), np.array([0.1, 0.2])), "labels"),
        (lambda: M.logloss(np.array([1.0]), np.array([1.5])), "probs"),
        (lambda: M.auc(np.array([0.0, 1.0]), np.array([0.1])), "scores"),
        (lambda: M.gauc(np.zeros(2), np.zeros(2), np.array([0.5, 1.0])), "groups"),
        (lambda: M.ndcg_at_k(np.array([-1.0]), np.zeros(1), np.zeros(1, int)), "relevance"),
        (lambda: M.rmse(np.zeros((2, 2)), np.zeros((2, 2))), "y"),
    ],
)
def test_invalid_input_raises_naming_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


# --- sessions --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", range(300))
def test_sessions_split_a_users_impressions_at_gaps(case: int) -> None:
    from ranker.metrics import sessions

    rng = np.random.default_rng(case)
    n = int(rng.integers(0, 60))
    users = rng.integers(0, 5, n)
    times = np.round(
        rng.exponential(1000.0, n).cumsum() * rng.choice([1.0, -1.0, 0.0])
    ) + rng.integers(0, 3000, n)
    gap = float(rng.choice([1.0, 1800.0, 5000.0]))
    got = sessions(users, times, gap)
    # The definition, pair by pair: two rows share a session iff same user and no gap > `gap`
    # between consecutive impressions of that user anywhere between them.
    for i in range(n):
        for j in range(n):
            if users[i] != users[j]:
                assert got[i] != got[j]
                continue
            lo, hi = sorted((times[i], times[j]))
            ts = np.sort(times[(users == users[i]) & (times >= lo) & (times <= hi)])
            same = bool(np.all(np.diff(ts) <= gap)) if len(ts) else True
            assert (got[i] == got[j]) == same
    if n:
        assert set(np.unique(got)) == set(range(got.max() + 1))


def test_session_gauc_is_reported_where_rows_carry_a_time() -> None:
    from ranker.config import parse_config
    from training.evaluate import Predictions, head_metrics

    cfg = parse_config(
        {
            "data": {
                "log": "x",
                "users": "u",
                "videos": "v",
                "request_key": "user_id",
                "event_time_column": "t",
                "time_unit_s": 0.001,
            },
            "features": [{"name": "user_id", "source": "user", "kind": "categorical"}],
            "tasks": [{"name": "click", "kind": "binary", "label": "c", "loss": "bce"}],
        }
    )
    rng = np.random.default_rng(0)
    n = 400
    users = rng.integers(0, 4, n)
    t_ms = rng.integers(0, 10, n) * 3_600_000 + rng.integers(0, 600_000, n)  # 10 hourly sessions
    y = rng.integers(0, 2, n).astype(float)
    # A score that ranks rows well within each session but shifts whole sessions apart.
    sess = t_ms // 3_600_000
    pred = 1 / (1 + np.exp(-(y - 0.5 + 3.0 * (sess % 3))))
    p = Predictions(
        {"click": pred},
        {"click": y},
        {"click": np.ones(n, bool)},
        users,
        users,
        {"t": t_ms.astype(np.float64)},
    )
    m = head_metrics(cfg, p)["click"]
    assert m["gauc_session"] == pytest.approx(1.0)
    assert m["gauc"] < 0.9
    _, g = np.unique(np.c_[users, sess], axis=0, return_inverse=True)
    mixed = sum(len(np.unique(y[g.ravel() == k])) == 2 for k in range(g.max() + 1))
    assert m["gauc_session_groups"] == mixed  # sessions with both labels
