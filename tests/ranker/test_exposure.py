"""The exposure and event layouts shared by the service's logs and ``ranker build-log``."""

from __future__ import annotations

import pyarrow as pa
import pytest

from ranker.exposure import EVENT_SCHEMA, EXPOSURE_SCHEMA, check_schema


@pytest.mark.parametrize("schema", [EXPOSURE_SCHEMA, EVENT_SCHEMA])
def test_a_file_in_the_layout_passes(schema: pa.Schema) -> None:
    check_schema(schema, schema, "x.parquet")


@pytest.mark.parametrize("schema", [EXPOSURE_SCHEMA, EVENT_SCHEMA])
def test_each_missing_or_mistyped_column_is_named(schema: pa.Schema) -> None:
    for i, f in enumerate(schema):
        with pytest.raises(ValueError, match=f"x.parquet: missing column '{f.name}'"):
            check_schema(schema.remove(i), schema, "x.parquet")
        wrong = pa.binary() if not f.type.equals(pa.binary()) else pa.string()
        with pytest.raises(ValueError, match=f"column '{f.name}' has type binary|{f.name}"):
            check_schema(schema.set(i, pa.field(f.name, wrong)), schema, "x.parquet")
