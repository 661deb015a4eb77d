import json

import numpy as np
import pyarrow as pa
import pytest

from ranker.config import FeatureSpec
from ranker.errors import DataError
from ranker.features import EncoderFitter, FeatureEncoder, Vocabulary
from ranker.tables import FeatureTable

FEATURES = [
    FeatureSpec(name="video_id", source="video", kind="categorical", min_count=2),
    FeatureSpec(name="category", source="video", kind="categorical"),
    FeatureSpec(name="duration_s", source="video", kind="numeric", transform="log1p"),
    FeatureSpec(name="device", source="context", kind="categorical"),
    FeatureSpec(name="tags", source="video", kind="categorical", separator=","),
]


def videos() -> pa.Table:
    return pa.table(
        {
            "video_id": pa.array([10, 11, 12, 13], pa.int64()),
            "category": pa.array([1, 2, None, 1], pa.int64()),
            "duration_s": pa.array([10.0, 100.0, None, 1000.0]),
            "tags": pa.array(["a,b", "b", None, "c,b"]),
        }
    )


def fitted() -> FeatureEncoder:
    f = EncoderFitter(FEATURES)
    f.update(videos(), "video", "videos", weights=np.array([3, 1, 5, 2]))
    f.update(pa.table({"device": ["ios", "web", "ios", None]}), "context", "log")
    return f.finish()


def test_min_count_counts_weighted_rows_and_rare_ids_share_the_unknown_bucket() -> None:
    enc = fitted()
    assert enc.vocabs["video_id"].values.tolist() == [10, 12, 13]  # 11 has 1 impression < 2
    codes = enc.vocabs["video_id"].lookup(pa.array([10, 11, 12, 99, None], pa.int64()))
    assert codes.tolist() == [1, 0, 2, 0, 0]


def test_string_vocabulary_and_nulls() -> None:
    enc = fitted()
    assert enc.vocabs["device"].lookup(pa.array(["web", "ios", "tv", None])).tolist() == [
        2,
        1,
        0,
        0,
    ]


def test_numeric_is_standardised_after_log1p_and_null_becomes_the_mean() -> None:
    enc = fitted()
    out = enc.encode(videos(), "video", "videos")
    x = np.log1p([10.0, 100.0, 1000.0])
    expected = (x - x.mean()) / x.std()
    assert np.allclose(out.num[[0, 1, 3], 0], expected, atol=1e-5)
    assert out.num[2, 0] == 0.0


def test_encoder_json_round_trip_encodes_identically() -> None:
    enc = fitted()
    again = FeatureEncoder.from_json(json.loads(json.dumps(enc.to_json())))
    a, b = enc.encode(videos(), "video"), again.encode(videos(), "video")
    assert np.array_equal(a.cat, b.cat) and np.array_equal(a.num, b.num)
    assert again.cardinalities == enc.cardinalities


def test_missing_column_names_column_and_file() -> None:
    enc = fitted()
    with pytest.raises(DataError, match=r"videos.parquet: column 'duration_s'"):
        enc.encode(videos().drop(["duration_s"]), "video", "videos.parquet")


def test_feature_table_lookup_gives_defaults_for_unknown_ids() -> None:
    enc = fitted()
    table = FeatureTable.build(videos(), "video_id", enc, "video", "videos")
    rows, missing = table.lookup(np.array([13, 99, 10], np.int64))
    assert missing.tolist() == [False, True, False]
    direct = enc.encode(videos(), "video")
    assert np.array_equal(rows.cat[0], direct.cat[3]) and np.array_equal(rows.cat[2], direct.cat[0])
    assert (rows.cat[1] == 0).all() and (rows.num[1] == 0).all()


def test_duplicate_keys_keep_the_last_row() -> None:
    enc = fitted()
    t = pa.table(
        {"video_id": [10, 10], "category": [1, 2], "duration_s": [1.0, 2.0], "tags": ["a", "b"]}
    )
    table = FeatureTable.build(t, "video_id", enc, "video", "videos")
    rows, _ = table.lookup(np.array([10], np.int64))
    assert rows.cat[0, 1] == enc.vocabs["category"].lookup(pa.array([2]))[0]


def test_integer_lookup_agrees_with_a_dict_for_numpy_and_arrow_inputs() -> None:
    """The numpy fast path (no Arrow round trip) and the Arrow path give the dict's codes, over
    random vocabularies with extreme and negative ids, unknown ids and (Arrow only) nulls."""
    rng = np.random.default_rng(11)
    big = np.iinfo(np.int64)
    for _ in range(300):
        pool = np.r_[rng.integers(-50, 50, 40), big.min, big.max, big.max - 1, big.min + 1]
        values = np.unique(rng.choice(pool, int(rng.integers(1, 30))))
        vocab = Vocabulary(values.astype(np.int64))
        ids = rng.choice(pool, int(rng.integers(0, 60))).astype(np.int64)
        code = {int(v): i + 1 for i, v in enumerate(values.tolist())}
        want = np.array([code.get(int(i), 0) for i in ids.tolist()], np.int64)
        got = vocab.lookup(ids)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want)
        small = (ids > -(2**31)) & (ids < 2**31)  # an int32 array takes the numpy path too
        np.testing.assert_array_equal(vocab.lookup(ids[small].astype(np.int32)), want[small])
        nulls = rng.random(len(ids)) < 0.2
        arrow = pa.array(ids, mask=nulls)
        np.testing.assert_array_equal(vocab.lookup(arrow), np.where(nulls, 0, want))
