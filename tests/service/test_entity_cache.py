"""service/entity_cache.py: exact rows back, copies not views, bounded, repeats harmless."""

from __future__ import annotations

import numpy as np

from ranker.features import Encoded
from service.entity_cache import EntityCache


def _rows(ids: list[int]) -> Encoded:
    a = np.asarray(ids, np.int64)
    return Encoded(np.stack([a, a * 10], 1), (a.astype(np.float32) / 2)[:, None])


def _cache(capacity: int) -> EntityCache:
    return EntityCache(Encoded(np.zeros((1, 2), np.int64), np.zeros((1, 1), np.float32)), capacity)


def test_found_rows_are_the_added_rows_in_the_asked_order() -> None:
    c = _cache(100)
    c.add(np.array([5, 3, 9]), _rows([5, 3, 9]), np.array([False, True, False]))
    found, rows, missing = c.find(np.array([9, 4, 5, 3]))
    assert found.tolist() == [True, False, True, True]
    np.testing.assert_array_equal(rows.cat, _rows([9, 5, 3]).cat)
    np.testing.assert_array_equal(rows.num, _rows([9, 5, 3]).num)
    assert missing.tolist() == [False, False, True]
    assert (c.hits, c.misses, len(c)) == (3, 1, 3)


def test_found_rows_are_copies_that_later_adds_cannot_change() -> None:
    c = _cache(4)
    c.add(np.array([1, 2]), _rows([1, 2]), np.zeros(2, bool))
    _, rows, _ = c.find(np.array([1, 2]))
    c.add(np.array([7, 8, 6]), _rows([7, 8, 6]), np.zeros(3, bool))  # over capacity: starts over
    np.testing.assert_array_equal(rows.cat, _rows([1, 2]).cat)
    assert c.find(np.array([1]))[0].tolist() == [False]
    assert len(c) == 3


def test_an_id_added_twice_keeps_its_newest_row_and_others_stay_intact() -> None:
    c = _cache(100)
    c.add(np.array([1, 2]), _rows([1, 2]), np.zeros(2, bool))
    c.add(np.array([1]), _rows([11]), np.zeros(1, bool))
    c.add(np.array([3]), _rows([3]), np.zeros(1, bool))
    _, rows, _ = c.find(np.array([1, 2, 3]))
    np.testing.assert_array_equal(rows.cat, _rows([11, 2, 3]).cat)


def test_capacity_zero_keeps_nothing_and_growth_keeps_everything() -> None:
    off = _cache(0)
    off.add(np.array([1]), _rows([1]), np.zeros(1, bool))
    assert len(off) == 0 and not off.find(np.array([1]))[0].any()
    big = _cache(10_000)
    for start in range(0, 5000, 500):  # grows its arrays several times
        ids = np.arange(start, start + 500)
        big.add(ids, _rows(ids.tolist()), ids % 7 == 0)
    ids = np.arange(4999, -1, -13)
    found, rows, missing = big.find(ids)
    assert found.all()
    np.testing.assert_array_equal(rows.cat, _rows(ids.tolist()).cat)
    np.testing.assert_array_equal(missing, ids % 7 == 0)


def test_a_reloaded_model_gets_fresh_caches_of_the_same_size(tiny_artifact) -> None:  # noqa: ANN001
    """Cached rows are encoded with one model's encoder: a new model must not read them, and
    must not lose the cache either."""
    from ranker.artifact import load_artifact
    from service.redis_store import RedisStore
    from service.reload import store_for
    from service.settings import Settings

    settings = Settings(
        artifact=tiny_artifact, redis_url="redis://127.0.0.1:1/0", feature_cache_entries=1234
    )
    a = load_artifact(tiny_artifact)
    old = RedisStore.from_settings(settings, a.encoder)  # connects lazily: nothing runs here
    new = store_for(load_artifact(tiny_artifact), old, settings)
    assert isinstance(new, RedisStore)
    assert new.cache_entries == old.cache_entries == 1234
    assert new is not old and new._versions == {} and new.client is old.client
