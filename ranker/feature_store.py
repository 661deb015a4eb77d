"""The Redis feature-store layout: key names and packed records, shared by the push job and the
service so that both sides read and write one format (see ``docs/feature-store.md``).

Redis holds *raw* feature values, not encoded rows: any model trained on the same tables reads
them through its own encoder, so a new model needs no new push. Every entity is one string value,
a fixed-width little-endian record (one field per column in the column's own width, strings as
an int32 index into the version's string table, then a validity bitmap), so a batch of records
decodes with one ``np.frombuffer`` over their concatenation.

Keys (``P`` is the prefix, ``N`` a version number: ``{P}:seq`` plus one, and at least the Unix
time in seconds, so numbers stay unique even across a flushed or restored Redis)::

    {P}:current       the version the service reads (one atomic SET switches it)
    {P}:previous      the version before it, kept for rollback
    {P}:versions      ZSET of every version written (score = push time), for clean-up
    {P}:seq           version counter
    {P}:lock          held by the push job while it writes (token, expires unless refreshed)
    P:N:meta          JSON: format, created, per source its key column, rows and record layout
    P:N:u:<user_id>   packed user record
    P:N:v:<video_id>  packed video record

The fixed keys carry the hash tag ``{P}``: on a Redis Cluster they share one hash slot, so the
switch (``MULTI SET current SET previous EXEC``) and the rollback's ``MGET current previous``
stay single-slot commands. Records carry no tag: they spread over every slot and node, and a
reader fetches them per node (``service/redis_store.py``). On a single node the braces are
just characters.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ranker.config import Source
from ranker.errors import DataError, StoreError

FORMAT = 1
DEFAULT_PREFIX = "ranker:fs"
PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]+$")  # no glob characters: SCAN MATCH uses it
ENTITY_TAG: dict[str, str] = {"user": "u", "video": "v"}
MAX_STRINGS = 1_000_000  # per string column and version: the table travels in the meta key


VERSIONED = re.compile(
    r"^(\d+):(?:meta|[uv]:-?\d+)$"
)  # what follows the prefix in a version's keys


def check_prefix(prefix: str) -> str:
    """The prefix, if it is safe inside keys and SCAN patterns; raises otherwise."""
    if not PREFIX_PATTERN.match(prefix):
        raise StoreError(f"feature store prefix {prefix!r}: use letters, digits and _ . : - only")
    return prefix


@dataclass(frozen=True)
class Keys:
    """Key names of one prefix (one feature store; several may share a Redis database)."""

    prefix: str = DEFAULT_PREFIX

    @property
    def tag(self) -> str:
        """The hash tag of the fixed keys: one Redis Cluster slot holds them all."""
        return f"{{{self.prefix}}}"

    @property
    def current(self) -> str:
        return f"{self.tag}:current"

    @property
    def previous(self) -> str:
        return f"{self.tag}:previous"

    @property
    def versions(self) -> str:
        return f"{self.tag}:versions"

    @property
    def seq(self) -> str:
        return f"{self.tag}:seq"

    @property
    def lock(self) -> str:
        return f"{self.tag}:lock"

    def meta(self, version: str) -> str:
        return f"{self.prefix}:{version}:meta"

    def entity(self, version: str, source: Source) -> str:
        """Key prefix of one source's records in a version; append the decimal id."""
        return f"{self.prefix}:{version}:{ENTITY_TAG[source]}:"

    def scan_pattern(self) -> str:
        """SCAN pattern covering every key of this prefix (filter with :meth:`version_of`)."""
        return f"{self.prefix}:*"

    def version_of(self, key: str) -> str | None:
        """The version a record or meta key belongs to; None for the fixed keys and for keys of
        another prefix that happens to start with this one (``ranker:fs:7`` inside ``ranker:fs``)."""
        if not key.startswith(self.prefix + ":"):
            return None
        m = VERSIONED.match(key[len(self.prefix) + 1 :])
        return m.group(1) if m else None


CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def cluster_url(url: str, cluster: bool = False) -> tuple[str, bool]:
    """``(url for redis-py, whether it names a Redis Cluster)``.

    A cluster is named by the scheme (``redis+cluster://host:port``, ``rediss+cluster://``
    for TLS; any node, the client discovers the rest) or by ``cluster`` (the setting
    ``RANKER_REDIS_CLUSTER=1`` with a plain ``redis://`` URL). redis-py's cluster client takes
    the plain scheme, so the ``+cluster`` is removed."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() in CLUSTER_SCHEMES:
        return f"{CLUSTER_SCHEMES[scheme.lower()]}://{rest}", True
    return url, cluster


def redact(url: str) -> str:
    """A Redis URL fit for logs and responses: the password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo.split(':', 1)[0]}:***@{hostport}"))


@dataclass
class Column:
    """One packed column: its Arrow type (restored on read) and its numpy field type."""

    name: str
    arrow_type: str  # e.g. "int64", "float32", "bool", "string"
    dtype: str  # little-endian numpy type of the field; "<i4" (string table index) for strings
    strings: list[str] | None = None  # the string table of a string column

    @property
    def is_string(self) -> bool:
        return self.strings is not None


def _packable(name: str, col: pa.ChunkedArray) -> tuple[pa.Array, Column] | None:
    """The column as one array and its packed form, or None for types the store does not pack."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    t = arr.type
    if pa.types.is_dictionary(t):
        arr, t = arr.cast(t.value_type), t.value_type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        dtype = np.dtype(t.to_pandas_dtype()).newbyteorder("<")
        return arr, Column(name, str(t), dtype.str)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return arr, Column(name, str(t), "<i4", [])
    return None


@dataclass
class RecordLayout:
    """The packed record of one source in one version.

    Record = the columns' fields in order, then ``ceil(C / 8)`` bytes of validity bitmap (bit
    ``i`` set: column ``i`` is not null; least significant bit first, as Arrow's bitmaps).
    The key column is not packed: it is the key.
    """

    source: Source
    key: str
    rows: int
    columns: list[Column]
    skipped: list[str] = field(default_factory=list)  # columns of types the store does not pack
    _dictionaries: dict[str, pa.Array] = field(default_factory=dict, repr=False)

    @property
    def dtype(self) -> np.dtype:
        """Structured, unaligned: ``itemsize`` is exactly the record's length in bytes."""
        fields = [(f"c{i}", c.dtype) for i, c in enumerate(self.columns)]
        fields.append(("valid", "u1", (max(1, (len(self.columns) + 7) // 8),)))
        return np.dtype(fields)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @classmethod
    def pack(
        cls, table: pa.Table, key: str, source: Source, origin: str
    ) -> tuple[RecordLayout, np.ndarray, np.ndarray]:
        """Packs a table: ``(layout, ids (n,) int64, records (n,) structured)``.

        Duplicate ids keep their last row (as :class:`ranker.tables.FeatureTable` does), so the
        store and the in-process tables answer alike.
        """
        from ranker.tables import as_int64_ids

        if key not in table.schema.names:
            raise DataError(
                f"{origin}: key column {key!r} is missing; columns are {table.schema.names}"
            )
        ids = as_int64_ids(table.column(key), f"{origin} column {key!r}")
        order = np.argsort(ids, kind="stable")
        last = np.r_[ids[order][1:] != ids[order][:-1], True] if len(ids) else np.ones(0, bool)
        keep = np.sort(order[last])
        table, ids = table.take(pa.array(keep)), ids[keep]

        arrays: list[pa.Array] = []
        columns: list[Column] = []
        skipped: list[str] = []
        for name in table.schema.names:
            if name == key:
                continue
            packed = _packable(name, table.column(name))
            if packed is None:
                skipped.append(name)
                continue
            arrays.append(packed[0])
            columns.append(packed[1])
        layout = cls(source, key, len(ids), columns, skipped)
        records = np.zeros(len(ids), layout.dtype)
        valid = np.zeros((len(ids), len(columns)), bool)
        for i, (arr, c) in enumerate(zip(arrays, columns, strict=True)):
            valid[:, i] = ~np.asarray(arr.is_null(), dtype=bool)
            if c.is_string:
                enc = pc.dictionary_encode(arr)
                c.strings = enc.dictionary.to_pylist()
                if len(c.strings) > MAX_STRINGS:
                    raise DataError(
                        f"{origin}: string column {c.name!r} has {len(c.strings):,} distinct "
                        f"values, more than the store's string table holds ({MAX_STRINGS:,}); "
                        f"store it as integer ids"
                    )
                values = np.asarray(enc.indices.fill_null(0), dtype=np.int32)
            else:
                filler = False if pa.types.is_boolean(arr.type) else 0
                values = np.asarray(arr.fill_null(filler).to_numpy(zero_copy_only=False))
            records[f"c{i}"] = values
        if columns:
            records["valid"] = np.packbits(valid, axis=1, bitorder="little")
        return layout, ids, records

    def to_arrow(self, records: np.ndarray, wanted: list[str]) -> dict[str, pa.Array]:
        """The ``wanted`` columns of decoded ``records (n,)`` as Arrow arrays with their original
        types and nulls; columns this version lacks are left out (see :meth:`lacking`)."""
        index = {c.name: i for i, c in enumerate(self.columns)}
        valid = np.unpackbits(
            records["valid"], axis=1, count=len(self.columns), bitorder="little"
        ).astype(bool)
        out: dict[str, pa.Array] = {}
        for name in wanted:
            i = index.get(name)
            if i is None:
                continue
            c = self.columns[i]
            values, null = records[f"c{i}"], ~valid[:, i]
            if c.is_string:
                out[name] = self._dictionary(c).take(pa.array(values, mask=null))
            else:
                out[name] = pa.array(values, type=pa.type_for_alias(c.arrow_type), mask=null)
        return out

    def lacking(self, wanted: list[str]) -> list[str]:
        """The ``wanted`` columns this version does not hold (the key column is always held)."""
        have = {c.name for c in self.columns} | {self.key}
        return [n for n in wanted if n not in have]

    def _dictionary(self, c: Column) -> pa.Array:
        d = self._dictionaries.get(c.name)
        if d is None:
            d = self._dictionaries[c.name] = pa.array(c.strings, pa.type_for_alias(c.arrow_type))
        return d

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "key": self.key,
            "rows": self.rows,
            "record_bytes": self.dtype.itemsize,
            "columns": [
                {"name": c.name, "arrow_type": c.arrow_type, "dtype": c.dtype}
                | ({"strings": c.strings} if c.is_string else {})
                for c in self.columns
            ],
            "skipped": self.skipped,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RecordLayout:
        layout = cls(
            d["source"],
            d["key"],
            int(d["rows"]),
            [
                Column(c["name"], c["arrow_type"], c["dtype"], c.get("strings"))
                for c in d["columns"]
            ],
            list(d.get("skipped", [])),
        )
        if layout.dtype.itemsize != d["record_bytes"]:
            raise StoreError(
                f"{layout.source} record layout says {d['record_bytes']} bytes, its columns make "
                f"{layout.dtype.itemsize}"
            )
        return layout


@dataclass
class VersionMeta:
    """What ``P:N:meta`` holds: enough to decode the version's records without the tables."""

    version: str
    created: str
    layouts: dict[str, RecordLayout]  # source -> layout

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "version": self.version,
                "created": self.created,
                "sources": {s: lay.to_json() for s, lay in self.layouts.items()},
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str, where: str) -> VersionMeta:
        try:
            d = json.loads(raw)
            if d.get("format") != FORMAT:
                raise StoreError(
                    f"{where}: feature store format {d.get('format')!r}, this code reads {FORMAT}"
                )
            return cls(
                str(d["version"]),
                str(d["created"]),
                {s: RecordLayout.from_json(v) for s, v in d["sources"].items()},
            )
        except StoreError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise StoreError(f"{where}: unreadable: {type(e).__name__}: {e}") from None
