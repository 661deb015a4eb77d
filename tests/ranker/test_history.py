"""The history feature: strictly before each row (ties are not "before"), equal to the row-by-row
definition, the serving state equal to the offline engine however events arrive, padding that
never reaches the output, and every engine scoring a model that has one."""

from __future__ import annotations

import tomllib
from typing import Any

import numpy as np
import pytest
import torch

from ranker.backends import build_scorer
from ranker.config import ModelConfig, _apply_override, parse_config
from ranker.history import HistoryIndex, HistoryState
from ranker.model import RankingModel
from ranker.modules import HistoryPooling
from tests.conftest import DEFAULT_CONFIG


def random_log(rng: np.random.Generator, n: int | None = None) -> tuple[np.ndarray, ...]:
    """Users, integer times full of ties, videos (repeats too), engaged flags."""
    n = int(rng.integers(0, 80)) if n is None else n
    users = rng.integers(0, 6, n).astype(np.int64)
    times = rng.integers(0, 15, n).astype(np.float64)
    videos = rng.integers(-5, 25, n).astype(np.int64)
    engaged = rng.random(n) < 0.5
    return users, times, videos, engaged


def brute(users, times, videos, engaged, qu, qt, length) -> list[list[int]]:  # noqa: ANN001
    """The definition, row by row: the user's engaged videos at times strictly before the
    query's, ordered by (time, video), most recent first, the first ``length``."""
    out = []
    for u, t in zip(qu.tolist(), qt.tolist(), strict=True):
        past = [
            (times[i], videos[i])
            for i in range(len(users))
            if engaged[i] and users[i] == u and times[i] < t
        ]
        out.append([int(v) for _, v in sorted(past, reverse=True)[:length]])
    return out


def as_lists(recent: Any) -> list[list[int]]:
    return [r[ok].tolist() for r, ok in zip(recent.videos, recent.ok, strict=True)]


def test_history_equals_the_row_by_row_definition_on_random_logs_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        users, times, videos, engaged = random_log(rng)
        length = int(rng.integers(1, 6))
        idx = HistoryIndex(length, users[engaged], times[engaged], videos[engaged])
        qu = np.r_[users, rng.integers(-1, 7, 20)]  # the log's rows, and unknown users
        qt = np.r_[times, rng.integers(-1, 17, 20).astype(np.float64)]
        got = as_lists(idx.before(qu, qt))
        assert got == brute(users, times, videos, engaged, qu, qt, length)


def test_changing_every_row_from_t_on_changes_no_earlier_rows_history() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        users, times, videos, engaged = random_log(rng, int(rng.integers(2, 80)))
        t_star = float(rng.integers(1, 15))
        later = times >= t_star
        # Everything from t on changes: engagement, videos, users; rows added, some exactly at t.
        u2, v2, e2 = users.copy(), videos.copy(), engaged.copy()
        u2[later] = rng.integers(0, 6, int(later.sum()))
        v2[later] = rng.integers(-5, 25, int(later.sum()))
        e2[later] = rng.random(int(later.sum())) < 0.7
        k = int(rng.integers(1, 10))
        u2 = np.r_[u2, rng.integers(0, 6, k)]
        t2 = np.r_[times, t_star + rng.integers(0, 3, k)]
        v2 = np.r_[v2, rng.integers(-5, 25, k)]
        e2 = np.r_[e2, np.ones(k, bool)]
        a = HistoryIndex(4, users[engaged], times[engaged], videos[engaged])
        b = HistoryIndex(4, u2[e2], t2[e2], v2[e2])
        early = ~later
        ra, rb = a.before(users[early], times[early]), b.before(users[early], times[early])
        np.testing.assert_array_equal(ra.videos, rb.videos)
        np.testing.assert_array_equal(ra.ok, rb.ok)
        # and the rows at t do see what changed before t only: nothing, so they match too
        at = times == t_star
        np.testing.assert_array_equal(
            a.before(users[at], times[at]).videos, b.before(users[at], times[at]).videos
        )


