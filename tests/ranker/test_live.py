"""Point-in-time counters (ranker/live.py): against a brute-force definition over many random
logs, leakage (nothing at or after t moves a row before t), and serving totals built by events
equal to the offline ones."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ranker.config import CounterSpec, EventSpec, LiveConfig
from ranker.live import (
    Events,
    PointInTime,
    Totals,
    VideoAttributes,
    combine_keys,
    concat_events,
    decay_tau,
    event_index,
    make_events,
)

LIVE = LiveConfig(
    events=[EventSpec(name="click", column="click"), EventSpec(name="watch", column="w")],
    counters=[
        CounterSpec(name="user", keys=["user"], events=["click", "watch"], since_last=True),
        CounterSpec(name="user_tab", keys=["user", "context:tab"], events=["click"]),
        CounterSpec(name="video", keys=["video"], events=["watch"]),
        CounterSpec(name="author", keys=["video:author"], events=["click"]),
        CounterSpec(name="recent", keys=["user"], events=["click", "watch"], half_life_s=4.0),
        CounterSpec(name="tag", keys=["video:tag"], events=["click", "watch"], separator=","),
        CounterSpec(
            name="user_tag",
            keys=["user", "video:tag"],
            events=["click"],
            separator=",",
            since_last=True,
            half_life_s=3.0,
        ),
    ],
)
N_VIDEOS = 12
# Videos 0..9 have authors 0..3 and 0..3 tags of 0..4 (video 3 none); 10 and 11 are not in the
# table (no author or tag counter).
TAGS = {0: [0], 1: [1, 2], 2: [2, 0, 4], 3: [], 4: [4], 5: [1, 3], 6: [0, 1, 2], 7: [3], 8: [2, 4]}
TAGS[9] = [1]
ATTRS = VideoAttributes(
    np.arange(10)[::-1],  # not in id order: the constructor sorts, values follow their video
    {"author": (np.arange(10) % 4)[::-1]},
    {
        "tag": (
            np.r_[0, np.cumsum([len(TAGS[v]) for v in range(9, -1, -1)])],
            np.asarray([t for v in range(9, -1, -1) for t in TAGS[v]], np.int64),
        )
    },
)


def random_log(rng: np.random.Generator, n: int) -> Events:
    """Few users, videos and distinct times, so ties (same entity, same time) are common."""
    times = rng.integers(0, max(2, n // 3), n).astype(np.float64)
    return _events(
        times,
        rng.integers(0, 4, n),
        rng.integers(0, N_VIDEOS, n),
        rng.integers(0, 3, n),
        np.ones(n),
        np.c_[rng.integers(0, 2, n), rng.exponential(10, n) * (rng.random(n) < 0.7)],
    )


def _events(
    times: np.ndarray,
    users: np.ndarray,
    videos: np.ndarray,
    tabs: np.ndarray,
    impressions: np.ndarray,
    values: np.ndarray,
) -> Events:
    return make_events(
        LIVE, times, users, videos, {"context:tab": tabs}, impressions, values, ATTRS
    )


def entities(spec: CounterSpec, ev: Events, i: int) -> list[tuple[int, ...]]:
    """The entities row ``i`` counts for, from the tables by hand: one per combination of
    its key values (a video's tags are several; an unknown author or video none)."""
    video = int(ev.keys["video"][i])
    options: list[list[int]] = []
    for k in spec.keys:
        if k == "video:tag":
            options.append(TAGS.get(video, []))
        elif k == "video:author":
            options.append([video % 4] if video < 10 else [])
        else:
            options.append([int(ev.keys[k][i])])
    return list(itertools.product(*options))


def brute_force(spec: CounterSpec, ev: Events) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The definition, row by row: per entity of the row, sums over rows of that entity at
    strictly earlier times; added over the row's entities (its video's tags)."""
    idx = event_index(LIVE, spec)
    tau = decay_tau(spec, 1.0)
    n = len(ev)
    ents = [set(entities(spec, ev, i)) for i in range(n)]
    imp, sums, last = np.zeros(n), np.zeros((n, len(idx))), np.full(n, np.nan)
    for i in range(n):
        w = np.ones(n) if tau is None else np.exp(-(ev.times[i] - ev.times) / tau)
        for e in ents[i]:
            before = np.array([e in ents[j] for j in range(n)]) & (ev.times < ev.times[i])
            imp[i] += (ev.impressions * w)[before].sum()
            sums[i] += (ev.values[:, idx] * w[:, None])[before].sum(0)
            if before.any():
                last[i] = np.fmax(last[i], ev.times[before].max())
    return imp, sums, last


@pytest.mark.parametrize("case", range(300))
def test_point_in_time_matches_the_definition(case: int) -> None:
    rng = np.random.default_rng(case)
    ev = random_log(rng, int(rng.integers(1, 60)))
    for spec in LIVE.counters:
        got = PointInTime(spec, event_index(LIVE, spec), ev).at(ev, ev.times)
        imp, sums, last = brute_force(spec, ev)
        np.testing.assert_allclose(got.impressions, imp)
        np.testing.assert_allclose(got.sums, sums, rtol=1e-12, atol=1e-9)
        np.testing.assert_array_equal(np.isnan(got.last_time), np.isnan(last))
        np.testing.assert_allclose(got.last_time[~np.isnan(last)], last[~np.isnan(last)])


def _with_rows_from(ev: Events, t: float, rng: np.random.Generator) -> Events:
    """The same log with every row at or after ``t`` changed (labels, entities) and more added."""
    late = ev.times >= t
    other = random_log(rng, len(ev) + 20)
    other.times = t + np.abs(other.times)  # all at or after t, some exactly at t
    head = slice(None, len(ev))
    tail = slice(len(ev), None)

    def mixed(k: str) -> np.ndarray:
        return np.r_[np.where(late, other.keys[k][head], ev.keys[k]), other.keys[k][tail]]

    vals = np.where(late[:, None], other.values[head], ev.values)
    return _events(
        np.r_[ev.times, other.times[tail]],
        mixed("user"),
        mixed("video"),
        mixed("context:tab"),
        np.r_[ev.impressions, other.impressions[tail]],
        np.r_[vals, other.values[tail]],
    )


@pytest.mark.parametrize("case", range(200))
def test_changing_rows_from_t_on_changes_no_earlier_feature(case: int) -> None:
    rng = np.random.default_rng(10_000 + case)
    ev = random_log(rng, int(rng.integers(2, 80)))
    t = float(rng.choice(ev.times))
    changed = _with_rows_from(ev, t, rng)
    early = np.flatnonzero(ev.times < t)
    for spec in LIVE.counters:
        idx = event_index(LIVE, spec)
        a = PointInTime(spec, idx, ev).at(ev, ev.times)
        b = PointInTime(spec, idx, changed).at(changed, changed.times)
        np.testing.assert_array_equal(a.impressions[early], b.impressions[early])
        np.testing.assert_array_equal(a.sums[early], b.sums[early])
        np.testing.assert_array_equal(a.last_time[early], b.last_time[early])


@pytest.mark.parametrize("case", range(100))
def test_events_in_batches_reach_the_offline_totals(case: int) -> None:
    """Serving state: totals after a prefix of the log, then the rest as separate impression and
    label events in random batches, equal the totals of the whole log."""
    rng = np.random.default_rng(20_000 + case)
    ev = random_log(rng, int(rng.integers(1, 80)))
    cut = int(rng.integers(0, len(ev) + 1))
    for spec in LIVE.counters:
        idx = event_index(LIVE, spec)
        head = _take(ev, np.arange(cut))
        tot = PointInTime(spec, idx, head).totals() if cut else _no_totals(spec, idx)
        rest = np.arange(cut, len(ev))
        # Each remaining row as one impression event and one event per label, shuffled.
        pieces = [_take(ev, rest, impressions_only=True)] + [
            _take(ev, rest, only_value=j) for j in range(ev.values.shape[1])
        ]
        for p in pieces:
            for chunk in np.array_split(rng.permutation(len(p)), int(rng.integers(1, 4))):
                tot.add(_take(p, chunk), idx)
        want = PointInTime(spec, idx, ev).totals()
        np.testing.assert_array_equal(tot.keys, want.keys)
        now = np.full(len(want.keys), ev.times.max() + rng.uniform(0, 5))
        ok = np.ones(len(want.keys), bool)
        got, ref = tot.current(want.keys, ok, now), want.current(want.keys, ok, now)
        np.testing.assert_allclose(got.impressions, ref.impressions, rtol=1e-12)
        np.testing.assert_allclose(got.sums, ref.sums, rtol=1e-12, atol=1e-9)
        np.testing.assert_array_equal(got.last_time, ref.last_time)


def _no_totals(spec: CounterSpec, idx: list[int]) -> Totals:
    e = np.zeros(0)
    return Totals(
        spec, np.zeros(0, np.int64), e, np.zeros((0, len(idx))), e, e, decay_tau(spec, 1.0)
    )


def _take(
    ev: Events, rows: np.ndarray, impressions_only: bool = False, only_value: int | None = None
) -> Events:
    imp = ev.impressions[rows]
    vals = ev.values[rows].copy()
    if impressions_only:
        vals[:] = 0.0
    if only_value is not None:
        imp = np.zeros_like(imp)
        keep = np.zeros(vals.shape[1], bool)
        keep[only_value] = True
        vals[:, ~keep] = 0.0
    k = {name: ev.keys[name][rows] for name in ("user", "video", "context:tab")}
    return _events(ev.times[rows], k["user"], k["video"], k["context:tab"], imp, vals)


def test_combined_keys_separate_entities() -> None:
    a = np.arange(1000)
    assert len(np.unique(combine_keys([a, np.zeros(1000, np.int64)]))) == 1000
    k1 = combine_keys([np.array([1, 2]), np.array([2, 1])])
    assert k1[0] != k1[1]  # (user 1, tab 2) is not (user 2, tab 1)


@pytest.mark.parametrize(
    ("counter", "message"),
    [
        ({"keys": ["context:tab"]}, "not a declared context feature"),
        ({"keys": ["author"]}, "is not user, video"),
        ({"keys": ["user"], "events": ["share"]}, "unknown event(s) ['share']"),
        ({"keys": ["user", "user"]}, "repeated"),
    ],
)
def test_bad_counters_are_refused_naming_the_key(counter: dict, message: str) -> None:
    from ranker.config import parse_config
    from ranker.errors import ConfigError

    data = {
        "data": {"log": "x", "users": "u", "videos": "v"},
        "features": [{"name": "hour", "source": "context", "kind": "categorical"}],
        "tasks": [{"name": "click", "kind": "binary", "label": "c", "loss": "bce"}],
        "live": {
            "events": [{"name": "click", "column": "c"}],
            "counters": [{"name": "c1"} | counter],
        },
    }
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert message in str(e.value)
    assert "live" in str(e.value)


def test_a_counter_keyed_on_a_string_column_stops_naming_it(tiny_world) -> None:  # noqa: ANN001
    """The world's `device` is a string: counters key on integers, and the job says which
    column is not one instead of hashing or crashing."""
    from ranker.config import parse_config
    from ranker.errors import DataError
    from ranker.live import OfflineCounters

    config = parse_config(
        {
            "data": {
                "log": str(tiny_world / "log"),
                "users": str(tiny_world / "users.parquet"),
                "videos": str(tiny_world / "videos.parquet"),
            },
            "features": [{"name": "device", "source": "context", "kind": "categorical"}],
            "tasks": [{"name": "click", "kind": "binary", "label": "click", "loss": "bce"}],
            "live": {
                "events": [{"name": "click", "column": "click"}],
                "counters": [{"name": "d", "keys": ["user", "context:device"]}],
            },
        }
    )
    with pytest.raises(DataError, match=r"column 'device'.*integers"):
        OfflineCounters(config, [tiny_world / "log"])


@pytest.mark.parametrize("case", range(200))
def test_session_index_finds_each_rows_session_start(case: int) -> None:
    from ranker.live import SessionIndex
    from ranker.metrics import sessions

    rng = np.random.default_rng(30_000 + case)
    n = int(rng.integers(1, 80))
    users = rng.integers(0, 5, n)
    times = rng.integers(0, 40, n).astype(np.float64)
    gap = float(rng.choice([1.0, 3.0, 10.0]))
    sid = sessions(users, times, gap)
    want = np.array([times[sid == sid[i]].min() for i in range(n)])
    np.testing.assert_array_equal(SessionIndex(users, times, gap).start(users, times), want)


@pytest.mark.parametrize("case", range(100))
def test_an_impression_decayed_to_nothing_is_still_the_last_impression(case: int) -> None:
    """Labels first (moving a decayed counter's reference time far ahead), then impressions
    thousands of half-lives older: each is still the entity's latest impression, as offline."""
    rng = np.random.default_rng(30_000 + case)
    ev = random_log(rng, int(rng.integers(2, 60)))
    ev.times = np.round(rng.uniform(0, 1e5, len(ev)))
    spec = CounterSpec(name="fast", keys=["user"], events=["click"], half_life_s=0.5)
    live = LiveConfig(events=LIVE.events, counters=[spec])
    idx = event_index(live, spec)
    rows = rng.permutation(len(ev))
    labels = _take(ev, rows, only_value=0)
    labels.times = labels.times + rng.uniform(1e3, 1e5)  # later than every impression
    shown = _take(ev, rows, impressions_only=True)
    tot = _no_totals(spec, idx)
    tot.add(labels, idx)
    tot.add(shown, idx)
    want = PointInTime(spec, idx, concat_events([labels, shown])).totals()
    ok = np.ones(len(want.keys), bool)
    now = np.full(len(want.keys), labels.times.max())
    np.testing.assert_array_equal(
        tot.current(want.keys, ok, now).last_time, want.current(want.keys, ok, now).last_time
    )


def test_videos_table_key_columns_read_as_single_or_multi_valued(tmp_path) -> None:  # noqa: ANN001
    """Integer, string and list columns; a separator splits a string into values, trimmed,
    repeats and empty pieces dropped; a decimal string keys as the integer; null is no value."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ranker.live import token_keys

    path = tmp_path / "videos.parquet"
    table = pa.table(
        {
            "video_id": [30, 10, 20, 40],
            "author": [3, 1, None, 4],
            "kind": ["long", "short", None, "long"],
            "tag": ["7, music,7", "", None, "music,,8"],
            "ids": pa.array([[5, 5, 6], [], None, [6]], pa.list_(pa.int32())),
        }
    )
    pq.write_table(table, path)
    cols = {"author": None, "kind": None, "tag": ",", "ids": None}
    a = VideoAttributes.from_parquet(path, "video_id", cols)
    q = np.array([10, 20, 30, 40, 99])
    author, ok = a.lookup("author", q)
    assert ok.tolist() == [True, False, True, True, False]
    assert author[ok].tolist() == [1, 3, 4]
    kind, ok = a.lookup("kind", q)
    assert ok.tolist() == [True, False, True, True, False]
    assert kind[2] == kind[3] != kind[0]
    music = int(token_keys(["music"])[0])
    row, tag = a.lookup_multi("tag", q)
    assert list(zip(row.tolist(), tag.tolist(), strict=True)) == sorted(
        [(2, 7), (2, music), (3, music), (3, 8)]
    )
    row, ids = a.lookup_multi("ids", q)
    assert row.tolist() == [2, 2, 3] and ids.tolist() == [5, 6, 6]
    assert token_keys(["17", "-3", "x"])[:2].tolist() == [17, -3]


def test_a_multi_valued_key_of_floats_stops_naming_the_column(tmp_path) -> None:  # noqa: ANN001
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ranker.errors import DataError

    path = tmp_path / "videos.parquet"
    pq.write_table(
        pa.table({"video_id": [1], "w": pa.array([[0.5]], pa.list_(pa.float64()))}), path
    )
    with pytest.raises(DataError, match=r"column 'w'.*integers or strings"):
        VideoAttributes.from_parquet(path, "video_id", {"w": None})


@pytest.mark.parametrize(
    ("counters", "message"),
    [
        ([{"name": "t", "keys": ["user"], "separator": ","}], "exactly one video:<column>"),
        (
            [
                {"name": "t", "keys": ["video:tag"], "separator": ","},
                {"name": "u", "keys": ["user", "video:tag"]},
            ],
            "one column, one separator",
        ),
    ],
)
def test_a_separator_needs_one_video_column_split_one_way(counters: list, message: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        LiveConfig(events=[EventSpec(name="click", column="c")], counters=counters)


def test_a_counter_on_a_multi_valued_feature_column_must_split_it() -> None:
    """The features declare ``tag`` split by ','; a counter on ``video:tag`` without the
    separator would count each combination of tags as one entity: refused, naming the fix."""
    from ranker.config import parse_config
    from ranker.errors import ConfigError

    def config(counter: dict) -> dict:
        return {
            "data": {"log": "x", "users": "u", "videos": "v"},
            "features": [
                {"name": "tag", "source": "video", "kind": "categorical", "separator": ","}
            ],
            "tasks": [{"name": "click", "kind": "binary", "label": "c", "loss": "bce"}],
            "live": {"events": [{"name": "click", "column": "c"}], "counters": [counter]},
        }

    with pytest.raises(ConfigError, match=r"set separator = ','"):
        parse_config(config({"name": "t", "keys": ["video:tag"]}))
    parse_config(config({"name": "t", "keys": ["video:tag"], "separator": ","}))
