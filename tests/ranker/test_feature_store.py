"""The feature-store record layout: packing and unpacking restore every value, type and null."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from ranker.errors import StoreError
from ranker.feature_store import Keys, RecordLayout, VersionMeta, redact


def _table() -> pa.Table:
    return pa.table(
        {
            "id": pa.array([3, 1, 2, 1], pa.int64()),  # id 1 twice: the last row wins
            "i64": pa.array([10, None, -(2**62), 7], pa.int64()),
            "i32": pa.array([1, 2, None, 4], pa.int32()),
            "u8": pa.array([255, 0, 1, None], pa.uint8()),
            "f32": pa.array([0.1, None, float("nan"), 2.5], pa.float32()),
            "f64": pa.array([1e300, -0.0, None, 3.25], pa.float64()),
            "flag": pa.array([True, None, False, True]),
            "s": pa.array(["a", None, "b", "é"], pa.string()),
            "ls": pa.array(["x", "y", None, "x"], pa.large_string()),
            "d": pa.array(["p", "q", "p", None]).dictionary_encode(),
            "when": pa.array([1, 2, 3, 4], pa.timestamp("s")),  # not packable: skipped
        }
    )


def test_records_round_trip_every_type_and_null() -> None:
    table = _table()
    layout, ids, records = RecordLayout.pack(table, "id", "video", "t")
    assert layout.skipped == ["when"]
    assert sorted(ids.tolist()) == [1, 2, 3]
    # Through bytes, as Redis stores them: one record per entity, concatenated on read.
    size = layout.dtype.itemsize
    buf = records.tobytes()
    assert len(buf) == len(ids) * size
    meta = VersionMeta.from_json(VersionMeta("1", "now", {"video": layout}).to_json(), "m")
    back = meta.layouts["video"]
    decoded = back.to_arrow(np.frombuffer(buf, back.dtype), back.names)
    expected = table.take(pa.array([0, 2, 3])).drop_columns(["id", "when"])  # ids 3, 2, 1(last)
    for name in back.names:
        want = expected.column(name).combine_chunks()
        if pa.types.is_dictionary(want.type):
            want = want.cast(want.type.value_type)
        got = decoded[name]
        assert got.type == want.type, name
        assert got.is_null().to_pylist() == want.is_null().to_pylist(), name
        if pa.types.is_floating(want.type):
            np.testing.assert_array_equal(
                got.to_numpy(zero_copy_only=False), want.to_numpy(zero_copy_only=False)
            )
        else:
            assert got.to_pylist() == want.to_pylist(), name


def test_record_is_compact() -> None:
    layout, _, _ = RecordLayout.pack(_table(), "id", "video", "t")
    # 8+4+1+4+8+1 bytes of numbers, 4+4+4 of string indices, 2 bytes of bitmap for 9 columns.
    assert layout.dtype.itemsize == 40


def test_meta_with_a_wrong_record_size_is_refused() -> None:
    layout, _, _ = RecordLayout.pack(_table(), "id", "video", "t")
    raw = (
        VersionMeta("1", "now", {"video": layout})
        .to_json()
        .replace('"record_bytes": 40', '"record_bytes": 41')
    )
    with pytest.raises(StoreError, match="41 bytes"):
        VersionMeta.from_json(raw, "k")
    with pytest.raises(StoreError, match="format"):
        VersionMeta.from_json('{"format": 99}', "k")
    with pytest.raises(StoreError, match="unreadable"):
        VersionMeta.from_json("{not json", "k")


def test_version_of_ignores_fixed_keys_and_other_prefixes() -> None:
    k = Keys("ranker:fs")
    assert k.version_of("ranker:fs:7:meta") == "7"
    assert k.version_of("ranker:fs:7:v:-3") == "7"
    assert k.version_of("ranker:fs:current") is None
    assert k.version_of("ranker:fs:7:current") is None  # prefix ranker:fs:7's pointer
    assert k.version_of("ranker:fsx:7:meta") is None


def test_redact_hides_the_password() -> None:
    assert redact("redis://:p@ss@host:6379/2") == "redis://:***@host:6379/2"
    assert redact("rediss://user:pw@host/0") == "rediss://user:***@host/0"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"
