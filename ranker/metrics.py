"""Evaluation metrics shared by the trainer (per-epoch validation) and the offline tools.

Everything here is plain numpy on float64 and vectorised: per-group metrics (GAUC, grouped
XAUC, NDCG@k) sort once by ``(group, key)`` and reduce with cumulative sums,
``np.add.reduceat`` and ``np.bincount`` instead of looping over users or requests, so an
evaluation set with millions of rows and hundreds of thousands of users costs a few sorts.

Conventions:

* inputs are 1-D arrays of equal length; callers apply masks (e.g. "label present") first;
* a NaN anywhere is a caller bug and raises ``ValueError`` naming the argument, so a silently
  propagated NaN never turns into a plausible-looking number in a report;
* group ids are integers (``user_id``, ``request_id``); any integer dtype is accepted;
* a metric that is undefined on its input (one class only, no pair with different labels, no
  group that qualifies, empty input) returns ``nan`` rather than raising, because an
  evaluation slice legitimately can be degenerate and the caller decides how to report it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "XAUC_SUMMARY_MAX_PAIRS",
    "Calibration",
    "auc",
    "binary_summary",
    "calibration",
    "gauc",
    "group_auc",
    "group_xauc",
    "gxauc",
    "logloss",
    "mae",
    "ndcg_at_k",
    "plot_reliability",
    "regression_summary",
    "rmse",
    "sessions",
    "xauc",
]

XAUC_SUMMARY_MAX_PAIRS = 2_000_000
"""Above this many pairs ``n * (n - 1) / 2``, :func:`regression_summary` estimates XAUC from
this many uniformly sampled pairs (standard error below 4e-4) instead of counting exactly."""

_NAN = float("nan")


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def _float_array(name: str, x: npt.ArrayLike, *, finite: bool = False) -> np.ndarray:
    """``x`` as a 1-D float64 array; ``ValueError`` naming ``name`` if it is not 1-D, holds a
    NaN, or (with ``finite``) holds an infinity."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a 1-D numeric array: {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
    if finite:
        bad = ~np.isfinite(arr)
        if bad.any():
            what = "NaN" if np.isnan(arr).any() else "an infinite value"
            raise ValueError(f"{name} contains {what} (first at index {int(np.argmax(bad))})")
    else:
        bad = np.isnan(arr)
        if bad.any():
            raise ValueError(f"{name} contains NaN (first at index {int(np.argmax(bad))})")
    return arr


def _binary_labels(name: str, x: npt.ArrayLike) -> np.ndarray:
    """Labels that must be exactly 0 or 1 (AUC-type metrics count positives and negatives)."""
    arr = _float_array(name, x, finite=True)
    if not np.all((arr == 0.0) | (arr == 1.0)):
        raise ValueError(f"{name} must contain only 0 and 1")
    return arr


def _unit_interval(name: str, x: npt.ArrayLike) -> np.ndarray:
    """Values in [0, 1]: probabilities, or soft labels for log loss and calibration."""
    arr = _float_array(name, x, finite=True)
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got range [{arr.min()}, {arr.max()}]")
    return arr


