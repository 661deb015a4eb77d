"""Multi-valued categorical features (``separator`` + ``max_values``): encoding and round trips."""

import json

import numpy as np
import pyarrow as pa
import pytest

from ranker.config import FeatureSpec, parse_config
from ranker.errors import ConfigError, DataError
from ranker.features import EncoderFitter, FeatureEncoder
from ranker.tables import FeatureTable

TAG = FeatureSpec(
    name="tag", source="video", kind="categorical", separator=",", max_values=3, min_count=2
)
FEATURES = [
    FeatureSpec(name="video_id", source="video", kind="categorical"),
    TAG,
    FeatureSpec(name="duration", source="video", kind="numeric"),
]


def table() -> pa.Table:
    return pa.table(
        {
            "video_id": pa.array([1, 2, 3, 4], pa.int64()),
            "tag": pa.array(["7,8", "8, 9", None, "7,rare,9,8,7"]),
            "duration": pa.array([1.0, 2.0, 3.0, None]),
        }
    )


def encoder() -> FeatureEncoder:
    f = EncoderFitter(FEATURES)
    f.update(table(), "video", "videos")
    return f.finish()


def test_values_are_counted_one_by_one_and_rare_ones_stay_unknown() -> None:
    enc = encoder()
    assert enc.vocabs["tag"].values.tolist() == ["7", "8", "9"]  # "rare" seen once < min_count
    assert enc.cat_widths == [1, 3] and enc.cardinalities == [5, 4]


def test_multi_valued_column_encodes_known_values_in_order_padded_with_zero() -> None:
    enc = encoder()
    t = pa.table({"video_id": [1], "tag": ["x"], "duration": [1.0]})
    t = pa.concat_tables([table(), t])
    cat = enc.encode(t, "video", "videos").cat  # (5, 1 + 3)
    assert cat[:, 1:].tolist() == [
        [1, 2, 0],
        [2, 3, 0],  # whitespace trimmed
        [0, 0, 0],  # null
        [1, 3, 2],  # unknown "rare" skipped (does not take a slot), repeat of 7 dropped, cut at 3
        [0, 0, 0],  # unknown value only
    ]


def test_feature_table_defaults_cover_every_multi_valued_column() -> None:
    enc = encoder()
    ft = FeatureTable.build(table(), "video_id", enc, "video", "videos")
    rows, missing = ft.lookup(np.array([4, 99], np.int64))
    assert rows.cat.shape == (2, 4) and missing.tolist() == [False, True]
    assert rows.cat[1].tolist() == [0, 0, 0, 0]


def test_encoder_with_multi_valued_feature_round_trips_and_old_state_is_refused() -> None:
    enc = encoder()
    state = json.loads(json.dumps(enc.to_json()))
    again = FeatureEncoder.from_json(state)
    assert np.array_equal(again.encode(table(), "video").cat, enc.encode(table(), "video").cat)
    state["format"] = 1
    for f in state["features"]:
        f.pop("max_values")
    with pytest.raises(DataError, match=r"multi-valued feature\(s\) \['tag'\]"):
        FeatureEncoder.from_json(state)


def test_max_values_without_separator_is_refused_naming_the_feature() -> None:
    base = {
        "data": {"log": "l", "users": "u", "videos": "v"},
        "tasks": [{"name": "click", "kind": "binary", "label": "click", "loss": "bce"}],
    }
    feats = [{"name": "tag", "source": "video", "kind": "categorical", "max_values": 3}]
    with pytest.raises(ConfigError, match=r"features\[0\]: max_values applies"):
        parse_config(base | {"features": feats})
