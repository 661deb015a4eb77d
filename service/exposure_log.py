"""The service's exposure and event logs: what it showed and what users did, as Parquet files.

The next model trains on what this service showed (``ranker build-log`` joins the two logs,
docs/experiments.md), so every answered ``POST /v1/rank`` writes one row per returned candidate
(:data:`ranker.exposure.EXPOSURE_SCHEMA`) and every accepted ``POST /v1/events`` event one row
(:data:`ranker.exposure.EVENT_SCHEMA`). Logged impressions are what unbiased learning-to-rank
needs to model position (Joachims et al., "Unbiased Learning-to-Rank with Biased Feedback",
WSDM 2017): the position each video was shown at, and with which model and ranking config.

Nothing of it runs on the request path beyond one ``put_nowait`` of a small record holding
references to the arrays the rank path already has. A background thread per log takes records
off a bounded queue, builds Arrow columns from whole arrays (no per-row Python: per record at
most a few calls, per row none) and keeps the tables in memory until the file rotates, by rows,
by in-memory bytes or by age. A file is written under a hidden temporary name (``.NAME.tmp``,
which Arrow's dataset discovery skips) and renamed when complete, so a reader never sees part
of one. Names sort by time and are unique across worker processes:
``exposures-20261206T030755.123456Z-p4242-000001.parquet`` (the time its first row arrived,
UTC; the process id; a sequence number).

A full queue drops the record and counts its rows (``ranker_exposure_dropped_rows_total``):
a request is never held up by logging. The lifespan's shutdown (which uvicorn runs on SIGTERM,
after draining the requests in flight: service/shutdown.py) writes what is pending. A process
killed with SIGKILL loses at most one rotation period of rows.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from ranker.errors import ConfigError
from ranker.exposure import EVENT_SCHEMA, EXPOSURE_SCHEMA
from service.live_state import EventBatch

log = logging.getLogger("ranker.service.exposure")

BATCH_RECORDS = 1024  # records taken off the queue per Arrow table (one build, many requests)
CLOSE_TIMEOUT_S = 30.0  # shutdown waits this long for the writer thread to write what is pending
_STOP = object()


class Count(Protocol):
    """A Prometheus counter child (``inc``), or anything that counts the same way."""

    def inc(self, amount: float = 1) -> None: ...


@dataclass(frozen=True)
class Rotation:
    """When a file is complete: whichever limit its pending rows reach first."""

    rows: int
    bytes: int  # Arrow's in-memory size of the pending rows, a bound on the writer's memory
    seconds: float  # since the file's first row arrived


@dataclass(slots=True)
class Exposure:
    """One answered rank request, as references: the columns are built by the writer thread."""

    request_id: str
    time: float
    user_id: int
    context: Mapping[str, Any]
    video_ids: np.ndarray  # (k,) in the order shown
    scores: np.ndarray  # (k,)
    predictions: Mapping[str, np.ndarray]  # head -> (k,)
    model_version: str
    ranking_version: str
    variant: str | None
    degraded: bool

    @property
    def rows(self) -> int:
        return len(self.video_ids)


@dataclass(slots=True)
class Events:
    """Accepted feedback events of one ``POST /v1/events`` body, as columns."""

    event_ids: list[str]
    request_ids: list[str | None]
    user_ids: np.ndarray  # (n,) int64
    video_ids: np.ndarray  # (n,) int64
    types: list[str]
    times: np.ndarray  # (n,) float64, the log's time unit
    values: np.ndarray  # (n,) float64
    received: float  # server clock, Unix seconds

    @property
    def rows(self) -> int:
        return len(self.event_ids)

    @classmethod
    def accepted(
        cls, batch: EventBatch, request_ids: Sequence[str | None], fresh: np.ndarray
    ) -> Events:
        """The ``fresh`` (accepted, not duplicate) events of ``batch``, received now."""
        keep = np.flatnonzero(fresh).tolist()
        return cls(
            [batch.ids[i] for i in keep],
            [request_ids[i] for i in keep],
            batch.users[fresh],
            batch.videos[fresh],
            [batch.types[i] for i in keep],
            batch.times[fresh],
            batch.values[fresh],
            time.time(),
        )


def _per_request(values: Sequence[Any], type_: pa.DataType, take: pa.Array) -> pa.Array:
    """One value per record, repeated to one per row by Arrow (``take``), not by Python."""
    return pa.array(values, type_).take(take)


def exposure_table(records: Sequence[Exposure]) -> pa.Table:
    """The rows of ``records`` in :data:`EXPOSURE_SCHEMA`: whole-array numpy and Arrow
    operations, a few per record, none per row."""
    counts = np.fromiter((r.rows for r in records), np.int64, len(records))
    n = int(counts.sum())
    which = pa.array(np.repeat(np.arange(len(records)), counts))
    starts = np.cumsum(counts) - counts
    position = (np.arange(n) - np.repeat(starts, counts)).astype(np.int32)
    # Predictions: a map per row. Heads may change with a reload, so per record: its head names
    # (indices into one list of names) tiled over its rows, its values row-major.
    names: dict[str, int] = {}
    key_index, items, widths = [], [], []
    for r in records:
        heads = list(r.predictions)
        idx = np.asarray([names.setdefault(h, len(names)) for h in heads], np.int64)
        key_index.append(np.tile(idx, r.rows))
        values = [np.asarray(r.predictions[h], np.float32) for h in heads]
        items.append(np.stack(values, axis=1).ravel() if heads else np.zeros(0, np.float32))
        widths.append(len(heads))
    lengths = np.repeat(np.asarray(widths, np.int64), counts)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    keys = pa.array(list(names), pa.string()).take(pa.array(np.concatenate(key_index)))
    predictions = pa.MapArray.from_arrays(
        pa.array(offsets),
        keys,
        pa.array(np.concatenate(items), pa.float32()),
        type=EXPOSURE_SCHEMA.field("predictions").type,
    )
    columns = [
        _per_request([r.request_id for r in records], pa.string(), which),
        _per_request([r.time for r in records], pa.float64(), which),
        _per_request([r.user_id for r in records], pa.int64(), which),
        pa.array(np.concatenate([r.video_ids for r in records]).astype(np.int64, copy=False)),
        pa.array(position),
        pa.array(np.concatenate([r.scores for r in records]).astype(np.float32, copy=False)),
        predictions,
        _per_request([orjson.dumps(r.context).decode() for r in records], pa.string(), which),
        _per_request([r.model_version for r in records], pa.string(), which),
        _per_request([r.ranking_version for r in records], pa.string(), which),
        _per_request([r.variant for r in records], pa.string(), which),
        _per_request([r.degraded for r in records], pa.bool_(), which),
    ]
    return pa.Table.from_arrays(columns, schema=EXPOSURE_SCHEMA)


def event_table(records: Sequence[Events]) -> pa.Table:
    """The rows of ``records`` in :data:`EVENT_SCHEMA`."""
    counts = np.fromiter((r.rows for r in records), np.int64, len(records))
    columns = [
        pa.array([e for r in records for e in r.event_ids], pa.string()),
        pa.array([e for r in records for e in r.request_ids], pa.string()),
        pa.array(np.concatenate([r.user_ids for r in records]).astype(np.int64, copy=False)),
        pa.array(np.concatenate([r.video_ids for r in records]).astype(np.int64, copy=False)),
        pa.array([t for r in records for t in r.types], pa.string()),
        pa.array(np.concatenate([r.times for r in records]).astype(np.float64, copy=False)),
        pa.array(np.concatenate([r.values for r in records]).astype(np.float64, copy=False)),
        pa.array(np.repeat([r.received for r in records], counts).astype(np.float64)),
    ]
    return pa.Table.from_arrays(columns, schema=EVENT_SCHEMA)


class ParquetLog:
    """One log directory: a bounded queue in, rotated Parquet files out, one writer thread."""

    def __init__(
        self,
        directory: Path,
        name: str,
        build: Callable[[Sequence[Any]], pa.Table],
        rotation: Rotation,
        queue_size: int,
        dropped: Count,
        written: Count,
        failed: Count,
    ) -> None:
        self.directory = directory
        self.name = name
        self.build = build
        self.rotation = rotation
        self.dropped, self.written, self.failed = dropped, written, failed
        self.queue: queue.Queue[Any] = queue.Queue(queue_size)
        self.closed = False
        self.files = 0
        self._thread = threading.Thread(target=self._run, name=f"{name}-log", daemon=True)
        self._thread.start()

    def put(self, record: Exposure | Events) -> bool:
        """Queues ``record``; a full queue (or a closed log) drops it and counts its rows."""
        if not self.closed:
            try:
                self.queue.put_nowait(record)
                return True
            except queue.Full:
                pass
        self.dropped.inc(record.rows)
        return False

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Writes what is queued and pending, then ends the thread (blocks: call it off the
        event loop)."""
        if self.closed:
            return
        self.closed = True
        try:
            self.queue.put(_STOP, timeout=timeout)
        except queue.Full:
            log.error(
                "%s log: the writer took nothing for %g s; pending rows lost", self.name, timeout
            )
            return
        self._thread.join(timeout)

    # --- the writer thread ------------------------------------------------------------------

    def _run(self) -> None:
        tables: list[pa.Table] = []
        rows = nbytes = 0
        opened = opened_wall = 0.0
        stop = False
        while not stop:
            timeout = None
            if tables:
                timeout = max(opened + self.rotation.seconds - time.monotonic(), 0.0)
            batch: list[Any] = []
            try:
                batch.append(self.queue.get(timeout=timeout))
                while len(batch) < BATCH_RECORDS:
                    batch.append(self.queue.get_nowait())
            except queue.Empty:
                pass
            if batch and batch[-1] is _STOP:
                stop = True
                batch.pop()
            table = self._build(batch) if batch else None
            if table is not None:
                if not tables:
                    opened, opened_wall = time.monotonic(), time.time()
                tables.append(table)
                rows += table.num_rows
                nbytes += table.nbytes
            due = time.monotonic() - opened >= self.rotation.seconds
            full = rows >= self.rotation.rows or nbytes >= self.rotation.bytes
            if tables and (stop or due or full):
                self._write(pa.concat_tables(tables), opened_wall)
                tables, rows, nbytes = [], 0, 0

    def _build(self, batch: list[Any]) -> pa.Table | None:
        try:
            return self.build(batch)
        except Exception:  # noqa: BLE001 - a bug here must not end the logging
            log.exception("%s log: building rows failed", self.name)
            self.failed.inc()
            return None

    def _write(self, table: pa.Table, opened_wall: float) -> None:
        self.files += 1
        stamp = datetime.fromtimestamp(opened_wall, UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        name = f"{self.name}-{stamp}-p{os.getpid()}-{self.files:06d}.parquet"
        tmp = self.directory / f".{name}.tmp"
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, self.directory / name)
        except Exception:  # noqa: BLE001 - a full disk loses this file, not the service
            log.exception("%s log: writing %s failed; %d rows lost", self.name, name, len(table))
            self.failed.inc()
            tmp.unlink(missing_ok=True)
            return
        self.written.inc(table.num_rows)


