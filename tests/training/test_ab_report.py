"""``ranker ab-report``: intervals that respect the user as the unit of assignment.

The coverage test simulates many A/A experiments in a world where users differ (each has their
own click rate and number of impressions), so impressions of one user are correlated: a 95%
interval must hold the true difference (zero) in about 95% of them. An interval that treats
impressions as independent covers far less there, which the test also shows (so it can tell a
user-level interval from an impression-level one)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training.ab_report import Z95, ab_report, ratio_ci

ROOT = Path(__file__).resolve().parents[2]


def _users(rng: np.random.Generator, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-user impressions (heavy-tailed) and clicks (each user with an own rate)."""
    n = rng.geometric(1 / 20, size=n_users).astype(np.float64)
    rate = rng.beta(0.5, 4.0, size=n_users)
    return rng.binomial(n.astype(np.int64), rate).astype(np.float64), n


def test_delta_interval_covers_clustered_aa_differences() -> None:
    rng = np.random.default_rng(0)
    sims, covered, naive_covered = 600, 0, 0
    for _ in range(sims):
        ya, na = _users(rng, 300)
        yb, nb = _users(rng, 300)
        ra, va = ratio_ci(ya, na)
        rb, vb = ratio_ci(yb, nb)
        covered += abs(ra - rb) <= Z95 * math.sqrt(va + vb)
        # Impressions as independent Bernoulli trials: the interval a per-row analysis gives.
        naive = ra * (1 - ra) / na.sum() + rb * (1 - rb) / nb.sum()
        naive_covered += abs(ra - rb) <= Z95 * math.sqrt(naive)
    # 600 runs: the binomial sd of the coverage at 0.95 is 0.009.
    assert 0.92 <= covered / sims <= 0.975, covered / sims
    assert naive_covered / sims < 0.85, naive_covered / sims


def test_delta_variance_matches_a_cluster_bootstrap() -> None:
    """Over many random groups (small ones, skewed ones, near-zero rates included) the delta
    variance and a vectorised cluster bootstrap over users agree within the bootstrap's own
    noise."""
    rng = np.random.default_rng(1)
    ratios = []
    for case in range(150):
        users = int(rng.integers(30, 400))
        n = rng.geometric(1 / rng.uniform(2, 40), size=users).astype(np.float64)
        rate = rng.beta(rng.uniform(0.05, 2), rng.uniform(1, 50), size=users)
        y = rng.binomial(n.astype(np.int64), rate).astype(np.float64)
        if case % 5 == 0:
            y = y * rng.exponential(60.0, size=users)  # watch seconds: a continuous metric
        if y.sum() == 0:
            continue
        _, var = ratio_ci(y, n)
        w = rng.multinomial(users, np.full(users, 1 / users), size=400).astype(np.float64)
        boot = (w @ y) / (w @ n)
        ratios.append(var / boot.var())
    ratios = np.asarray(ratios)
    assert len(ratios) > 120
    assert 0.9 < np.median(ratios) < 1.1, np.median(ratios)
    assert np.quantile(ratios, 0.05) > 0.6 and np.quantile(ratios, 0.95) < 1.5


@pytest.fixture(scope="module")
def joined(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A joined log with two variants; treatment users click twice as often."""
    rng = np.random.default_rng(2)
    rows = []
    for variant, users, lift in (
        ("control", range(0, 400), 1.0),
        ("treatment", range(400, 800), 2.0),
    ):
        for u in users:
            k = int(rng.integers(1, 30))
            p = min(0.9, rng.beta(1, 12) * lift)
            click = (rng.random(k) < p).astype(np.int64)
            rows.append(
                pa.table(
                    {
                        "user_id": np.full(k, u, np.int64),
                        "click": click,
                        "watch_time": click * rng.exponential(100.0, k),
                        "like": click * (rng.random(k) < 0.2),
                        "variant": [variant] * k,
                    }
                )
            )
    d = tmp_path_factory.mktemp("joined")
    t = pa.concat_tables(rows)
    pq.write_table(t, d / "part-00000.parquet")
    return d


def test_report_per_variant(joined: Path) -> None:
    t = pq.read_table(joined)
    r = ab_report(joined)
    assert r["control"] == "control" and r["users_in_several_groups"] == 0
    c, tr = r["groups"]["control"], r["groups"]["treatment"]
    assert c["users"] == tr["users"] == 400
    assert c["impressions"] + tr["impressions"] == t.num_rows
    ctl = t.filter(pa.compute.equal(t.column("variant"), "control"))
    assert c["metrics"]["click_rate"]["value"] == pytest.approx(
        ctl.column("click").to_numpy().mean()
    )
    m = tr["metrics"]["click_rate"]
    lo, hi = m["diff_ci95"]
    assert lo > 0 and m["diff"] > 0  # a doubled click rate is found
    assert m["ci95"][0] < m["value"] < m["ci95"][1]
    assert set(tr["metrics"]) == {
        "click_rate",
        "watch_seconds_per_impression",
        "likes_per_impression",
    }
    assert "diff" not in c["metrics"]["click_rate"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "ranker", *args], capture_output=True, text=True, env=env, cwd=ROOT
    )


def test_cli_table_json_and_errors(joined: Path, tmp_path: Path) -> None:
    p = _cli("ab-report", "--log", str(joined))
    assert p.returncode == 0, p.stderr
    assert "treatment" in p.stdout and "click_rate" in p.stdout and "95%" in p.stdout
    p = _cli("ab-report", "--log", str(joined), "--json", "--control", "treatment")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert (
        r["control"] == "treatment" and r["groups"]["control"]["metrics"]["click_rate"]["diff"] < 0
    )
    p = _cli("ab-report", "--log", str(joined), "--by", "device")
    assert p.returncode == 2 and "missing column 'device'" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    p = _cli("ab-report", "--log", str(joined), "--control", "nope")
    assert p.returncode == 2 and "'nope'" in p.stderr