def test_serving_state_fed_events_in_random_batches_equals_the_offline_engine() -> None:
    rng = np.random.default_rng(2)
    for _ in range(100):
        users, times, videos, engaged = random_log(rng)
        length = int(rng.integers(1, 6))
        cut = rng.random(len(users)) < 0.4  # the "training log" the state starts from
        start = HistoryIndex(
            length, users[cut & engaged], times[cut & engaged], videos[cut & engaged]
        )
        state = HistoryState.from_index(start)
        rest = np.flatnonzero(~cut & engaged)
        rng.shuffle(rest)  # out of order, in random batches
        for part in np.array_split(rest, int(rng.integers(1, 5))):
            state.add(users[part], times[part], videos[part])
        full = HistoryIndex(length, users[engaged], times[engaged], videos[engaged])
        q = np.arange(-1, 7)
        want = full.before(q, np.full(len(q), np.inf))
        got = state.current(q)
        assert as_lists(got) == as_lists(want)
        np.testing.assert_array_equal(got.times[got.ok], want.times[want.ok])


def pooling_cases(rng: np.random.Generator, pooling: str, n: int = 200) -> None:
    torch.manual_seed(int(rng.integers(1 << 30)))
    d, length = int(rng.integers(2, 9)), int(rng.integers(1, 12))
    pool = HistoryPooling(d, pooling, [int(rng.integers(1, 17))]).eval()
    scale = float(10.0 ** rng.uniform(-3, 3))  # ill-conditioned inputs too
    h = torch.randn(n, length, d) * scale
    mask = torch.rand(n, length) < rng.uniform(0, 1)
    target = torch.randn(n, d) * scale
    with torch.no_grad():
        out = pool(h, mask, target)
        # padding holding anything, NaN and huge values included, changes nothing, bit for bit
        junk = torch.where(mask.unsqueeze(-1), h, torch.full_like(h, float("nan")))
        assert torch.equal(pool(junk, mask, target), out)
        junk = torch.where(mask.unsqueeze(-1), h, torch.full_like(h, 1e30))
        assert torch.equal(pool(junk, mask, target), out)
        # an empty history is the learned vector, exactly
        empty = ~mask.any(1)
        assert torch.equal(out[empty], pool.empty.expand(int(empty.sum()), d))
        # more padding slots (a longer history) change nothing but the sum's rounding
        longer = pool(torch.cat([h, h], 1), torch.cat([mask, torch.zeros_like(mask)], 1), target)
        torch.testing.assert_close(longer, out, rtol=1e-5, atol=1e-5 * float(out.abs().max()))


def shared_cases(rng: np.random.Generator, pooling: str) -> None:
    """One request: the shared path (one history row for every candidate) against the per-row
    path given that row repeated, and padding junk that must not reach it."""
    torch.manual_seed(int(rng.integers(1 << 30)))
    d, length, b = int(rng.integers(1, 9)), int(rng.integers(1, 25)), int(rng.integers(1, 300))
    hidden = [int(rng.integers(1, 33))] + ([4] if rng.random() < 0.3 else [])
    pool = HistoryPooling(d, pooling, hidden).eval()
    scale = float(10.0 ** rng.uniform(-3, 3))  # ill-conditioned inputs too
    h = torch.randn(1, length, d) * scale
    mask = torch.rand(1, length) < rng.uniform(0, 1)
    target = torch.randn(b, d) * float(10.0 ** rng.uniform(-3, 3))
    with torch.no_grad():
        want = pool(h.expand(b, -1, -1), mask.expand(b, -1), target)
        got = pool(h, mask, target, shared=True)
        assert got.shape == want.shape == (b, d)
        big = float(want.abs().max()) if want.numel() else 1.0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * big + 1e-6)
        junk = torch.where(mask.unsqueeze(-1), h, torch.full_like(h, float("nan")))
        assert torch.equal(pool(junk, mask, target, shared=True), got)