class RecentIds:
    """The last ``limit`` event ids this process accepted, for idempotence of the event log
    when no live counters (which remember ids themselves) serve: a retry of a batch within the
    last ``limit`` events is not logged twice; an older one, or one sent to another worker, is."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: set[str] = set()
        self.order: deque[str] = deque()

    def fresh(self, ids: Sequence[str]) -> np.ndarray:
        """Which of ``ids`` were not seen before (nor earlier in ``ids``); remembers them."""
        mask = np.zeros(len(ids), bool)
        for i, eid in enumerate(ids):  # the events path, bounded by MAX_EVENTS per body
            if eid not in self.seen:
                mask[i] = True
                self.seen.add(eid)
                self.order.append(eid)
        while len(self.order) > self.limit:
            self.seen.discard(self.order.popleft())
        return mask


@dataclass(frozen=True)
class LogCounters:
    """The metrics the logs update, per log (``exposures``, ``events``)."""

    dropped: Callable[[str], Count]
    written: Callable[[str], Count]
    failed: Callable[[str], Count]


def prepare_log_dir(directory: Path) -> None:
    """Creates ``<directory>/exposures`` and ``<directory>/events``; a
    :class:`~ranker.errors.ConfigError` naming the setting when that is impossible (start-up
    checks it before uvicorn starts, so the error is one line)."""
    try:
        for name in ("exposures", "events"):
            (directory / name).mkdir(parents=True, exist_ok=True)
            probe = directory / name / f".probe-{os.getpid()}"
            probe.touch()
            probe.unlink()
    except OSError as e:
        raise ConfigError(f"RANKER_EXPOSURE_DIR {directory}: {e.strerror or e}") from None


class ServiceLogs:
    """The exposure log and the event log of one worker process."""

    def __init__(
        self,
        directory: Path,
        rotation: Rotation,
        queue_size: int,
        event_id_limit: int,
        counters: LogCounters,
    ) -> None:
        prepare_log_dir(directory)
        self.directory = directory
        self.exposures = ParquetLog(
            directory / "exposures",
            "exposures",
            exposure_table,
            rotation,
            queue_size,
            counters.dropped("exposures"),
            counters.written("exposures"),
            counters.failed("exposures"),
        )
        self.events = ParquetLog(
            directory / "events",
            "events",
            event_table,
            rotation,
            queue_size,
            counters.dropped("events"),
            counters.written("events"),
            counters.failed("events"),
        )
        self.recent_ids = RecentIds(event_id_limit)

    def exposed(
        self,
        request_id: str,
        time: float,
        user_id: int,
        context: Mapping[str, Any],
        video_ids: np.ndarray,
        scores: np.ndarray,
        predictions: Mapping[str, np.ndarray],
        model_version: str,
        ranking_version: str,
        degraded: bool,
        variant: str | None = None,
    ) -> bool:
        """Queues one answered request's shown candidates; False when dropped (queue full)."""
        return self.exposures.put(
            Exposure(
                request_id,
                time,
                user_id,
                context,
                video_ids,
                scores,
                predictions,
                model_version,
                ranking_version,
                variant,
                degraded,
            )
        )

    def log_events(
        self, batch: EventBatch, request_ids: Sequence[str | None], fresh: np.ndarray
    ) -> bool:
        """Queues the accepted (``fresh``) events of ``batch``; False when dropped."""
        if not fresh.any():
            return True
        return self.events.put(Events.accepted(batch, request_ids, fresh))

    def close(self) -> None:
        """Writes everything pending (both logs); blocks, so run it off the event loop."""
        self.exposures.close()
        self.events.close()
