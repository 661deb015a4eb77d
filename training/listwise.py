"""List-level metrics of a re-ranked log, vectorised over requests and over score settings.

Why this exists: tuning the ranking formula means re-ranking every logged request under thousands
of weight settings. Looping over requests in Python would cost seconds per setting; here rows are
grouped by request *once* into dense ``(requests, slots)`` blocks, after which every setting is a
matrix product (scores), a partial sort along the slot axis (the ``k``-th largest score of each
request) and a second matrix product (sums of the values of the items ranked in the top ``k``).

Requests are bucketed by list length (powers of two), so a log with a few very long lists next to
many short ones pads each request to at most twice its length instead of to the longest list.

Ties in score are broken by the rows' order in the input (a stable sort), which is what a
brute-force ``sorted(rows, key=lambda i: (-score[i], i))`` per request does too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["RequestGroups", "topk_sums", "topk_sums_linear"]

# Elements (settings x padded rows) per block: bounds the temporary arrays to a few tens of MB.
_BLOCK_ELEMENTS = 2_000_000


@dataclass(frozen=True)
class _Bucket:
    rows: np.ndarray  # (R_b, L_b) int64 row index into the input, -1 where padded
    requests: np.ndarray  # (R_b,) int64 position of each request in ``RequestGroups.request_ids``

    @property
    def valid(self) -> np.ndarray:
        return self.rows >= 0


@dataclass(frozen=True)
class RequestGroups:
    """The rows of a log grouped by request, computed once and reused for every score setting.

    Attributes:
        request_ids: ``(R,)`` the distinct request ids, ascending.
        sizes: ``(R,)`` candidates per request.
        n_rows: rows of the input.
    """

    request_ids: np.ndarray
    sizes: np.ndarray
    n_rows: int
    buckets: tuple[_Bucket, ...]

    @classmethod
    def build(cls, requests: np.ndarray) -> RequestGroups:
        """Groups ``requests`` (``(n,)`` integer ids, any order) by id.

        Within a request the rows keep their input order, which breaks score ties later.
        """
        req = np.asarray(requests)
        if req.ndim != 1:
            raise ValueError(f"requests must be 1-D, got shape {req.shape}")
        if req.size and not np.issubdtype(req.dtype, np.integer):
            raise ValueError(f"requests must hold integer ids, got dtype {req.dtype}")
        n = int(req.size)
        order = np.argsort(req, kind="stable")  # rows grouped by request, input order inside
        ids, sizes = np.unique(req[order], return_counts=True)
        starts = np.cumsum(sizes) - sizes
        slot = np.arange(n) - np.repeat(starts, sizes)  # position of each sorted row in its list
        group = np.repeat(np.arange(ids.size), sizes)
        # bucket b holds lists of length in (2^(b-1), 2^b]
        width = np.where(sizes > 1, 2 ** np.ceil(np.log2(np.maximum(sizes, 1))), 1).astype(np.int64)
        buckets = []
        for w in np.unique(width):  # one iteration per distinct power of two, not per request
            members = np.flatnonzero(width == w)
            local = np.full(ids.size, -1, dtype=np.int64)
            local[members] = np.arange(members.size)
            length = int(sizes[members].max())
            rows = np.full((members.size, length), -1, dtype=np.int64)
            sel = local[group] >= 0
            rows[local[group[sel]], slot[sel]] = order[sel]
            buckets.append(_Bucket(rows, members.astype(np.int64)))
        return cls(ids, sizes.astype(np.int64), n, tuple(buckets))

    @property
    def n_requests(self) -> int:
        return int(self.request_ids.size)

    def subset(self, keep: np.ndarray) -> np.ndarray:
        """Row mask ``(n,)`` of the requests where ``keep`` (``(R,)`` bool) is true."""
        mask = np.zeros(self.n_rows, dtype=bool)
        for b in self.buckets:
            rows = b.rows[keep[b.requests]]
            mask[rows[rows >= 0]] = True
        return mask


def topk_sums(
    groups: RequestGroups,
    scores: np.ndarray,
    values: np.ndarray,
    ks: Sequence[int],
    per_request: bool = False,
) -> np.ndarray:
    """Sums of ``values`` over the ``k`` highest-scored rows of every request.

    This is "re-rank each logged list by ``scores`` and add up the labels of the new top ``k``",
    for every score setting and every ``k`` at once; a request with fewer than ``k`` candidates
    contributes all of them.

    Args:
        groups: the grouping of the rows (:meth:`RequestGroups.build`).
        scores: ``(S, n)`` one score per row for each of ``S`` settings (or ``(n,)``: one).
            Only the order within a request matters; infinities are fine (a weighted product
            can overflow), NaN is not.
        values: ``(n, C)`` the quantities to add up (labels, truths, counts), or ``(n,)``.
        ks: cut-offs, each >= 1.
        per_request: return per-request sums instead of totals over requests.

    Returns:
        ``(S, len(ks), C)`` totals over requests, or ``(S, len(ks), R, C)`` per request (in
        ``groups.request_ids`` order) with ``per_request``; float64. A 1-D ``scores`` drops the
        ``S`` axis and a 1-D ``values`` the ``C`` axis.
    """
    s = np.asarray(scores, dtype=np.float64)
    one_setting = s.ndim == 1
    s = s[None, :] if one_setting else s
    if s.ndim != 2 or s.shape[1] != groups.n_rows:
        raise ValueError(f"scores must be (S, {groups.n_rows}), got {np.shape(scores)}")
    if np.isnan(s).any():
        raise ValueError("scores must not be NaN")

    def block(b: _Bucket, lo: int, hi: int) -> np.ndarray:
        return s[lo:hi][:, np.maximum(b.rows, 0)]

    out = _accumulate(groups, block, s.shape[0], values, ks, per_request)
    return out[0] if one_setting else out


def topk_sums_linear(
    groups: RequestGroups,
    features: np.ndarray,
    weights: np.ndarray,
    values: np.ndarray,
    ks: Sequence[int],
    per_request: bool = False,
) -> np.ndarray:
    """:func:`topk_sums` for linear scores ``features @ weights[s]``, one per setting ``s``.

    Why a separate entry point: a linear score (a weighted sum of transformed head predictions,
    or the log of a weighted product) is computed block by block here, so thousands of settings
    never materialise an ``(S, n)`` score matrix.

    Args:
        features: ``(n, T)`` per-head score terms (finite).
        weights: ``(S, T)`` one weight vector per setting.
        values, ks, per_request: as in :func:`topk_sums`.

    Returns:
        As :func:`topk_sums` with a 2-D ``scores``.
    """
    f = np.asarray(features, dtype=np.float64)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if f.ndim != 2 or f.shape[0] != groups.n_rows:
        raise ValueError(f"features must be ({groups.n_rows}, T), got {np.shape(features)}")
    if w.ndim != 2 or w.shape[1] != f.shape[1]:
        raise ValueError(f"weights must be (S, {f.shape[1]}), got {np.shape(weights)}")
    if not (np.isfinite(f).all() and np.isfinite(w).all()):
        raise ValueError("features and weights must be finite")
    dense = {id(b): f[np.maximum(b.rows, 0)] for b in groups.buckets}  # (R_b, L_b, T) each

    def block(b: _Bucket, lo: int, hi: int) -> np.ndarray:
        fb = dense[id(b)]
        return (w[lo:hi] @ fb.reshape(-1, fb.shape[-1]).T).reshape(-1, *b.rows.shape)

    return _accumulate(groups, block, w.shape[0], values, ks, per_request)


def _accumulate(
    groups: RequestGroups,
    block_scores: Callable[[_Bucket, int, int], np.ndarray],
    n_settings: int,
    values: np.ndarray,
    ks: Sequence[int],
    per_request: bool,
) -> np.ndarray:
    """The shared loop: per bucket and block of settings, the top-k indicator times values."""
    v = np.asarray(values, dtype=np.float64)
    one_value = v.ndim == 1
    v = v[:, None] if one_value else v
    if v.ndim != 2 or v.shape[0] != groups.n_rows:
        raise ValueError(f"values must be ({groups.n_rows}, C), got {np.shape(values)}")
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    n_val = v.shape[1]
    shape = (
        (n_settings, len(ks), groups.n_requests, n_val)
        if per_request
        else (n_settings, len(ks), n_val)
    )
    out = np.zeros(shape, dtype=np.float64)
    for b in groups.buckets:
        valid = b.valid  # (R_b, L_b)
        vb = np.where(valid[..., None], v[np.maximum(b.rows, 0)], 0.0)  # (R_b, L_b, C)
        step = max(1, _BLOCK_ELEMENTS // max(1, valid.size))
        for lo in range(0, n_settings, step):
            hi = min(n_settings, lo + step)
            sb = np.where(valid, block_scores(b, lo, hi), -np.inf)  # (c, R_b, L_b)
            for j, k in enumerate(ks):
                top = _top_mask(sb, k).astype(np.float64)  # padding holds zero values
                if per_request:
                    out[lo:hi, j][:, b.requests] = np.einsum("crl,rlv->crv", top, vb)
                else:
                    out[lo:hi, j] += top.reshape(hi - lo, -1) @ vb.reshape(-1, n_val)
    if one_value:
        out = out[..., 0]
    return out


def _top_mask(s: np.ndarray, k: int) -> np.ndarray:
    """``(..., L)`` bool: the ``k`` largest of each row, ties at the cut going to the earliest.

    A partial sort (``np.partition``) finds the ``k``-th largest value per row; everything above
    it is in, and of the values equal to it the first ``k - (number above)`` are in. That equals
    the first ``k`` of a stable descending sort at a fraction of its cost.
    """
    length = s.shape[-1]
    if k >= length:
        return np.ones(s.shape, dtype=bool)
    thr = np.partition(s, length - k, axis=-1)[..., length - k, None]
    top = s > thr
    need = k - top.sum(axis=-1, keepdims=True)
    tied = s == thr
    if (tied.sum(axis=-1, keepdims=True) > need).any():  # a tie straddles the cut somewhere
        tied &= np.cumsum(tied, axis=-1) <= need
    top |= tied
    return top