@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_one_requests_shared_history_pools_as_the_per_row_path(pooling: str) -> None:
    rng = np.random.default_rng(8)
    for _ in range(300):
        shared_cases(rng, pooling)


@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_padding_never_reaches_the_output_and_empty_uses_the_learned_vector(pooling: str) -> None:
    rng = np.random.default_rng(3)
    for _ in range(300):
        pooling_cases(rng, pooling)


def model_with_history(pooling: str, arch: str = "mmoe", side: bool = False) -> RankingModel:
    cfg = ModelConfig(
        architecture=arch, embedding_dim=4, num_experts=2, expert_hidden=[16], tower_hidden=[8]
    )
    spec = parse_config(history_config({"engaged": "click", "length": 6, "pooling": pooling}))
    assert spec.live is not None
    # features: user id, video id, category; 2 numerics (multi-valued features are left out:
    # the ONNX export pools them differently from eager, with or without a history)
    model = RankingModel(
        [10, 40, 7], 2, ["click", "watch"], cfg,
        history=spec.live.history, history_feature=1, history_side=[2] if side else [],
    ).eval()  # fmt: skip
    if side:  # video code v is in category v % 7 (code 0, padding, in none)
        model.set_history_side(torch.arange(40)[None, :] % 7)
    return model


def random_rows(rng: np.random.Generator, n: int, same_history: bool) -> tuple[np.ndarray, ...]:
    cat = np.c_[
        rng.integers(0, 10, (n, 1)), rng.integers(0, 40, (n, 1)), rng.integers(0, 7, (n, 1))
    ]
    hist = rng.integers(0, 40, (1 if same_history else n, 6)) * (rng.random((1, 6)) < 0.7)
    hist = np.repeat(hist, n, 0) if same_history else hist
    num = rng.normal(size=(n, 2)).astype(np.float32)
    return np.c_[cat, hist].astype(np.int64), num


@pytest.mark.parametrize("arch", ["mmoe", "ple", "shared_bottom", "cross_stitch", "omoe"])
def test_every_architecture_reads_the_history(arch: str) -> None:
    rng = np.random.default_rng(4)
    model = model_with_history("attention", arch)
    cat, num = random_rows(rng, 64, same_history=False)
    with torch.no_grad():
        a = model(torch.from_numpy(cat), torch.from_numpy(num))
        other = cat.copy()
        other[:, -6:] = rng.integers(1, 40, (64, 6))
        b = model(torch.from_numpy(other), torch.from_numpy(num))
    assert not torch.equal(a["click"], b["click"])  # the history moves the scores


