"""The goal grammar of `ranker tune`: what it accepts and how it names what it refuses."""

import numpy as np
import pytest

from training.goal import GoalError, MetricRef, parse_constraint, parse_goal, parse_metric

KNOWN = {"likes": "likes", "like": "likes", "watch_time": "watch_time", "rating": "rating"}


@pytest.mark.parametrize(
    ("text", "metric", "op", "value", "relative"),
    [
        ("likes@10>=-2%", MetricRef("likes", 10), ">=", -2.0, True),
        ("  watch_time@10 >= +5 % ", MetricRef("watch_time", 10), ">=", 5.0, True),
        ("rating@5<=4.5", MetricRef("rating", 5), "<=", 4.5, False),
        ("likes >= 0.3", MetricRef("likes", 7), ">=", 0.3, False),  # @k defaults
        ("like@3>=1e-1", MetricRef("likes", 3), ">=", 0.1, False),  # alias
        ("likes@10>=-0%", MetricRef("likes", 10), ">=", 0.0, True),
    ],
)
def test_good_constraints_parse(
    text: str, metric: MetricRef, op: str, value: float, relative: bool
) -> None:
    c = parse_constraint(text, 7, KNOWN)
    assert (c.metric, c.op, c.value, c.relative) == (metric, op, value, relative)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("likes@10=>-2%", r"operator '=>' is spelt '>='"),
        ("likes@10>-2%", r"operator '>' is not supported; use >= or <="),
        ("likes@10==3", r"operator '==' is not supported"),
        ("likes@10>=-2x", r"bound '-2x' is not a number or a percentage"),
        ("likes@10>=1e999", r"bound '1e999' is not finite"),
        ("lieks@10>=1", r"unknown metric 'lieks'; known metrics: likes, rating, watch_time"),
        ("likes@0>=1", r"cut-off '0' after '@' must be a positive integer"),
        ("likes@ten>=1", r"cut-off 'ten'"),
        ("like s@10>=1", r"'like s' is not a metric name"),
        (">=1", r"the metric is missing"),
        ("likes@10>=", r"the bound after '>=' is missing"),
        ("likes@10", r"no comparison"),
        ("likes@10>=1<=2", r"more than one comparison \('>=', '<='\)"),
    ],
)
def test_bad_constraints_name_the_bad_part(text: str, message: str) -> None:
    with pytest.raises(GoalError, match=message) as e:
        parse_constraint(text, 10, KNOWN)
    assert repr(text.strip()) in str(e.value)  # the whole expression is quoted too


def test_relative_bounds_mean_worse_by_that_share_also_for_negative_values() -> None:
    c = parse_constraint("likes@10>=-2%", 10)
    assert c.bound(50.0) == pytest.approx(49.0)
    assert c.bound(-50.0) == pytest.approx(-51.0)
    assert c.satisfied(np.array([48.9, 49.0, 60.0]), 50.0).tolist() == [False, True, True]
    assert parse_constraint("rating@10<=4", 10).bound(3.0) == 4.0


def test_goal_needs_exactly_one_direction() -> None:
    with pytest.raises(GoalError, match="exactly one of --maximize"):
        parse_goal("likes@10", "rating@10", [], 10)
    with pytest.raises(GoalError, match="exactly one of --maximize"):
        parse_goal(None, None, [], 10)
    g = parse_goal(None, "rating", ["likes@5>=-1%"], 10, KNOWN)
    assert g.direction == "minimize" and g.metric == MetricRef("rating", 10)
    assert [str(m) for m in g.metrics] == ["rating@10", "likes@5"]
    with pytest.raises(GoalError, match=r"--maximize 'watch time@10'"):
        parse_goal("watch time@10", None, [], 10)


def test_metric_without_check_keeps_any_name() -> None:
    assert parse_metric("anything@4", 10) == MetricRef("anything", 4)
