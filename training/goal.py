"""The stated goal of a ranking-score tuning run: one metric to optimise, constraints on others.

Why a small grammar rather than Python expressions: goals come from the command line and end up in
summaries; a fixed grammar can be validated up front, with an error naming the bad part, and is
readable by someone who never saw the code. The grammar (also in ``docs/tuning.md``)::

    objective   :=  METRIC                       with --maximize or --minimize
    constraint  :=  METRIC OP BOUND              e.g.  likes@10>=-2%   rating@10 >= 3.6
    METRIC      :=  NAME [ "@" K ]               NAME from the metric list; K a positive integer
                                                 (default: the run's --k)
    OP          :=  ">=" | "<="
    BOUND       :=  NUMBER "%"                   relative to the current weights' value:
                                                 likes@10>=-2% means at most 2 % below current,
                                                 watch_time@10>=+5% at least 5 % above it
                 |  NUMBER                       an absolute value in the metric's unit

A relative bound is ``current + pct / 100 * |current|``, so "-2 %" always means "2 % worse" for a
``>=`` constraint, also when the current value is negative.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ranker.errors import ConfigError

__all__ = [
    "Constraint",
    "Goal",
    "GoalError",
    "MetricRef",
    "parse_constraint",
    "parse_goal",
    "parse_metric",
]

Direction = Literal["maximize", "minimize"]
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
# longest operators first, so ">=" is not read as ">" followed by "="
_OPERATOR = re.compile(r">=|<=|=>|=<|==|!=|>|<|=")


class GoalError(ConfigError):
    """A goal or constraint expression is malformed; the message quotes the bad part."""


@dataclass(frozen=True)
class MetricRef:
    """A list metric at a cut-off, e.g. ``likes@10``."""

    name: str
    k: int

    def __str__(self) -> str:
        return f"{self.name}@{self.k}"


@dataclass(frozen=True)
class Constraint:
    """``metric op bound``; the bound is absolute or relative to the current weights' value."""

    metric: MetricRef
    op: Literal[">=", "<="]
    value: float
    relative: bool
    text: str = field(default="", compare=False)

    def bound(self, current: float) -> float:
        """The absolute bound, given the current weights' value of the metric."""
        if self.relative:
            return current + self.value / 100.0 * abs(current)
        return self.value

    def satisfied(self, values: np.ndarray, current: float) -> np.ndarray:
        """Which of ``values`` meet the constraint (a 1e-9 relative slack absorbs float noise,
        so the current weights always satisfy ``>= -0%``)."""
        b = self.bound(current)
        slack = 1e-9 * max(1.0, abs(b))
        v = np.asarray(values, dtype=np.float64)
        return v >= b - slack if self.op == ">=" else v <= b + slack

    def violation(self, values: np.ndarray, current: float) -> np.ndarray:
        """How far ``values`` miss the bound, relative to its size (0 where satisfied)."""
        b = self.bound(current)
        v = np.asarray(values, dtype=np.float64)
        miss = b - v if self.op == ">=" else v - b
        return np.maximum(miss, 0.0) / max(abs(b), 1e-12)

    def __str__(self) -> str:
        if self.relative:
            return f"{self.metric}{self.op}{self.value:+g}%"
        return f"{self.metric}{self.op}{self.value:g}"


@dataclass(frozen=True)
class Goal:
    """Optimise ``metric`` in ``direction`` subject to every constraint."""

    direction: Direction
    metric: MetricRef
    constraints: tuple[Constraint, ...] = ()

    @property
    def metrics(self) -> list[MetricRef]:
        """Every metric the goal refers to (objective first)."""
        return [self.metric, *(c.metric for c in self.constraints)]

    def __str__(self) -> str:
        parts = [f"{self.direction} {self.metric}"]
        parts += [f"subject to {c}" for c in self.constraints]
        return ", ".join(parts)


def _resolve_name(name: str, where: str, known: Collection[str] | Mapping[str, str] | None) -> str:
    if known is None:
        return name
    if isinstance(known, Mapping):
        if name in known:
            return known[name]
    elif name in known:
        return name
    names = sorted(set(known.values()) if isinstance(known, Mapping) else set(known))
    raise GoalError(f"{where}: unknown metric {name!r}; known metrics: {', '.join(names)}")