def _group_index(name: str, x: npt.ArrayLike, n: int) -> tuple[np.ndarray, int]:
    """Dense group index in ``[0, n_groups)`` (ascending group id) and ``n_groups``."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer ids, got dtype {arr.dtype}")
    if arr.size != n:
        raise ValueError(f"{name} has length {arr.size}, expected {n}")
    uniq, inverse = np.unique(arr.astype(np.int64, copy=False), return_inverse=True)
    return inverse.reshape(-1).astype(np.int64, copy=False), int(uniq.size)


def _same_length(**arrays: np.ndarray) -> int:
    """Common length of the named arrays; ``ValueError`` listing the lengths otherwise."""
    lengths = {name: arr.shape[0] for name, arr in arrays.items()}
    if len(set(lengths.values())) > 1:
        desc = ", ".join(f"{name}={n}" for name, n in lengths.items())
        raise ValueError(f"arrays must have equal lengths, got {desc}")
    return next(iter(lengths.values()))


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


# --------------------------------------------------------------------------------------------
# Sorting helpers
# --------------------------------------------------------------------------------------------


def _run_starts(*sorted_keys: np.ndarray) -> np.ndarray:
    """Boolean mask of positions where a run of equal ``sorted_keys`` tuples begins."""
    n = sorted_keys[0].shape[0]
    starts = np.zeros(n, dtype=bool)
    if n:
        starts[0] = True
        for key in sorted_keys:  # loop over key columns, not rows
            starts[1:] |= key[1:] != key[:-1]
    return starts


def _per_group_sum(values: np.ndarray, group_sorted: np.ndarray) -> np.ndarray:
    """Sum of ``values`` per group, ``group_sorted`` being a non-decreasing dense group index
    in which every group occurs (so the result has one entry per group, exact for int64)."""
    return np.add.reduceat(values, np.flatnonzero(_run_starts(group_sorted)))


def _tied_pairs_per_group(run_start: np.ndarray, group_sorted: np.ndarray) -> np.ndarray:
    """Per group, the number of unordered pairs inside runs (``sum C(len, 2)``)."""
    idx = np.flatnonzero(run_start)
    lengths = np.diff(np.append(idx, run_start.shape[0])).astype(np.int64)
    return _per_group_sum(lengths * (lengths - 1) // 2, group_sorted[idx])


# --------------------------------------------------------------------------------------------
# AUC and group AUC
# --------------------------------------------------------------------------------------------


def _grouped_auc(
    y: np.ndarray, s: np.ndarray, g: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group Mann-Whitney counts: ``(2 * U, n_pos, n_neg)``, int64, one entry per group.

    ``U`` counts (positive, negative) pairs of the group with the positive scored higher,
    plus 1/2 for each tied pair, so ``AUC = U / (n_pos * n_neg)``. It is summed per block of
    tied (group, score): every positive of a block beats the negatives of lower blocks of the
    same group and ties with the block's negatives. This equals the average-rank formula
    ``(R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)`` without forming rank sums, whose size
    (about n^2) would cost float64 precision on big sets.
    """
    order = np.lexsort((s, g))
    ys, ss, gs = y[order], s[order], g[order]
    start = _run_starts(gs, ss)
    block_idx = np.flatnonzero(start)
    block_g = gs[block_idx]
    block_n = np.diff(np.append(block_idx, ys.shape[0])).astype(np.int64)
    block_pos = np.add.reduceat(ys, block_idx).astype(np.int64)
    block_neg = block_n - block_pos
    # negatives in earlier blocks of the same group: exclusive cumulative sum, restarted per
    # group by subtracting its value at the group's first block
    excl = np.cumsum(block_neg) - block_neg
    group_first_block = np.flatnonzero(_run_starts(block_g))
    first_of_block = np.repeat(
        group_first_block, np.diff(np.append(group_first_block, block_g.shape[0]))
    )
    neg_below = excl - excl[first_of_block]
    twice_u = _per_group_sum(block_pos * (2 * neg_below + block_neg), block_g)
    n_pos = _per_group_sum(block_pos, block_g)
    n_neg = _per_group_sum(block_neg, block_g)
    return twice_u, n_pos, n_neg


def auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """ROC AUC: the probability that a random positive is scored above a random negative,
    ties counting 1/2 (the Mann-Whitney U statistic over ``n_pos * n_neg``; Hanley & McNeil,
    Radiology 1982). Equals ``sklearn.metrics.roc_auc_score``, including its tie handling.

    Args:
        labels: 0/1 labels.
        scores: any real scores; only their order matters.

    Returns:
        AUC in [0, 1]; ``nan`` when only one class (or nothing) is present.
    """
    y = _binary_labels("labels", labels)
    s = _float_array("scores", scores)
    n = _same_length(labels=y, scores=s)
    if n == 0:
        return _NAN
    twice_u, n_pos, n_neg = _grouped_auc(y, s, np.zeros(n, dtype=np.int64))
    if n_pos[0] == 0 or n_neg[0] == 0:
        return _NAN
    return float(twice_u[0] / (2.0 * float(n_pos[0]) * float(n_neg[0])))


