"""Variants of the ranking score: assignment by salted user hash, declaration errors, scoring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ranker.errors import ConfigError
from ranker.scoring import (
    HeadWeight,
    RankingConfig,
    RankingFormula,
    load_ranking_config,
    parse_ranking_config,
)
from ranker.variants import CONTROL, add_variant, assign, assign_one, user_unit
from tests.conftest import RANKING_CONFIG

TASKS = ["click", "watch_time", "like", "rating"]
BASE = RANKING_CONFIG.read_text()


def _ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random user ids over all of int64, small ids and the extremes included."""
    ids = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64, endpoint=True)
    ids[: n // 4] = rng.integers(0, 10 * n, n // 4)  # sequential-looking ids, as most logs have
    ids[:4] = [0, -1, 2**63 - 1, -(2**63)]
    return ids


def test_observed_shares_are_within_binomial_bounds_over_many_random_configs() -> None:
    """Hundreds of random declarations (1-5 variants, shares from 1e-3 up to a full split):
    every arm's observed share of 20k distinct users lies within 5 binomial standard
    deviations of its declared share, and control takes exactly the rest."""
    rng = np.random.default_rng(21)
    n = 20_000
    for case in range(300):
        k = int(rng.integers(1, 6))
        shares = rng.dirichlet(np.ones(k + 1))[:k] * rng.uniform(0.01, 1.0)
        if case % 10 == 0:
            shares = np.full(k, 1.0 / k)  # everyone in a variant: control gets nobody
        shares = [max(float(s), 1e-3) for s in shares]
        ids = np.unique(_ids(rng, n))
        got = assign(ids, f"salt-{case}", shares)
        observed = np.bincount(got + 1, minlength=k + 1) / len(ids)
        expected = np.array([max(0.0, 1 - sum(shares)), *shares])
        sd = np.sqrt(expected * (1 - expected) / len(ids))
        assert np.all(np.abs(observed - expected) <= 5 * sd + 1e-12), (case, shares, observed)


def test_one_user_and_the_vector_agree_and_u_is_uniform() -> None:
    rng = np.random.default_rng(5)
    ids = _ids(rng, 5000)
    shares = [0.2, 0.05, 0.3]
    vec = assign(ids, "exp-7", shares)
    assert [assign_one(int(u), "exp-7", shares) for u in ids] == vec.tolist()
    u = user_unit(_ids(rng, 200_000), "s")
    assert u.min() >= 0 and u.max() < 1
    hist = np.histogram(u, bins=20, range=(0, 1))[0] / len(u)
    assert np.all(np.abs(hist - 0.05) < 5 * np.sqrt(0.05 * 0.95 / len(u)))


def test_a_new_salt_reshuffles_users() -> None:
    """Under two salts a user's arms are independent: P(variant under both) ~ share**2."""
    ids = np.arange(100_000)
    a = assign(ids, "experiment-1", [0.5]) == 0
    b = assign(ids, "experiment-2", [0.5]) == 0
    both = float(np.mean(a & b))
    assert abs(both - 0.25) < 5 * np.sqrt(0.25 * 0.75 / len(ids))
    assert np.array_equal(a, assign(ids, "experiment-1", [0.5]) == 0)


def test_assignment_is_the_same_in_another_process() -> None:
    """No per-process state (Python's str hash is salted per process): a fresh interpreter
    with another PYTHONHASHSEED assigns every user the same arm."""
    ids = list(range(-500, 500)) + [2**63 - 1, -(2**63)]
    code = (
        "import json, sys, numpy as np; from ranker.variants import assign; "
        "ids = json.loads(sys.stdin.read()); "
        "print(json.dumps(assign(np.array(ids, np.int64), 'x', [0.3, 0.3]).tolist()))"
    )
    here = assign(np.array(ids, np.int64), "x", [0.3, 0.3]).tolist()
    for seed in ("1", "2"):
        env = os.environ | {"PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code],
            input=json.dumps(ids),
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        assert json.loads(out.stdout) == here


VARIANT = """
salt = "exp-1"

[heads.click]
weight = 1.0

[heads.like]
weight = 2.0

[[variants]]
name = "clicky"
share = 0.4

[variants.heads.click]
weight = 3.0

[[variants]]
name = "watchy"
share = 0.2
formula = "weighted_product"

[variants.heads.watch_time]
weight = 1.0
transform = "log1p"
"""


def test_variants_score_with_their_own_weights() -> None:
    cfg = parse_ranking_config(VARIANT, "v.toml")
    f = RankingFormula(cfg, TASKS)
    assert f.variant_names == (CONTROL, "clicky", "watchy")
    preds = {
        "click": np.array([0.1, 0.5]),
        "watch_time": np.array([30.0, 5.0]),
        "like": np.array([0.3, 0.0]),
        "rating": np.array([4.0, 3.0]),
    }
    assert np.allclose(f.score(preds), preds["click"] + 2 * preds["like"])
    assert np.allclose(f.score(preds, CONTROL), f.score(preds))
    assert np.allclose(f.score(preds, "clicky"), 3 * preds["click"])
    assert np.allclose(f.score(preds, "watchy"), np.log1p(preds["watch_time"]))
    users = np.arange(2000)
    arms = [f.assign(int(u)) for u in users]
    idx = assign(users, "exp-1", [0.4, 0.2])
    assert arms == [("clicky", "watchy")[i] if i >= 0 else CONTROL for i in idx]


def test_a_config_without_variants_assigns_none_and_keeps_its_version() -> None:
    cfg = load_ranking_config(RANKING_CONFIG)
    f = RankingFormula(cfg, TASKS)
    assert f.assign(7) is None and f.variant_names == ()
    # the version of a config without variants is the hash it had before variants existed
    import hashlib

    old = json.dumps(
        {"formula": cfg.formula, "heads": {k: v.model_dump() for k, v in cfg.heads.items()}},
        separators=(",", ":"),
    )
    assert cfg.version == hashlib.sha256(old.encode()).hexdigest()[:12]
    assert parse_ranking_config(VARIANT, "v").version != cfg.version


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("share = 0.4", "share = 0.9"), r"variants: shares sum to 1\.1 \(clicky 0\.9, watchy"),
        (('name = "watchy"', 'name = "clicky"'), r"variants\.1\.name: duplicate variant name"),
        (('name = "watchy"', 'name = "control"'), r"variants\.1\.name: 'control' is reserved"),
        (("share = 0.2", "share = 0"), r"variants\.1\.share: Input should be greater than 0"),
        (("share = 0.2", "shares = 0.2"), r"variants\.1\.shares: unknown key"),
        (('name = "clicky"', 'name = "a b"'), r"variants\.0\.name: String should match"),
        (("weight = 3.0", "weight = 0.0"), r"variants\.0\.heads: .*non-zero weight"),
        (('salt = "exp-1"', "salt = 3"), r"salt: Input should be a valid string"),
    ],
)
def test_a_bad_declaration_is_one_line_naming_the_key(
    edit: tuple[str, str], message: str, tmp_path: Path
) -> None:
    path = tmp_path / "ranking.toml"
    path.write_text(VARIANT.replace(*edit, 1))
    with pytest.raises(ConfigError, match=message) as e:
        load_ranking_config(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_a_variant_naming_an_unknown_head_is_refused_naming_it() -> None:
    cfg = parse_ranking_config(
        VARIANT.replace("variants.heads.watch_time", "variants.heads.dwell"), "v"
    )
    with pytest.raises(ConfigError, match=r"variant 'watchy' names head\(s\) \['dwell'\]"):
        RankingFormula(cfg, TASKS)


def test_the_training_config_checks_variant_heads(tmp_path: Path) -> None:
    from ranker.config import load_config
    from tests.conftest import DEFAULT_CONFIG

    ok = load_config(
        DEFAULT_CONFIG, ['ranking.variants=[{name="a", share=0.5, heads={click={weight=1.0}}}]']
    )
    assert ok.ranking is not None and ok.ranking.variants[0].name == "a"
    with pytest.raises(
        ConfigError, match=r"ranking\.variants\.0\.heads: unknown head\(s\) \['clik'\]"
    ):
        load_config(
            DEFAULT_CONFIG, ['ranking.variants=[{name="a", share=0.5, heads={clik={weight=1.0}}}]']
        )


def test_add_variant_appends_a_block_that_loads_and_keeps_the_comments(tmp_path: Path) -> None:
    path = tmp_path / "ranking.toml"
    path.write_text(BASE)
    chosen = RankingConfig(
        heads={
            "click": HeadWeight(weight=0.5),
            "watch_time": HeadWeight(weight=0.1, transform="log1p"),
        }
    )
    new = add_variant(path, "tuned", 0.1, chosen, TASKS, ["chosen by a test"])
    assert path.read_text().startswith(BASE.rstrip("\n"))
    loaded = load_ranking_config(path)
    assert loaded == new and loaded.heads == load_ranking_config(RANKING_CONFIG).heads
    assert loaded.arm("tuned") == chosen and loaded.variants[0].share == 0.1
    with pytest.raises(ConfigError, match="'tuned' is already declared"):
        add_variant(path, "tuned", 0.1, chosen, TASKS)
    before = path.read_text()
    with pytest.raises(ConfigError, match=r"variants: shares sum to 1\.05"):
        add_variant(path, "big", 0.95, chosen, TASKS)
    dwell = RankingConfig(heads={"dwell": HeadWeight(weight=1.0)})
    with pytest.raises(ConfigError, match=r"variant 'bad' names head\(s\) \['dwell'\]"):
        add_variant(path, "bad", 0.1, dwell, TASKS)
    assert path.read_text() == before  # a refused variant writes nothing