def parse_metric(
    text: str,
    default_k: int,
    known: Collection[str] | Mapping[str, str] | None = None,
    where: str | None = None,
) -> MetricRef:
    """``NAME[@K]`` -> :class:`MetricRef`.

    Args:
        text: the metric reference.
        default_k: the cut-off when ``@K`` is left out.
        known: valid names, or a mapping alias -> canonical name; ``None`` skips the check.
        where: how to name the expression in errors (default: the text itself).

    Raises:
        GoalError: naming the bad part (the name, the cut-off, or stray characters).
    """
    where = where or f"metric {text.strip()!r}"
    raw = text.strip()
    if not raw:
        raise GoalError(f"{where}: the metric is missing (expected e.g. likes@10)")
    name_part, at, k_part = raw.partition("@")
    name_part, k_part = name_part.strip(), k_part.strip()
    if not _NAME.fullmatch(name_part):
        raise GoalError(
            f"{where}: {name_part!r} is not a metric name (letters, digits, '_'; e.g. likes@10)"
        )
    if at:
        if not k_part.isdigit() or int(k_part) < 1:
            raise GoalError(f"{where}: cut-off {k_part!r} after '@' must be a positive integer")
        k = int(k_part)
    else:
        k = int(default_k)
    return MetricRef(_resolve_name(name_part, where, known), k)


def parse_constraint(
    text: str, default_k: int, known: Collection[str] | Mapping[str, str] | None = None
) -> Constraint:
    """``METRIC OP BOUND`` -> :class:`Constraint` (grammar in the module docstring).

    Raises:
        GoalError: quoting the constraint and the bad part.
    """
    where = f"constraint {text.strip()!r}"
    ops = list(_OPERATOR.finditer(text))
    if not ops:
        raise GoalError(f"{where}: no comparison; write METRIC >= BOUND or METRIC <= BOUND")
    if len(ops) > 1:
        raise GoalError(
            f"{where}: more than one comparison ({', '.join(repr(m.group()) for m in ops)}); "
            "give each constraint separately"
        )
    m = ops[0]
    op = m.group()
    if op in ("=>", "=<"):
        raise GoalError(f"{where}: operator {op!r} is spelt {op[::-1]!r}")
    if op not in (">=", "<="):
        raise GoalError(f"{where}: operator {op!r} is not supported; use >= or <=")
    metric = parse_metric(text[: m.start()], default_k, known, where)
    bound = text[m.end() :].strip()
    if not bound:
        raise GoalError(f"{where}: the bound after {op!r} is missing (e.g. -2% or 3.5)")
    relative = bound.endswith("%")
    number = bound[:-1].strip() if relative else bound
    if not _NUMBER.fullmatch(number):
        raise GoalError(
            f"{where}: bound {bound!r} is not a number or a percentage (e.g. -2%, +5%, 3.5)"
        )
    value = float(number) + 0.0  # -0% reads as +0%
    if not math.isfinite(value):
        raise GoalError(f"{where}: bound {bound!r} is not finite")
    return Constraint(metric, op, value, relative, text.strip())  # type: ignore[arg-type]


def parse_goal(
    maximize: str | None,
    minimize: str | None,
    constraints: list[str],
    default_k: int,
    known: Collection[str] | Mapping[str, str] | None = None,
) -> Goal:
    """A :class:`Goal` from the command-line pieces; exactly one of maximize/minimize."""
    if (maximize is None) == (minimize is None):
        raise GoalError("give exactly one of --maximize METRIC or --minimize METRIC")
    direction: Direction = "maximize" if maximize is not None else "minimize"
    text = maximize if maximize is not None else minimize
    assert text is not None
    metric = parse_metric(text, default_k, known, f"--{direction} {text.strip()!r}")
    return Goal(
        direction, metric, tuple(parse_constraint(c, default_k, known) for c in constraints)
    )
