"""Offline tuning of the ranking formula: the engagement/satisfaction trade-off, and weights
chosen from a stated goal.

Why offline and without the model in the loop: the ranking formula (``configs/ranking.toml``,
:mod:`ranker.scoring`) only recombines the heads' predictions. So every held-out row is scored
by the model *once*; each weight setting is then a linear function of fixed per-head terms
(``sum_t w_t f_t(pred_t)`` for ``weighted_sum``, ``sum_t w_t log pred_t`` for the order of
``weighted_product``), and its list metrics are a few array operations over all requests
(:mod:`training.listwise`). Thousands of settings cost seconds.

What is measured: every logged request is re-ranked by the setting's score and the labels of its
new top ``k`` (among the logged candidates of that request) are added up:

* ``clicks@k``, ``likes@k`` (binary heads, ``<task>s``): positives in the top k, per request;
* ``watch_time@k`` (a regression head labelled on every row): label sum in the top k, per request;
* ``rating@k`` (a regression head labelled on some rows only): mean label over the labelled items
  in the top k, pooled over requests;
* ``true_*``: the same from the log's truth columns (the synthetic world writes them): expected
  clicks, watch time and likes of the top k *if examined*, and the expected rating of a click
  (``true_rating`` weighted by ``true_click``).

The logged-label metrics are a *biased* offline estimate: a logged label depends on the position
the logging policy showed the item at (an item shown at slot 19 was rarely examined, so its label
is mostly 0 whatever its appeal), so they favour settings that agree with the logging policy. The
truth metrics are unbiased (position-free expectations), which no real log offers.

The search: random settings over the simplex (Dirichlet) and log-uniform weights, in units where
every head's term has unit spread within a request (so the search does not depend on whether a
head is in seconds or probabilities), then a local refinement around the best setting for the
goal. Optionally a random share of requests is held out of the search and the chosen weights are
re-measured there, as a check against picking noise.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from tqdm import tqdm

from ranker.config import TaskSpec
from ranker.errors import RankerError
from ranker.scoring import HeadWeight, RankingConfig, RankingFormula, Transform
from training.evaluate import Predictions, json_ready
from training.goal import Goal, parse_goal, parse_metric
from training.heldout import TRUTH_PREFIX
from training.listwise import RequestGroups, topk_sums, topk_sums_linear

__all__ = [
    "ListMetric",
    "SearchSpace",
    "TuneError",
    "TuneResult",
    "choose",
    "list_metrics",
    "metric_aliases",
    "pareto_front",
    "plot_pareto",
    "run_tune",
    "tune_predictions",
    "write_ranking_config",
    "write_outputs",
]

Formula = Literal["weighted_sum", "weighted_product"]
TRANSFORMS: tuple[str, ...] = get_args(Transform)
TRUTH_WEIGHT_COLUMN = "true_click"
"""The truth of a sparse label (rating) is averaged weighted by this column: ratings are given
on clicked items, so the expected rating of the top k is click-weighted."""
_EVAL_CHUNK = 64  # settings per call of the vectorised evaluator (one progress-bar tick)
_REFINE_ROUNDS = 4
_MIN_SHARE = 1e-3  # effective weight shares below this are written as 0


class TuneError(RankerError):
    """Tuning cannot proceed (nothing satisfies the goal, unknown head, no requests, ...)."""


# --------------------------------------------------------------------------------------------
# What is measured
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ListMetric:
    """One list-level metric: a sum per request of ``values[:, num]``, averaged over requests
    (``kind="sum"``), or a ratio of two sums pooled over requests (``kind="mean"``)."""

    name: str
    task: str
    kind: Literal["sum", "mean"]
    truth: bool
    unit: str
    num: int
    den: int | None = None

    def describe(self, k: int) -> str:
        """A human label for axes and tables, e.g. ``likes@10 (per request, logged labels)``."""
        what = "per request" if self.kind == "sum" else "mean over the top k"
        unit = f", {self.unit}" if self.unit else ""
        src = "truth" if self.truth else "logged labels"
        return f"{self.name}@{k} ({what}{unit}, {src})"


def _metric_name(task: TaskSpec) -> str:
    if task.kind == "binary" and not task.name.endswith("s"):
        return task.name + "s"  # a count of positives: clicks, likes
    return task.name


def list_metrics(tasks: list[TaskSpec], p: Predictions) -> tuple[list[ListMetric], np.ndarray]:
    """The metrics a log supports and the ``(n, C)`` values the top-k sums add up.

    Per task: binary -> positives in the top k; regression labelled on every row -> label sum;
    regression labelled on some rows -> mean over labelled items. Plus ``true_*`` twins for the
    tasks whose label has a truth column (``true_<label>``) in ``p.extra``.
    """
    cols: list[np.ndarray] = []
    out: list[ListMetric] = []

    def col(x: np.ndarray) -> int:
        cols.append(np.asarray(x, dtype=np.float64))
        return len(cols) - 1

    weight = p.extra.get(TRUTH_WEIGHT_COLUMN)
    for t in tasks:
        name = _metric_name(t)
        label, mask = p.labels[t.name], p.masks[t.name]
        unit = t.unit or ("count" if t.kind == "binary" else "")
        if t.kind == "binary" or mask.all():
            out.append(ListMetric(name, t.name, "sum", False, unit, col(np.where(mask, label, 0))))
        else:
            num = col(np.where(mask, label, 0.0))
            out.append(ListMetric(name, t.name, "mean", False, unit, num, col(mask)))
        truth = p.extra.get(TRUTH_PREFIX + t.label)
        if truth is None or not np.isfinite(truth).all():
            continue
        truth = truth.astype(np.float64) * t.label_scale
        tname = TRUTH_PREFIX + name
        if out[-1].kind == "sum":
            out.append(ListMetric(tname, t.name, "sum", True, unit, col(truth)))
        else:
            w = np.ones_like(truth) if weight is None else weight.astype(np.float64)
            out.append(ListMetric(tname, t.name, "mean", True, unit, col(truth * w), col(w)))
    values = np.stack(cols, axis=1) if cols else np.zeros((len(p), 0))
    return out, values


def metric_aliases(metrics: list[ListMetric]) -> dict[str, str]:
    """Names accepted in goals -> canonical names (a binary task's own name is an alias of its
    count: ``like@10`` means ``likes@10``)."""
    aliases = {m.name: m.name for m in metrics}
    for m in metrics:
        alias = (TRUTH_PREFIX if m.truth else "") + m.task
        aliases.setdefault(alias, m.name)
    return aliases


def _table(
    totals: np.ndarray, ks: list[int], metrics: list[ListMetric], n_requests: int
) -> dict[str, np.ndarray]:
    """``(S, len(ks), C)`` top-k totals -> ``{"likes@10": (S,)}``."""
    out: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for j, k in enumerate(ks):
            for m in metrics:
                num = totals[:, j, m.num]
                if m.kind == "sum":
                    out[f"{m.name}@{k}"] = num / max(n_requests, 1)
                else:
                    den = totals[:, j, m.den]
                    out[f"{m.name}@{k}"] = np.where(den > 0, num / np.maximum(den, 1e-300), np.nan)
    return out


# --------------------------------------------------------------------------------------------
# The search space
# --------------------------------------------------------------------------------------------


@dataclass
class SearchSpace:
    """Non-negative weights over ``heads`` for one formula, searched in *effective* units.

    ``u_t = w_t * scale_t`` where ``scale_t`` is the within-request standard deviation of head
    t's score term: a unit of ``u`` moves any head's contribution by one typical within-list
    spread, so "0.5 / 0.5" means "equal say" whatever the heads' units. Only directions matter
    (scaling all weights by c > 0 keeps every list's order), so settings live on the simplex
    ``sum_t u_t = 1``.
    """

    formula: Formula
    heads: list[str]
    transforms: dict[str, Transform]
    scale: np.ndarray  # (H,)

    def raw(self, u: np.ndarray) -> np.ndarray:
        """Effective weights ``(..., H)`` -> config weights."""
        return np.asarray(u) / self.scale

    def effective(self, config: RankingConfig) -> np.ndarray | None:
        """The config as a point of this space, or ``None`` if it is not one (another formula
        or transform, or a head outside ``heads`` with a non-zero weight)."""
        if config.formula != self.formula:
            return None
        u = np.zeros(len(self.heads))
        for name, h in config.heads.items():
            if h.weight == 0:
                continue
            if name not in self.heads or h.transform != self.transforms[name] or h.weight < 0:
                return None
            u[self.heads.index(name)] = h.weight * self.scale[self.heads.index(name)]
        return u

    def config(self, u: np.ndarray, total: float | None = None) -> RankingConfig:
        """A ranking config for effective weights ``u``, rescaled so ``sum(u) == total``
        (default 1) and rounded to 4 significant digits for a readable file."""
        u = np.asarray(u, dtype=np.float64)
        u = u / u.sum() * (total if total else 1.0)
        w = self.raw(u)
        heads = {
            h: HeadWeight(weight=_round(float(w[i])), transform=self.transforms[h])
            for i, h in enumerate(self.heads)
        }
        return RankingConfig(formula=self.formula, heads=heads)


def _round(x: float, digits: int = 4) -> float:
    return 0.0 if x == 0 else float(f"{x:.{digits}g}")


def score_terms(
    formula: Formula,
    transforms: dict[str, Transform],
    preds: dict[str, np.ndarray],
    heads: list[str],
) -> np.ndarray:
    """``(n, H)`` per-head terms whose weighted sum orders rows exactly as the formula does.

    Computed through :class:`ranker.scoring.RankingFormula` with one head at weight 1, so the
    tuner has no second definition of a transform: ``f_t(pred_t)`` for ``weighted_sum``, and the
    log of the one-head product (``log max(f_t(pred_t), eps)``) for ``weighted_product``, whose
    score ``exp(sum_t w_t log ...)`` is a monotone function of the weighted sum of these terms.
    """
    cols = []
    for h in heads:
        one = RankingConfig(
            formula=formula, heads={h: HeadWeight(weight=1.0, transform=transforms[h])}
        )
        s = RankingFormula(one, list(preds)).score(preds)
        cols.append(np.log(s) if formula == "weighted_product" else s)
    terms = np.stack(cols, axis=1) if cols else np.zeros((0, 0))
    if not np.isfinite(terms).all():
        bad = [h for i, h in enumerate(heads) if not np.isfinite(terms[:, i]).all()]
        raise TuneError(f"non-finite score terms for head(s) {bad}; check their predictions")
    return terms


def _within_request_std(terms: np.ndarray, groups: RequestGroups) -> np.ndarray:
    """Per column, the standard deviation of ``terms`` around each request's mean."""
    req = np.empty(groups.n_rows, dtype=np.int64)
    for b in groups.buckets:
        ok = b.rows >= 0
        req[b.rows[ok]] = np.broadcast_to(b.requests[:, None], b.rows.shape)[ok]
    sizes = np.bincount(req, minlength=groups.n_requests).astype(np.float64)
    std = np.empty(terms.shape[1])
    for i in range(terms.shape[1]):  # one pass per head
        mean = np.bincount(req, weights=terms[:, i], minlength=groups.n_requests) / sizes
        std[i] = float(np.sqrt(np.mean(np.square(terms[:, i] - mean[req]))))
    return np.where(std > 1e-12, std, 1.0)


# --------------------------------------------------------------------------------------------
# Choosing
# --------------------------------------------------------------------------------------------


def choose(
    goal: Goal, table: dict[str, np.ndarray], current: dict[str, float]
) -> tuple[int, np.ndarray]:
    """Index of the best setting for ``goal`` and the feasibility mask ``(S,)``.

    Best = the best objective among settings meeting every constraint; when none does, the
    setting missing the constraints by the least (relative), so refinement can start there.
    """
    obj = table[str(goal.metric)]
    feasible = np.ones(obj.shape[0], dtype=bool)
    miss = np.zeros(obj.shape[0])
    for c in goal.constraints:
        key = str(c.metric)
        feasible &= c.satisfied(table[key], current[key])
        miss += c.violation(table[key], current[key])
    sign = 1.0 if goal.direction == "maximize" else -1.0
    value = np.where(np.isfinite(obj), sign * obj, -np.inf)
    if feasible.any():
        return int(np.argmax(np.where(feasible, value, -np.inf))), feasible
    order = np.lexsort((-value, np.nan_to_num(miss, nan=np.inf)))
    return int(order[0]), feasible


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``(S,)`` mask of the settings no other setting beats on both ``x`` and ``y`` (both
    maximised): sorted by ``x`` descending, a point is on the front if its ``y`` exceeds every
    ``y`` seen before it."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    idx = np.flatnonzero(ok)
    order = idx[np.lexsort((-y[idx], -x[idx]))]
    best_before = np.maximum.accumulate(np.r_[-np.inf, y[order]])[:-1]
    front = np.zeros(x.shape[0], dtype=bool)
    front[order[y[order] > best_before]] = True
    return front


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------


@dataclass
class _Data:
    """The rows of one set of requests, ready for the evaluator."""

    preds: dict[str, np.ndarray]
    groups: RequestGroups
    values: np.ndarray  # (n, C)
    terms: np.ndarray  # (n, H)

    @property
    def n_rows(self) -> int:
        return self.groups.n_rows


@dataclass
class TuneResult:
    """Everything a tuning run found; :func:`write_outputs` turns it into files."""

    goal: Goal
    space: SearchSpace
    ks: list[int]
    metrics: list[ListMetric]
    weights: np.ndarray  # (S, H) config weights of every evaluated setting
    stage: np.ndarray  # (S,) "vertex" | "current" | "simplex" | "log-uniform" | "refine"
    table: dict[str, np.ndarray]  # "likes@10" -> (S,) on the search requests
    feasible: np.ndarray  # (S,)
    best: int
    current: RankingConfig
    chosen: RankingConfig
    measured: dict[str, dict[str, dict[str, float]]]  # split -> {"current", "chosen"} -> metric
    rows: dict[str, int]
    requests: dict[str, int]
    info: dict[str, Any] = field(default_factory=dict)

    def metric(self, name: str) -> ListMetric:
        base = name.partition("@")[0]
        return next(m for m in self.metrics if m.name == base)


def _take(p: Predictions, rows: np.ndarray) -> Predictions:
    def tk(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v[rows] for k, v in d.items()}

    return Predictions(
        tk(p.preds), tk(p.labels), tk(p.masks), p.users[rows], p.requests[rows], tk(p.extra)
    )


def _evaluate(
    data: _Data,
    weights: np.ndarray,
    ks: list[int],
    metrics: list[ListMetric],
    bar: tqdm | None = None,
) -> dict[str, np.ndarray]:
    """Metric table of many linear settings (config weights ``(S, H)``) on ``data``."""
    parts = []
    for lo in range(0, weights.shape[0], _EVAL_CHUNK):
        w = weights[lo : lo + _EVAL_CHUNK]
        parts.append(topk_sums_linear(data.groups, data.terms, w, data.values, ks))
        if bar is not None:
            bar.update(w.shape[0])
    totals = np.concatenate(parts) if parts else np.zeros((0, len(ks), data.values.shape[1]))
    return _table(totals, ks, metrics, data.groups.n_requests)


def _measure(
    config: RankingConfig,
    tasks: list[str],
    data: _Data,
    ks: list[int],
    metrics: list[ListMetric],
) -> dict[str, float]:
    """Metrics of a ranking config scored by :class:`RankingFormula` itself (not the linear
    shortcut), so the reported numbers are those of the file a service would load."""
    scores = RankingFormula(config, tasks).score(data.preds)
    totals = topk_sums(data.groups, scores[None, :], data.values, ks)
    return {k: float(v[0]) for k, v in _table(totals, ks, metrics, data.groups.n_requests).items()}


def _prune(u: np.ndarray) -> np.ndarray:
    """Rows on the simplex with shares below ``_MIN_SHARE`` set to 0: a head with a 0.1 % say
    barely reorders a list, and a written weight of 8e-09 only puzzles its reader."""
    u = u / u.sum(axis=1, keepdims=True)
    u = np.where(u < _MIN_SHARE, 0.0, u)
    return u / u.sum(axis=1, keepdims=True)


def _random_settings(
    n: int, n_heads: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` effective-weight settings on the simplex: half Dirichlet (flat and sparse, reaching
    the edges where some heads are off), half log-uniform over three decades per head (one head
    dominating another by any factor up to 1000)."""
    n_dir = n // 2
    n_flat = n_dir // 2
    flat = rng.dirichlet(np.ones(n_heads), size=n_flat)
    sparse = rng.dirichlet(np.full(n_heads, 0.3), size=n_dir - n_flat)
    logu = 10.0 ** rng.uniform(-3.0, 0.0, size=(n - n_dir, n_heads))
    u = np.concatenate([flat, sparse, logu])
    stage = np.array(["simplex"] * n_dir + ["log-uniform"] * (n - n_dir))
    return _prune(u), stage


def _refine_around(u: np.ndarray, n: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` multiplicative perturbations of ``u`` (log-normal, ``sigma``), a tenth of the heads
    switched off at random, zeros nudged on, renormalised to the simplex."""
    h = u.shape[0]
    base = np.where(u > 0, u, 0.01 * max(float(u.max()), 1e-12) * rng.random((n, h)))
    cand = base * np.exp(rng.normal(0.0, sigma, size=(n, h)))
    off = rng.random((n, h)) < 0.1
    off[off.all(axis=1)] = False
    cand = np.where(off, 0.0, cand)
    total = cand.sum(axis=1, keepdims=True)
    cand = np.where(total > 0, cand / np.where(total > 0, total, 1.0), u)
    return _prune(cand)


def tune_predictions(
    preds: Predictions,
    tasks: list[TaskSpec],
    current: RankingConfig,
    goal: Goal | None = None,
    *,
    maximize: str | None = None,
    minimize: str | None = None,
    constraints: list[str] | None = None,
    k: int = 10,
    formula: Formula | None = None,
    heads: list[str] | None = None,
    transforms: dict[str, Transform] | None = None,
    samples: int = 1500,
    refine: int = 400,
    holdout: float = 0.0,
    extra_ks: list[int] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> TuneResult:
    """Searches ranking weights on held-out predictions; pure numpy, no model.

    Args:
        preds: served predictions and labels of the held-out rows (with truth in ``extra``).
        tasks: the artifact's tasks (kinds, label columns).
        current: the ranking config in use: the baseline of relative constraints.
        goal: the goal; or give ``maximize``/``minimize``/``constraints`` as text (grammar in
            :mod:`training.goal`; names are checked against the metrics this log supports).
        k: the default cut-off.
        formula: the formula to tune; default: the current config's.
        heads: the heads that may get a non-zero weight; default: every head of the model.
        transforms: per-head transforms; default: the current config's for ``weighted_sum`` (and
            for ``weighted_product`` when the current config is one), identity otherwise.
        samples: random settings; refine: settings of the local refinement around the best.
        holdout: share of requests (0..0.9) kept out of the search and used to re-measure the
            current and chosen weights.
        extra_ks: more cut-offs to report.
        seed: random seed (search and holdout split).
        progress: show a progress bar.

    Raises:
        TuneError, GoalError: with a message saying what is wrong.
    """
    if k < 1:
        raise TuneError(f"--k must be a positive integer, got {k}")
    task_names = [t.name for t in tasks]
    RankingFormula(current, task_names)  # the current config must fit the model
    formula = formula or current.formula
    heads = list(heads or task_names)
    unknown = sorted(set(heads) - set(task_names))
    if unknown or not heads:
        raise TuneError(
            f"--heads {unknown or heads}: not heads of the model; heads are {task_names}"
        )
    tf: dict[str, Transform] = {h: "identity" for h in heads}
    if formula == "weighted_sum" or current.formula == formula:
        tf.update({h: w.transform for h, w in current.heads.items() if h in tf})
    for h, t in (transforms or {}).items():
        if h not in tf:
            raise TuneError(f"transform for {h!r}: not a tuned head; tuned heads are {heads}")
        tf[h] = t
    if not 0.0 <= holdout <= 0.9:
        raise TuneError(f"holdout must lie in [0, 0.9], got {holdout}")
    if len(preds) == 0:
        raise TuneError("the held-out split has no rows")

    metrics, values = list_metrics(tasks, preds)
    aliases = metric_aliases(metrics)
    if goal is None:
        goal = parse_goal(maximize, minimize, list(constraints or []), k, aliases)
    else:
        for m in goal.metrics:
            if m.name not in aliases.values():
                raise TuneError(f"goal metric {m} is not measurable here; known: {sorted(aliases)}")
    ks = sorted({k, *(extra_ks or []), *(m.k for m in goal.metrics)})

    # split requests into search / holdout once
    rng = np.random.default_rng(seed)
    all_groups = RequestGroups.build(preds.requests)
    held = rng.random(all_groups.n_requests) < holdout
    if holdout > 0 and (held.all() or not held.any()):
        raise TuneError(f"holdout {holdout} leaves no requests on one side; use more requests")
    sets: dict[str, _Data] = {}
    for name, keep in (("search", ~held), ("holdout", held)):
        if not keep.any():
            continue
        rows = np.flatnonzero(all_groups.subset(keep))
        p = _take(preds, rows)
        groups = RequestGroups.build(p.requests)
        sets[name] = _Data(p.preds, groups, values[rows], score_terms(formula, tf, p.preds, heads))
    data = sets["search"]
    space = SearchSpace(formula, heads, tf, _within_request_std(data.terms, data.groups))

    measured: dict[str, dict[str, dict[str, float]]] = {
        name: {"current": _measure(current, task_names, d, ks, metrics)} for name, d in sets.items()
    }
    base = measured["search"]["current"]
    for m in goal.metrics:
        if not np.isfinite(base[str(m)]):
            raise TuneError(f"{m} is undefined on the search requests (no labelled items)")

    # random stage: vertices, the current weights, random settings
    h = len(heads)
    u_cur = space.effective(current)
    u_parts = [np.eye(h)]
    stages = [np.array(["vertex"] * h)]
    if u_cur is not None:
        u_parts.append((u_cur / u_cur.sum())[None, :])
        stages.append(np.array(["current"]))
    u_rand, s_rand = _random_settings(max(samples, 0), h, rng)
    u_parts.append(u_rand)
    stages.append(s_rand)
    u_all = np.concatenate(u_parts)
    stage = np.concatenate(stages)
    total = u_all.shape[0] + max(refine, 0)
    with tqdm(total=total, desc="tune", unit=" settings", disable=not progress) as bar:
        table = _evaluate(data, space.raw(u_all), ks, metrics, bar)
        best, _ = choose(goal, table, base)
        per_round = max(refine, 0) // _REFINE_ROUNDS
        for r in range(_REFINE_ROUNDS if per_round else 0):
            n = per_round if r < _REFINE_ROUNDS - 1 else refine - per_round * (_REFINE_ROUNDS - 1)
            cand = _refine_around(u_all[best], n, 0.6 / 2**r, rng)
            t_new = _evaluate(data, space.raw(cand), ks, metrics, bar)
            u_all = np.concatenate([u_all, cand])
            stage = np.concatenate([stage, np.array(["refine"] * n)])
            table = {key: np.concatenate([table[key], t_new[key]]) for key in table}
            best, _ = choose(goal, table, base)
    best, feasible = choose(goal, table, base)
    if not feasible[best]:
        lines = [f"no weight setting among {len(feasible)} meets every constraint of: {goal}"]
        for c in goal.constraints:
            key = str(c.metric)
            reach = np.nanmax(table[key]) if c.op == ">=" else np.nanmin(table[key])
            lines.append(
                f"  {c}: bound {c.bound(base[key]):.6g}, current {base[key]:.6g}, "
                f"best reachable {reach:.6g}"
            )
        raise TuneError("\n".join(lines))

    total_u = float(u_cur.sum()) if u_cur is not None else None
    chosen = space.config(u_all[best], total_u)
    for name, d in sets.items():
        measured[name]["chosen"] = _measure(chosen, task_names, d, ks, metrics)
    return TuneResult(
        goal=goal,
        space=space,
        ks=ks,
        metrics=metrics,
        weights=space.raw(u_all),
        stage=stage,
        table=table,
        feasible=feasible,
        best=best,
        current=current,
        chosen=chosen,
        measured=measured,
        rows={name: d.n_rows for name, d in sets.items()},
        requests={name: d.groups.n_requests for name, d in sets.items()},
        info={"k": k, "samples": samples, "refine": refine, "holdout": holdout, "seed": seed},
    )


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def _toml_float(x: float) -> str:
    s = repr(float(x))
    return s if any(c in s for c in ".en") else s + ".0"


def write_ranking_config(
    config: RankingConfig, path: Path, header: list[str] | None = None
) -> Path:
    """Writes ``config`` as TOML in the schema of ``configs/ranking.toml`` (what
    :func:`ranker.scoring.load_ranking_config` and the service read); comments on top."""
    lines = [f"# {h}" if h else "#" for h in header or []]
    lines.append(f'formula = "{config.formula}"')
    for name, h in config.heads.items():
        lines += ["", f"[heads.{name}]", f"weight = {_toml_float(h.weight)}"]
        if h.transform != "identity":
            lines.append(f'transform = "{h.transform}"')
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _fmt(x: float | None) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{x:.4g}" if abs(x) < 1e5 else f"{x:,.0f}"


def _change(cur: float, new: float) -> float | None:
    if not (np.isfinite(cur) and np.isfinite(new)) or cur == 0:
        return None
    return (new - cur) / abs(cur) * 100.0


def summary(result: TuneResult, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run as one JSON-ready dict (goal, data, both configs, metrics per split)."""
    splits = {}
    for split, m in result.measured.items():
        splits[split] = {
            name: {
                "current": m["current"][name],
                "chosen": m["chosen"][name],
                "change_pct": _change(m["current"][name], m["chosen"][name]),
            }
            for name in m["current"]
        }
    base = result.measured["search"]["current"]
    return json_ready(
        {
            "goal": str(result.goal),
            "constraints": [
                {
                    "expression": str(c),
                    "bound": c.bound(base[str(c.metric)]),
                    "met_on_search": bool(
                        c.satisfied(
                            np.array([result.measured["search"]["chosen"][str(c.metric)]]),
                            base[str(c.metric)],
                        )[0]
                    ),
                }
                for c in result.goal.constraints
            ],
            "formula": result.space.formula,
            "heads": result.space.heads,
            "transforms": result.space.transforms,
            "effective_scale": dict(
                zip(result.space.heads, result.space.scale.tolist(), strict=True)
            ),
            "source": source or {},
            "rows": result.rows,
            "requests": result.requests,
            "settings_evaluated": int(result.weights.shape[0]),
            "settings_feasible": int(result.feasible.sum()),
            "search": result.info,
            "current": result.current.model_dump(),
            "chosen": result.chosen.model_dump(),
            "metrics": splits,
            "note": (
                "Metrics without 'true_' re-rank logged lists and add up logged labels: a biased "
                "offline estimate, since a logged label depends on the position it was shown "
                "at. 'true_' metrics use the synthetic world's position-free truth."
            ),
        }
    )


def _markdown(result: TuneResult, summ: dict[str, Any]) -> str:
    lines = [
        "# Ranking-weight tuning",
        "",
        f"Goal: **{result.goal}** (formula `{result.space.formula}`, "
        f"{summ['settings_evaluated']} settings evaluated, {summ['settings_feasible']} feasible).",
        "",
        f"Search set: {result.requests['search']} requests ({result.rows['search']} rows)"
        + (
            f"; holdout: {result.requests['holdout']} requests ({result.rows['holdout']} rows)."
            if "holdout" in result.requests
            else "."
        ),
        "",
        "| head | transform | current weight | chosen weight |",
        "|---|---|---:|---:|",
    ]
    for h in sorted(set(result.current.heads) | set(result.chosen.heads)):
        cur = result.current.heads.get(h)
        new = result.chosen.heads.get(h)
        tf = (new or cur).transform if (new or cur) else "identity"
        lines.append(
            f"| {h} | {tf} | {_fmt(cur.weight) if cur else '0'} | "
            f"{_fmt(new.weight) if new else '0'} |"
        )
    for split in summ["metrics"]:
        lines += [
            "",
            f"## Metrics on the {split} requests",
            "",
            "| metric | current | chosen | change |",
            "|---|---:|---:|---:|",
        ]
        for name, v in summ["metrics"][split].items():
            ch = v["change_pct"]
            lines.append(
                f"| {name} | {_fmt(v['current'])} | {_fmt(v['chosen'])} | "
                f"{'n/a' if ch is None else f'{ch:+.1f} %'} |"
            )
    lines += ["", summ["note"], ""]
    return "\n".join(lines)


def plot_pareto(result: TuneResult, x: str, y: str, path: Path) -> Path:
    """Engagement (``x``) against satisfaction (``y``): every evaluated setting, the Pareto front,
    the current and the chosen weights. Agg canvas, no pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    for m in (x, y):
        if m not in result.table:
            raise TuneError(f"cannot plot {m}: not measured; measured: {sorted(result.table)}")
    xs, ys = result.table[x], result.table[y]
    front = pareto_front(xs, ys)
    fig = Figure(figsize=(7.5, 5.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    infeasible = ~result.feasible
    if result.goal.constraints and infeasible.any():
        ax.scatter(
            xs[infeasible], ys[infeasible], s=6, c="0.75", label="violates a constraint of the goal"
        )
    ax.scatter(
        xs[result.feasible],
        ys[result.feasible],
        s=6,
        c="tab:blue",
        alpha=0.6,
        label="weight setting" if not result.goal.constraints else "meets the goal's constraints",
    )
    order = np.flatnonzero(front)[np.argsort(xs[front])]
    ax.plot(xs[order], ys[order], "-o", c="tab:orange", ms=3.5, lw=1.5, label="Pareto front")
    cur = result.measured["search"]["current"]
    new = result.measured["search"]["chosen"]
    ax.scatter(
        [cur[x]],
        [cur[y]],
        marker="*",
        s=260,
        c="tab:red",
        ec="k",
        zorder=5,
        label="current weights",
    )
    ax.scatter(
        [new[x]],
        [new[y]],
        marker="D",
        s=110,
        c="tab:green",
        ec="k",
        zorder=6,
        label="chosen weights",
    )
    k_of = {name: int(name.partition("@")[2]) for name in (x, y)}
    ax.set_xlabel(result.metric(x).describe(k_of[x]))
    ax.set_ylabel(result.metric(y).describe(k_of[y]))
    ax.set_title(f"{result.space.formula}: {result.goal}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def write_outputs(
    result: TuneResult,
    out: Path,
    x: str | None = None,
    y: str | None = None,
    source: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Writes ``ranking.toml`` (the chosen weights), ``summary.json``, ``summary.md``,
    ``settings.csv`` (every setting's weights and metrics) and ``pareto.png`` (plus
    ``pareto_truth.png`` when the log has truth columns) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    k = result.info.get("k", result.ks[0])
    x = x or f"watch_time@{k}"
    y = y or f"likes@{k}"
    summ = summary(result, source)
    paths = {
        "ranking": write_ranking_config(
            result.chosen,
            out / "ranking.toml",
            [
                "Ranking weights chosen by `ranker tune`.",
                f"Goal: {result.goal}",
                f"Chosen from {summ['settings_evaluated']} settings on "
                f"{result.requests['search']} held-out requests; see summary.md next to this file.",
            ],
        ),
        "summary_json": out / "summary.json",
        "summary_md": out / "summary.md",
        "settings": out / "settings.csv",
    }
    paths["summary_json"].write_text(json.dumps(summ, indent=2) + "\n")
    paths["summary_md"].write_text(_markdown(result, summ))
    with open(paths["settings"], "w", newline="") as f:
        w = csv.writer(f)
        names = sorted(result.table)
        w.writerow(["stage", "feasible", *(f"w_{h}" for h in result.space.heads), *names])
        for i in range(result.weights.shape[0]):
            w.writerow(
                [result.stage[i], int(result.feasible[i])]
                + [f"{v:.6g}" for v in result.weights[i]]
                + [f"{result.table[n][i]:.6g}" for n in names]
            )
    paths["pareto"] = plot_pareto(result, x, y, out / "pareto.png")
    tx, ty = TRUTH_PREFIX + x, TRUTH_PREFIX + y
    if tx in result.table and ty in result.table:
        paths["pareto_truth"] = plot_pareto(result, tx, ty, out / "pareto_truth.png")
    return paths


def parse_transforms(items: list[str]) -> dict[str, Transform]:
    """``["watch_time=log1p"]`` -> ``{"watch_time": "log1p"}``, naming a bad item."""
    out: dict[str, Transform] = {}
    for item in items:
        head, sep, tf = item.partition("=")
        if not sep or not head.strip():
            raise TuneError(f"--transform {item!r}: expected HEAD=TRANSFORM, e.g. watch_time=log1p")
        if tf.strip() not in TRANSFORMS:
            raise TuneError(
                f"--transform {item!r}: unknown transform {tf.strip()!r}; use {TRANSFORMS}"
            )
        out[head.strip()] = tf.strip()  # type: ignore[assignment]
    return out


def run_tune(
    artifact: Path,
    out: Path,
    *,
    log: str | None = None,
    split: Literal["train", "validation", "all"] = "validation",
    ranking: Path | None = None,
    maximize: str | None = None,
    minimize: str | None = None,
    constraints: list[str] | None = None,
    k: int = 10,
    formula: Formula | None = None,
    heads: list[str] | None = None,
    transforms: list[str] | None = None,
    samples: int = 1500,
    refine: int = 400,
    holdout: float = 0.3,
    seed: int = 0,
    x: str | None = None,
    y: str | None = None,
    progress: bool = True,
    as_variant: str | None = None,
    share: float | None = None,
    into: Path | None = None,
) -> tuple[TuneResult, dict[str, Path]]:
    """The ``ranker tune`` job: predict the held-out split once, search, write the outputs.

    With neither ``maximize`` nor ``minimize``: maximise ``x`` (default ``watch_time@k``) while
    keeping ``y`` (default ``likes@k``) at least at its current value.

    ``as_variant``: also append the chosen weights to the ranking config ``into`` as a variant
    of that name with ``share`` of the users (:func:`ranker.variants.add_variant`); the
    current weights are then ``into``'s base weights unless ``ranking`` names others. The
    variant is checked (name, share, the file) before anything runs.
    """
    from ranker.scoring import load_ranking_config
    from ranker.variants import add_variant
    from training.heldout import load_heldout

    if k < 1:
        raise TuneError(f"--k must be a positive integer, got {k}")
    x = x or f"watch_time@{k}"
    y = y or f"likes@{k}"
    if maximize is None and minimize is None:
        maximize, constraints = x, [f"{y}>=-0%", *(constraints or [])]
    # syntax errors surface before the model runs; names are checked once the log is known
    parse_goal(maximize, minimize, list(constraints or []), k)
    axes = [parse_metric(m, k, where=f"plot axis {m!r}") for m in (x, y)]
    tf = parse_transforms(list(transforms or []))
    if as_variant is not None or share is not None or into is not None:
        if as_variant is None or share is None or into is None:
            raise TuneError("--as-variant, --share and --into go together")
        ranking = ranking or into
        base = load_ranking_config(into)
        add_variant(into, as_variant, share, base, list(base.heads), dry_run=True)
    current = load_ranking_config(ranking) if ranking is not None else None
    held = load_heldout(artifact, log, split, with_truth=True, progress=progress)
    if current is None:  # the weights the artifact carries are the ones in use
        current = held.artifact.ranking
    result = tune_predictions(
        held.predictions,
        held.config.tasks,
        current,
        maximize=maximize,
        minimize=minimize,
        constraints=constraints,
        k=k,
        formula=formula,
        heads=heads,
        transforms=tf,
        samples=samples,
        refine=refine,
        holdout=holdout,
        extra_ks=[a.k for a in axes],
        seed=seed,
        progress=progress,
    )
    source = {
        "artifact": str(held.artifact.path),
        "version": held.artifact.version,
        "log": str(held.log.path),
        "split": split,
        "ranking_config": str(ranking) if ranking is not None else "the artifact's own",
    }
    aliases = metric_aliases(result.metrics)
    xm, ym = (str(parse_metric(m, k, aliases, f"plot axis {m!r}")) for m in (x, y))
    paths = write_outputs(result, out, xm, ym, source)
    if as_variant is not None and into is not None and share is not None:
        note = [
            f"Variant {as_variant!r} chosen by `ranker tune` (goal: {result.goal}); see "
            f"{out / 'summary.md'}.",
        ]
        add_variant(into, as_variant, share, result.chosen, held.config.task_names, note)
        paths["variant"] = into
    return result, paths


def print_summary(result: TuneResult, paths: dict[str, Path]) -> None:
    """The human summary on stdout: weights, then goal metrics current vs chosen."""
    print(f"goal: {result.goal}")
    print(f"{'head':<12}{'current':>12}{'chosen':>12}  transform")
    for h in result.space.heads:
        cur = result.current.heads.get(h)
        new = result.chosen.heads[h]
        print(f"{h:<12}{(cur.weight if cur else 0.0):>12.4g}{new.weight:>12.4g}  {new.transform}")
    k = result.info["k"]
    names = [f"{m.name}@{k}" for m in result.metrics]
    for split, m in result.measured.items():
        print(f"\n{split} requests ({result.requests[split]}):")
        print(f"{'metric':<22}{'current':>12}{'chosen':>12}{'change':>10}")
        for n in names:
            ch = _change(m["current"][n], m["chosen"][n])
            chs = "n/a" if ch is None else f"{ch:+.1f}%"
            print(f"{n:<22}{_fmt(m['current'][n]):>12}{_fmt(m['chosen'][n]):>12}{chs:>10}")
    print()
    for key, p in paths.items():
        print(f"{key}: {p}")
