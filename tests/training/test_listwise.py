"""The vectorised top-k list metrics against a plain per-request loop."""

import numpy as np
import pytest

from training.listwise import RequestGroups, topk_sums, topk_sums_linear


def brute_force(requests: np.ndarray, scores: np.ndarray, values: np.ndarray, k: int) -> dict:
    """Per request id: the sum of ``values`` over its ``k`` best rows (ties: input order)."""
    out = {}
    for r in np.unique(requests):
        rows = [i for i in range(len(requests)) if requests[i] == r]
        best = sorted(rows, key=lambda i: (-scores[i], i))[:k]
        out[int(r)] = values[best].sum(axis=0)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_sums_equal_a_per_request_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 400
    # uneven list sizes (1 .. ~40 rows), ids neither sorted nor contiguous
    requests = rng.choice(rng.integers(0, 10_000, 25), size=n, p=rng.dirichlet(np.ones(25)))
    scores = rng.integers(0, 6, size=(3, n)).astype(float)  # many ties
    scores[2] = rng.normal(size=n)  # and one setting without
    values = rng.normal(size=(n, 2))
    ks = [1, 3, 10, 50]
    groups = RequestGroups.build(requests)
    per_request = topk_sums(groups, scores, values, ks, per_request=True)
    totals = topk_sums(groups, scores, values, ks)
    for s in range(scores.shape[0]):
        for j, k in enumerate(ks):
            expected = brute_force(requests, scores[s], values, k)
            got = per_request[s, j]
            for i, r in enumerate(groups.request_ids):
                np.testing.assert_allclose(got[i], expected[int(r)], atol=1e-12)
    np.testing.assert_allclose(totals, per_request.sum(axis=2), atol=1e-9)


def test_linear_scores_match_explicit_scores() -> None:
    rng = np.random.default_rng(3)
    n = 300
    requests = rng.integers(0, 30, n)
    features = rng.integers(0, 3, size=(n, 3)).astype(float)  # ties here too
    weights = rng.integers(0, 3, size=(7, 3)).astype(float)
    values = rng.random((n, 4))
    groups = RequestGroups.build(requests)
    linear = topk_sums_linear(groups, features, weights, values, [2, 5], per_request=True)
    explicit = topk_sums(groups, weights @ features.T, values, [2, 5], per_request=True)
    np.testing.assert_allclose(linear, explicit)


def test_one_setting_and_one_value_drop_their_axes() -> None:
    groups = RequestGroups.build(np.array([5, 5, 5, 9, 9]))
    out = topk_sums(groups, np.array([0.1, 0.3, 0.2, 1.0, 2.0]), np.array([1, 2, 3, 4, 5.0]), [2])
    np.testing.assert_allclose(out, [2 + 3 + 4 + 5])


def test_infinite_scores_rank_first_or_last() -> None:
    groups = RequestGroups.build(np.array([1, 1, 1, 1]))
    scores = np.array([-np.inf, np.inf, 0.0, -np.inf])
    values = np.array([1.0, 10.0, 100.0, 1000.0])
    assert topk_sums(groups, scores, values, [1, 2, 3]).tolist() == [10.0, 110.0, 111.0]


def test_bad_shapes_and_nan_scores_are_refused() -> None:
    groups = RequestGroups.build(np.array([1, 1, 2]))
    with pytest.raises(ValueError, match="scores must be"):
        topk_sums(groups, np.zeros(4), np.zeros(3), [1])
    with pytest.raises(ValueError, match="NaN"):
        topk_sums(groups, np.array([0.0, np.nan, 1.0]), np.zeros(3), [1])
    with pytest.raises(ValueError, match="ks must be positive"):
        topk_sums(groups, np.zeros(3), np.zeros(3), [0])