def group_auc(
    labels: npt.ArrayLike, scores: npt.ArrayLike, groups: npt.ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """AUC of every group (user, request) that holds both classes, and its weight.

    Why: a global AUC also rewards ranking *across* users (active users vs. cold ones), which
    the product never does; the per-user AUC measures what a feed actually orders. The spread
    of the returned array over users is worth reporting next to :func:`gauc`.

    Returns:
        ``(auc_per_group, weights)``, float64, for the qualifying groups in ascending group-id
        order; the weight is the group's impression count (rows), as in Zhou et al., "Deep
        Interest Network for Click-Through Rate Prediction", KDD 2018, eq. (9). Both empty
        when no group qualifies; ``len(auc_per_group)`` is the number of groups used.
    """
    y = _binary_labels("labels", labels)
    s = _float_array("scores", scores)
    n = _same_length(labels=y, scores=s)
    g, _ = _group_index("groups", groups, n)
    if n == 0:
        return np.empty(0), np.empty(0)
    twice_u, n_pos, n_neg = _grouped_auc(y, s, g)
    keep = (n_pos > 0) & (n_neg > 0)
    pairs = n_pos[keep].astype(np.float64) * n_neg[keep].astype(np.float64)
    per_group = twice_u[keep] / (2.0 * pairs)
    weights = (n_pos[keep] + n_neg[keep]).astype(np.float64)
    return per_group, weights


def gauc(labels: npt.ArrayLike, scores: npt.ArrayLike, groups: npt.ArrayLike) -> float:
    """Group AUC (Zhou et al., DIN, KDD 2018, eq. 9): the impression-weighted mean of the
    per-group AUC over groups that contain both classes; see :func:`group_auc` for the
    per-group values and the number of groups used.

    Returns:
        GAUC in [0, 1]; ``nan`` when no group qualifies.
    """
    per_group, weights = group_auc(labels, scores, groups)
    if per_group.size == 0:
        return _NAN
    return float(np.dot(per_group, weights) / weights.sum())


# --------------------------------------------------------------------------------------------
# Pointwise losses
# --------------------------------------------------------------------------------------------


def logloss(labels: npt.ArrayLike, probs: npt.ArrayLike, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy ``-[y log p + (1 - y) log(1 - p)]`` (natural log).

    ``probs`` is clipped to ``[eps, 1 - eps]`` so one confident mistake costs a bounded
    ``-log(eps)`` instead of infinity (the usual convention, e.g. sklearn's ``log_loss``);
    labels may be soft, in [0, 1]. ``nan`` on empty input.
    """
    y = _unit_interval("labels", labels)
    p = _unit_interval("probs", probs)
    if _same_length(labels=y, probs=p) == 0:
        return _NAN
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must lie in (0, 0.5), got {eps}")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def rmse(y: npt.ArrayLike, pred: npt.ArrayLike) -> float:
    """Root mean squared error; ``nan`` on empty input."""
    t = _float_array("y", y, finite=True)
    p = _float_array("pred", pred)
    if _same_length(y=t, pred=p) == 0:
        return _NAN
    return float(np.sqrt(np.mean(np.square(p - t))))


def mae(y: npt.ArrayLike, pred: npt.ArrayLike) -> float:
    """Mean absolute error; ``nan`` on empty input."""
    t = _float_array("y", y, finite=True)
    p = _float_array("pred", pred)
    if _same_length(y=t, pred=p) == 0:
        return _NAN
    return float(np.mean(np.abs(p - t)))


# --------------------------------------------------------------------------------------------
# XAUC: pairwise ordering accuracy for regression targets (watch time)
# --------------------------------------------------------------------------------------------


def _inversions_per_group(r: np.ndarray, group_of_rank: np.ndarray, n_groups: int) -> np.ndarray:
    """Per group, the number of pairs ``i < j`` with ``r[i] > r[j]``.

    Bottom-up merge sort with each level vectorised: at width ``w`` the array consists of
    sorted blocks of ``w``; for every element of a right block, the elements of its left
    sibling that are greater are counted with one ``searchsorted`` over all left blocks at
    once (keys ``pair * m + r`` keep the blocks apart), then siblings are merged with one
    stable sort of the same keys. ``log2(n)`` levels, ``O(n log n)`` each. The caller makes
    ``r`` group-major, so an inversion never spans two groups and each is credited to the
    group of its right element (``group_of_rank[r]``). Keys stay below ``n^2 / 2`` (int64
    holds n up to 4e9) and per-group counts below 2^53 (float64 ``bincount`` is exact).
    """
    n = r.shape[0]
    out = np.zeros(n_groups, dtype=np.float64)
    if n < 2:
        return out.astype(np.int64)
    m = int(r.max()) + 1
    a = r.astype(np.int64, copy=True)
    pos = np.arange(n, dtype=np.int64)
    width = 1
    while width < n:  # log2(n) levels, not a loop over rows
        block = pos // width
        pair = block >> 1
        is_right = (block & 1).astype(bool)
        key = pair * m + a
        left_keys = key[~is_right]
        right_keys = key[is_right]
        left_end = np.searchsorted(left_keys, (pair[is_right] + 1) * m, side="left")
        not_greater = np.searchsorted(left_keys, right_keys, side="right")
        out += np.bincount(
            group_of_rank[a[is_right]], weights=left_end - not_greater, minlength=n_groups
        )
        key.sort(kind="stable")  # merges sorted runs
        a = key - (pos // (2 * width)) * m
        width *= 2
    return np.rint(out).astype(np.int64)


def _xauc_counts(
    y: np.ndarray, p: np.ndarray, g: np.ndarray, n_groups: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group: pairs with different ``y``; of those, pairs ordered the other way by ``p``
    (discordant) and pairs tied in ``p``. All int64 and exact.

    Sorting by ``(group, y, p)`` puts every pair with ``y_i < y_j`` in order ``i < j``; pairs
    tied in ``y`` are also ascending in ``p``, so the strict inversions of ``p`` in that
    order are exactly the discordant pairs. Ties come from run lengths of the sorted keys.
    """
    order = np.lexsort((p, y, g))
    ys, ps, gs = y[order], p[order], g[order]
    # dense rank of (group, p), group-major, so inversions never cross groups
    order_gp = np.lexsort((p, g))
    gp_g, gp_p = g[order_gp], p[order_gp]
    gp_start = _run_starts(gp_g, gp_p)
    rank = np.empty(y.shape[0], dtype=np.int64)
    rank[order_gp] = np.cumsum(gp_start) - 1
    discordant = _inversions_per_group(rank[order], gp_g[gp_start], n_groups)

    size = np.bincount(g, minlength=n_groups).astype(np.int64)
    tied_y = _tied_pairs_per_group(_run_starts(gs, ys), gs)
    tied_yp = _tied_pairs_per_group(_run_starts(gs, ys, ps), gs)
    tied_p = _tied_pairs_per_group(gp_start, gp_g)
    distinct_y = size * (size - 1) // 2 - tied_y
    return distinct_y, discordant, tied_p - tied_yp


def _sampled_xauc(y: np.ndarray, p: np.ndarray, n_pairs: int, rng: np.random.Generator) -> float:
    """XAUC estimated on ``n_pairs`` uniformly drawn pairs of distinct rows (with
    replacement); pairs with equal ``y`` are drawn and discarded, as they are in the exact
    count's denominator."""
    n = y.shape[0]
    i = rng.integers(0, n, size=n_pairs)
    j = (i + rng.integers(1, n, size=n_pairs)) % n  # uniform over j != i
    yi, yj = y[i], y[j]
    keep = yi != yj
    if not keep.any():
        return _NAN
    i, j = i[keep], j[keep]
    # +1 concordant, 0 tied in pred, -1 discordant (comparisons, so infinite preds are fine)
    dy = np.where(yi[keep] > yj[keep], 1.0, -1.0)
    dp = (p[i] > p[j]).astype(np.float64) - (p[i] < p[j]).astype(np.float64)
    agree = dy * dp
    return float(np.mean((1.0 + agree) / 2.0))


def xauc(
    y: npt.ArrayLike,
    pred: npt.ArrayLike,
    max_pairs: int | None = None,
    rng: np.random.Generator | int | None = None,
) -> float:
    """XAUC: the fraction of pairs with different ``y`` that ``pred`` orders the same way,
    ties in ``pred`` counting 1/2.

    Why: watch time is a regression target whose scale matters less than the order it
    induces; XAUC is the regression analogue of AUC used for duration prediction (Zhan et
    al., "Deconfounding Duration Bias in Watch-time Prediction", KDD 2022; TorchEasyRec's
    ``XAUC``). It is the tie-corrected form: TorchEasyRec keeps pairs tied in ``y`` in the
    denominator and scores ties in ``pred`` as wrong, which biases it down on discrete
    targets. With no ties it equals ``(1 + Kendall's tau) / 2``.

    Args:
        y: targets.
        pred: predictions.
        max_pairs: when ``n (n - 1) / 2`` exceeds it, estimate from ``max_pairs`` sampled
            pairs; ``None`` always counts exactly in ``O(n log^2 n)``.
        rng: generator or seed for the sampling.

    Returns:
        XAUC in [0, 1]; ``nan`` when no pair has different ``y``.
    """
    t = _float_array("y", y, finite=True)
    p = _float_array("pred", pred)
    n = _same_length(y=t, pred=p)
    if n < 2:
        return _NAN
    if max_pairs is not None:
        if max_pairs < 1:
            raise ValueError(f"max_pairs must be positive, got {max_pairs}")
        if n * (n - 1) // 2 > max_pairs:
            return _sampled_xauc(t, p, int(max_pairs), _rng(rng))
    distinct, discordant, tied = _xauc_counts(t, p, np.zeros(n, dtype=np.int64), 1)
    if distinct[0] == 0:
        return _NAN
    return float(1.0 - (discordant[0] + 0.5 * tied[0]) / distinct[0])


def group_xauc(
    y: npt.ArrayLike, pred: npt.ArrayLike, groups: npt.ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """Exact XAUC of every group that has at least one pair with different ``y``, and the
    group's impression count as weight (the grouped XAUC of TorchEasyRec, weighted like GAUC).

    Returns:
        ``(xauc_per_group, weights)``, float64, for qualifying groups in ascending group-id
        order; both empty when none qualifies.
    """
    t = _float_array("y", y, finite=True)
    p = _float_array("pred", pred)
    n = _same_length(y=t, pred=p)
    g, n_groups = _group_index("groups", groups, n)
    if n == 0:
        return np.empty(0), np.empty(0)
    distinct, discordant, tied = _xauc_counts(t, p, g, n_groups)
    keep = distinct > 0
    per_group = 1.0 - (discordant[keep] + 0.5 * tied[keep]) / distinct[keep]
    weights = np.bincount(g, minlength=n_groups)[keep].astype(np.float64)
    return per_group, weights


def gxauc(y: npt.ArrayLike, pred: npt.ArrayLike, groups: npt.ArrayLike) -> float:
    """Impression-weighted mean of :func:`group_xauc`; ``nan`` when no group qualifies."""
    per_group, weights = group_xauc(y, pred, groups)
    if per_group.size == 0:
        return _NAN
    return float(np.dot(per_group, weights) / weights.sum())


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Calibration:
    """Reliability curve on equal-width probability bins and its expected calibration error.

    Bin ``b`` of ``B`` holds ``b/B <= p < (b+1)/B`` (the last bin also holds ``p == 1``, as in
    ``np.histogram``). Empty bins have count 0 and NaN means.

    Attributes:
        ece: ``sum_b (n_b / N) |frac_pos_b - mean_pred_b|`` (Naeini et al., AAAI 2015; Guo et
            al., "On Calibration of Modern Neural Networks", ICML 2017); ``nan`` if ``N == 0``.
        bin_mean_pred: mean predicted probability per bin.
        bin_frac_pos: mean label (fraction of positives) per bin.
        bin_count: rows per bin (int64).
    """

    ece: float
    bin_mean_pred: np.ndarray
    bin_frac_pos: np.ndarray
    bin_count: np.ndarray

    @property
    def bin_edges(self) -> np.ndarray:
        """The ``B + 1`` bin edges, ``linspace(0, 1, B + 1)``."""
        return np.linspace(0.0, 1.0, self.bin_count.shape[0] + 1)


def calibration(labels: npt.ArrayLike, probs: npt.ArrayLike, bins: int = 10) -> Calibration:
    """Reliability curve and ECE of predicted probabilities (see :class:`Calibration`).

    Why: rankers multiply and add task probabilities in the final score, so a
    miscalibrated head distorts the blend even at unchanged AUC.
    """
    y = _unit_interval("labels", labels)
    p = _unit_interval("probs", probs)
    n = _same_length(labels=y, probs=p)
    if int(bins) != bins or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins}")
    bins = int(bins)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
    count = np.bincount(idx, minlength=bins).astype(np.int64)
    sum_pred = np.bincount(idx, weights=p, minlength=bins)
    sum_pos = np.bincount(idx, weights=y, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = np.where(count > 0, sum_pred / count, np.nan)
        frac_pos = np.where(count > 0, sum_pos / count, np.nan)
    # sum_b (n_b / N) |frac_pos_b - mean_pred_b| = sum_b |sum_pos_b - sum_pred_b| / N
    ece = float(np.sum(np.abs(sum_pos - sum_pred)) / n) if n else _NAN
    return Calibration(ece=ece, bin_mean_pred=mean_pred, bin_frac_pos=frac_pos, bin_count=count)


def plot_reliability(curves: Mapping[str, Calibration], path: str | os.PathLike[str]) -> None:
    """Writes a reliability diagram (one line per curve, with its ECE in the legend, and the
    diagonal of perfect calibration) to ``path`` as PNG, creating parent directories.

    Uses the Agg canvas directly, never pyplot, so it is safe in headless and threaded
    processes and leaves global matplotlib state alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 5.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(
        [0.0, 1.0],
        [0.0, 1.0],
        linestyle="--",
        color="0.5",
        linewidth=1.0,
        label="perfectly calibrated",
    )
    for name, curve in curves.items():
        filled = curve.bin_count > 0
        ax.plot(
            curve.bin_mean_pred[filled],
            curve.bin_frac_pos[filled],
            marker="o",
            markersize=4,
            label=f"{name} (ECE {curve.ece:.4f})",
        )
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("fraction of positives")
    ax.set_title("Reliability diagram")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    fig.savefig(path, format="png")


# --------------------------------------------------------------------------------------------
# NDCG@k
# --------------------------------------------------------------------------------------------


def ndcg_at_k(
    relevance: npt.ArrayLike, scores: npt.ArrayLike, groups: npt.ArrayLike, k: int = 10
) -> tuple[float, np.ndarray]:
    """Mean NDCG@k over groups (requests, users) of the order that ``scores`` induces.

    ``DCG@k = sum_{r<=k} rel_r / log2(r + 1)`` with linear gain (Jarvelin & Kekalainen, ACM
    TOIS 2002), normalised by the DCG@k of the items sorted by relevance. Items with tied
    scores get the average discount of the positions the tie spans, i.e. the expected DCG
    over the tie's orderings (McSherry & Najork, ECIR 2008; sklearn's ``ndcg_score``), so the
    result does not depend on input order. Groups with fewer than ``k`` items use all of
    them; groups whose ideal DCG is 0 (no relevant item) are skipped.

    Args:
        relevance: gains, real and >= 0 (e.g. watch fraction, or 0/1 clicks).
        scores: model scores; higher ranks first.
        groups: integer group ids.
        k: cutoff, >= 1.

    Returns:
        ``(mean, per_group)``: the mean over qualifying groups (``nan`` if none) and their
        NDCG values in ascending group-id order.
    """
    rel = _float_array("relevance", relevance, finite=True)
    s = _float_array("scores", scores)
    n = _same_length(relevance=rel, scores=s)
    if rel.size and rel.min() < 0.0:
        raise ValueError("relevance must be >= 0")
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    g, n_groups = _group_index("groups", groups, n)
    if n == 0:
        return _NAN, np.empty(0)
    k = int(k)
    size = np.bincount(g, minlength=n_groups)
    group_start = np.cumsum(size) - size
    longest = int(size.max())
    discount = np.zeros(longest)
    top = min(k, longest)
    discount[:top] = 1.0 / np.log2(np.arange(2, top + 2))
    cum_discount = np.concatenate(([0.0], np.cumsum(discount)))

    # DCG with ties averaged: per block of equal (group, score)
    order = np.lexsort((-s, g))
    gs, ss, rs = g[order], s[order], rel[order]
    block_idx = np.flatnonzero(_run_starts(gs, ss))
    block_len = np.diff(np.append(block_idx, n))
    block_g = gs[block_idx]
    first = block_idx - group_start[block_g]  # position of the block within its group
    mean_discount = (cum_discount[first + block_len] - cum_discount[first]) / block_len
    block_gain = np.add.reduceat(rs, block_idx)
    dcg = np.bincount(block_g, weights=block_gain * mean_discount, minlength=n_groups)

    ideal_order = np.lexsort((-rel, g))
    ig = g[ideal_order]
    ipos = np.arange(n) - group_start[ig]
    idcg = np.bincount(ig, weights=rel[ideal_order] * discount[ipos], minlength=n_groups)

    keep = idcg > 0.0
    per_group = np.minimum(dcg[keep] / idcg[keep], 1.0)  # clip float round-off above 1
    if per_group.size == 0:
        return _NAN, per_group
    return float(per_group.mean()), per_group


# --------------------------------------------------------------------------------------------
# Sessions
# --------------------------------------------------------------------------------------------

SESSION_GAP_S = 1800.0
"""A user's impressions more than this many seconds apart belong to different sessions."""


def sessions(users: npt.ArrayLike, times: npt.ArrayLike, gap: float = SESSION_GAP_S) -> np.ndarray:
    """Session id per row ``(n,)`` int64: a user's impressions in time order, split wherever two
    consecutive ones are more than ``gap`` apart (``times`` and ``gap`` in the same unit).

    Why: candidates ranked in one request share the user's state at that moment, so a model
    whose user features move with time (live counters, recent history) must be compared within
    what one request could have ranked. GAUC pooled per user over days punishes such features:
    a row's own label enters the counters of the user's later rows only, which shifts every
    later score of that user together and reorders rows across sessions, not within them.
    Ids are dense in ``[0, n_sessions)``, ordered by (user, start time).
    """
    u, _ = _group_index("users", users, np.asarray(users).size)
    t = _float_array("times", times, finite=True)
    n = _same_length(users=u, times=t)
    if n == 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((t, u))
    us, ts = u[order], t[order]
    start = np.r_[True, (us[1:] != us[:-1]) | (np.diff(ts) > gap)]
    out = np.empty(n, np.int64)
    out[order] = np.cumsum(start) - 1
    return out


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------


def binary_summary(
    labels: npt.ArrayLike, probs: npt.ArrayLike, groups: npt.ArrayLike | None = None
) -> dict[str, float]:
    """The standard report for a binary task (click, like, ...).

    Keys: ``auc``, ``gauc``, ``gauc_groups`` (groups used by GAUC), ``logloss``, ``ece``
    (10 equal-width bins), ``positive_rate``, ``mean_pred`` and ``count``; ``gauc`` is
    ``nan`` and ``gauc_groups`` 0 without ``groups``. ``mean_pred / positive_rate`` is the
    calibration ratio usually watched in CTR models.
    """
    y = _binary_labels("labels", labels)
    p = _unit_interval("probs", probs)
    n = _same_length(labels=y, probs=p)
    if groups is None:
        gauc_value, n_groups = _NAN, 0
    else:
        per_group, weights = group_auc(y, p, groups)
        n_groups = int(per_group.size)
        gauc_value = float(np.dot(per_group, weights) / weights.sum()) if n_groups else _NAN
    return {
        "auc": auc(y, p),
        "gauc": gauc_value,
        "gauc_groups": float(n_groups),
        "logloss": logloss(y, p),
        "ece": calibration(y, p).ece,
        "positive_rate": float(y.mean()) if n else _NAN,
        "mean_pred": float(p.mean()) if n else _NAN,
        "count": float(n),
    }


def regression_summary(
    y: npt.ArrayLike,
    pred: npt.ArrayLike,
    groups: npt.ArrayLike | None = None,
    *,
    xauc_max_pairs: int | None = XAUC_SUMMARY_MAX_PAIRS,
    rng: np.random.Generator | int | None = 0,
) -> dict[str, float]:
    """The standard report for a regression task (watch time).

    Keys: ``rmse``, ``mae``, ``xauc``, ``mean_label``, ``mean_pred`` and ``count``; with
    ``groups`` also ``gxauc`` (exact grouped XAUC) and ``gxauc_groups``. XAUC is exact while
    ``n (n - 1) / 2 <= xauc_max_pairs`` and otherwise estimated from that many sampled pairs
    (``None``: always exact); the fixed default seed keeps repeated evaluations comparable.
    """
    t = _float_array("y", y, finite=True)
    p = _float_array("pred", pred)
    n = _same_length(y=t, pred=p)
    out = {
        "rmse": rmse(t, p),
        "mae": mae(t, p),
        "xauc": xauc(t, p, max_pairs=xauc_max_pairs, rng=rng),
        "mean_label": float(t.mean()) if n else _NAN,
        "mean_pred": float(p.mean()) if n else _NAN,
        "count": float(n),
    }
    if groups is not None:
        per_group, weights = group_xauc(t, p, groups)
        out["gxauc"] = float(np.dot(per_group, weights) / weights.sum()) if per_group.size else _NAN
        out["gxauc_groups"] = float(per_group.size)
    return out