@pytest.mark.parametrize("pooling", ["attention", "mean"])
@pytest.mark.parametrize("side", [False, True])
def test_every_engine_scores_a_model_with_history_as_eager_does(pooling: str, side: bool) -> None:
    rng = np.random.default_rng(5)
    model = model_with_history(pooling, side=side)
    split = model.column_split([0], [0, 1])  # the user's columns, as one request shares them
    eager = build_scorer(model, "eager")
    engines = {b: build_scorer(model, b, None, split) for b in ("torchscript", "onnx", "bf16")}
    for i in range(24):
        cat, num = random_rows(rng, int(rng.integers(1, 300)), same_history=True)
        cat[:, 0] = cat[0, 0]
        num[:, :] = num[0]
        if i % 8 == 0:  # an empty history, then a full one: the filled slots set the shapes
            cat[:, 3:] = 0 if i % 16 == 0 else rng.integers(1, 40, 6)
        ref = eager(cat, num)
        for name, score in engines.items():
            got = score(cat, num)
            tol = 2e-2 if name == "bf16" else 1e-5
            for t in ref:
                torch.testing.assert_close(got[t].float(), ref[t].float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_side_features_add_their_rows_to_each_history_video_and_to_the_candidate(
    pooling: str,
) -> None:
    """DIN's behaviour = goods id + category id: the model adds the category's embedding row
    (looked up from its video code table) to every history video and to the candidate."""
    rng = np.random.default_rng(9)
    model = model_with_history(pooling, side=True)
    plain = model_with_history(pooling)
    plain.load_state_dict(model.state_dict(), strict=False)
    table, off = model.embed.table.weight, model.embed.offsets
    for _ in range(50):
        cat, num = random_rows(rng, int(rng.integers(1, 60)), same_history=False)
        c, n = torch.from_numpy(cat), torch.from_numpy(num)
        hist = c[:, 3:]
        with torch.no_grad():
            got = model.embed_input(c, n)[:, -4:]
            h = table[hist + off[1]] + table[hist % 7 + off[2]]
            t = table[c[:, 1] + off[1]] + table[c[:, 2] + off[2]]
            want = model.history(h, hist != 0, t)
            torch.testing.assert_close(got, want)
            # and without side features the category's rows are not there
            assert not torch.allclose(plain.embed_input(c, n)[:, -4:], got)
    with pytest.raises(ValueError, match="history side codes of shape"):
        model.set_history_side(torch.zeros(1, 39, dtype=torch.long))


def test_history_side_config_is_checked() -> None:
    from ranker.errors import ConfigError

    ok = parse_config(history_config({"engaged": "click", "side": ["category"]}))
    assert [f.name for f in ok.history_side_features()] == ["category"]
    for bad, why in [
        (["user_id"], "not a single-valued categorical video feature"),
        (["video_id"], "not a single-valued categorical video feature"),
        (["nope"], "not a single-valued categorical video feature"),
        (["category", "category"], "listed twice"),
    ]:
        with pytest.raises(ConfigError, match=f"live.history.side.*{why}"):
            parse_config(history_config({"engaged": "click", "side": bad}))


def history_config(history: dict[str, Any], **live: Any) -> dict[str, Any]:
    d = tomllib.loads(DEFAULT_CONFIG.read_text())
    d["live"] = {"events": [{"name": "click", "column": "click"}], "history": history} | live
    return d


def test_history_config_is_checked() -> None:
    from ranker.errors import ConfigError

    ok = parse_config(history_config({"engaged": "click"}))
    assert ok.live is not None and ok.live.history is not None
    assert ok.live.history.kind == "history" and ok.live.history.length == 20
    with pytest.raises(ConfigError, match="live.history.engaged"):
        parse_config(history_config({"engaged": "like"}))
    with pytest.raises(ConfigError, match="pooling"):
        parse_config(history_config({"engaged": "click", "pooling": "max"}))
    d = history_config({"engaged": "click"})
    d["features"] = [f for f in d["features"] if f["name"] != "video_id"]
    with pytest.raises(ConfigError, match="live.history: needs a single-valued categorical"):
        parse_config(d)
    d = history_config({"engaged": "click"})
    _apply_override(d, "live.history.length=0")
    with pytest.raises(ConfigError, match="live.history.length"):
        parse_config(d)


def test_the_attention_unit_is_dins_mlp_on_the_concatenation() -> None:
    """The unit's first layer is computed without the concatenation: it must be the same map."""
    rng = np.random.default_rng(6)
    for _ in range(200):
        torch.manual_seed(int(rng.integers(1 << 30)))
        d, length, b = int(rng.integers(1, 9)), int(rng.integers(1, 12)), int(rng.integers(1, 50))
        pool = HistoryPooling(d, "attention", [int(rng.integers(1, 17)), 4]).eval()
        scale = float(10.0 ** rng.uniform(-2, 2))
        h, t = torch.randn(b, length, d) * scale, torch.randn(b, d) * scale
        te = t.unsqueeze(1).expand_as(h)
        assert pool.unit is not None
        want = pool.unit(torch.cat([h, te, h - te, h * te], dim=-1))
        got = pool._attention(h, t)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-6)
