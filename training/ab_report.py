"""``ranker ab-report``: per variant of the ranking score, engagement and satisfaction per
impression with confidence intervals, from the log ``ranker build-log`` joined.

Why intervals over *users*: a variant is assigned per user (a stable hash of the user id), so
the user, not the impression, is the independent unit. A user's impressions share the user's
taste and mood; treating them as independent shrinks the interval by roughly the square root of
the impressions per user and calls noise a win (Deng, Lu & Litz 2017, "Trustworthy analysis of
online A/B tests: pitfalls, challenges and solutions", WSDM).

Each metric is a ratio of per-user sums, R = sum_u Y_u / sum_u N_u (clicks, watch seconds or
likes ``Y_u`` over impressions ``N_u`` of user u). Its variance comes from the **delta method**
(Deng, Knoblich & Lu 2018, "Applying the Delta Method in Metric Analytics", KDD): linearising R
around the means gives Var(R) ~= sum_u (Y_u - R N_u)^2 / (sum_u N_u)^2 * U / (U - 1). Chosen over
a cluster bootstrap because it is closed form (one pass of ``bincount``, no resampling noise,
the same answer on every run and machine) and, for the thousands of users an experiment has,
agrees with the bootstrap (the paper's section 4); ``tests/training/test_ab_report.py`` checks
its coverage on clustered A/A simulations. The difference between two variants sums their
variances, as disjoint user sets are independent.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from ranker.errors import DataError

__all__ = ["METRICS", "Z95", "ab_report", "format_report", "ratio_ci"]

Z95 = 1.959963984540054
METRICS: dict[str, str] = {
    "click_rate": "click",
    "watch_seconds_per_impression": "watch_time",
    "likes_per_impression": "like",
}
"""Reported metric -> the label column summed per user (rows without the column are skipped)."""
NO_GROUP = "(none)"


def ratio_ci(y: np.ndarray, n: np.ndarray) -> tuple[float, float]:
    """The ratio ``sum(y) / sum(n)`` of per-user sums and its delta-method variance."""
    total = float(n.sum())
    users = len(n)
    if total == 0 or users == 0:
        return math.nan, math.nan
    r = float(y.sum()) / total
    if users < 2:
        return r, math.nan
    resid = y - r * n
    return r, float(resid @ resid) / total**2 * users / (users - 1)


def _interval(value: float, var: float) -> list[float]:
    half = Z95 * math.sqrt(var) if np.isfinite(var) else math.nan
    return [value - half, value + half]


def _read(log: Path, columns: list[str]) -> pa.Table:
    if not log.exists():
        raise DataError(f"log {log} does not exist")
    try:
        dataset = ds.dataset(log, format="parquet")
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"log {log} is not readable as Parquet: {str(e).splitlines()[0]}") from None
    names = set(dataset.schema.names)
    for c in columns:
        if c not in names:
            raise DataError(f"log {log}: missing column {c!r} (has {sorted(names)})")
    present = [c for c in METRICS.values() if c in names]
    if not present:
        raise DataError(f"log {log}: none of the label columns {list(METRICS.values())}")
    t = dataset.to_table(columns=list(dict.fromkeys(columns + present)))
    for c in present:
        typ = t.schema.field(c).type
        if not (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)):
            raise DataError(f"log {log}: column {c!r} has type {typ}, expected a number")
    return t


def ab_report(
    log: Path, by: str = "variant", control: str | None = None, user_key: str = "user_id"
) -> dict:
    """Per group of ``by``: impressions, users, each metric with its 95% interval, and its
    difference from ``control`` (default the group named ``control``, else the first by name)."""
    t = _read(Path(log), [by, user_key])
    group = pc.fill_null(t.column(by).cast(pa.string()), NO_GROUP).to_numpy(zero_copy_only=False)
    user_enc = pc.dictionary_encode(t.column(user_key).combine_chunks())
    user = user_enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    names, g = np.unique(group.astype(str), return_inverse=True)
    g = g.ravel()
    n_users = len(user_enc.dictionary)
    # One cell per (group, user): the user's sums within the group.
    cell = g * n_users + user
    cells, cell_idx = np.unique(cell, return_inverse=True)
    cell_group = cells // n_users
    n_cell = np.bincount(cell_idx, minlength=len(cells)).astype(np.float64)
    sums = {}
    for metric, column in METRICS.items():
        if column not in t.column_names:
            continue
        col = t.column(column).cast(pa.float64())
        v = pc.fill_null(col, 0.0).to_numpy(zero_copy_only=False)
        sums[metric] = np.bincount(cell_idx, weights=v, minlength=len(cells))
    users_per = np.bincount(cells % n_users, minlength=n_users)
    shared = int((users_per > 1).sum())

    if control is None:
        control = "control" if "control" in names else str(names[0])
    if control not in names:
        raise DataError(f"log {log}: no {by!r} group named {control!r} (has {list(names)})")

    groups: dict[str, dict] = {}
    raw: dict[str, dict[str, tuple[float, float]]] = {}
    for i, name in enumerate(names):
        sel = cell_group == i
        entry: dict = {
            "impressions": int(n_cell[sel].sum()),
            "users": int(sel.sum()),
            "metrics": {},
        }
        raw[str(name)] = {}
        for metric, s in sums.items():
            value, var = ratio_ci(s[sel], n_cell[sel])
            raw[str(name)][metric] = (value, var)
            entry["metrics"][metric] = {"value": value, "ci95": _interval(value, var)}
        groups[str(name)] = entry
    for name, entry in groups.items():
        if name == control:
            continue
        for metric, m in entry["metrics"].items():
            (v, var), (c, cvar) = raw[name][metric], raw[control][metric]
            m["diff"] = v - c
            m["diff_ci95"] = _interval(v - c, var + cvar)
            m["relative"] = (v - c) / c if c else math.nan
    return {
        "log": str(log),
        "by": by,
        "control": control,
        "method": "delta method over users (Deng, Knoblich & Lu 2018), 95% normal intervals",
        "users_in_several_groups": shared,
        "groups": groups,
    }


def format_report(report: dict) -> str:
    """The report as a table: one row per group and metric."""
    lines = [
        f"{report['log']}: by {report['by']}, control {report['control']!r}; 95% intervals by "
        "the delta method over users",
        f"{'group':<16} {'impressions':>11} {'users':>7}  {'metric':<29} {'value':>9} "
        f"{'95% interval':>21}  {'vs control':>10} {'95% interval':>21}",
    ]

    def iv(a: list[float]) -> str:
        return f"[{a[0]:.4g}, {a[1]:.4g}]"

    for name, g in report["groups"].items():
        first = True
        for metric, m in g["metrics"].items():
            head = f"{name:<16} {g['impressions']:>11,} {g['users']:>7,}" if first else " " * 37
            diff = f"{m['diff']:>+10.4g} {iv(m['diff_ci95']):>21}" if "diff" in m else f"{'-':>10}"
            lines.append(f"{head}  {metric:<29} {m['value']:>9.4g} {iv(m['ci95']):>21}  {diff}")
            first = False
    if report["users_in_several_groups"]:
        lines.append(
            f"warning: {report['users_in_several_groups']:,} users are in more than one group: "
            "the groups are not independent and the difference intervals are too narrow"
        )
    return "\n".join(lines)
