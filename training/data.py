"""Streams the impression log from Parquet and turns record batches into model batches.

Nothing here holds the log in memory: fragments (files) are read batch by batch with only the
needed columns, joined to the pre-encoded user and video tables by vectorised lookups, and
converted to tensors in bulk. A bounded shuffle buffer mixes rows across batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch
from torch import Tensor

from ranker import live
from ranker.config import Config
from ranker.errors import DataError
from ranker.features import Encoded, FeatureEncoder
from ranker.history import encode_history
from ranker.live import OfflineCounters
from ranker.tables import FeatureTable, as_int64_ids

Split = Literal["train", "validation", "all"]


@dataclass
class Batch:
    """One model batch; every tensor has ``B`` rows."""

    cat: Tensor  # (B, C) int64
    num: Tensor  # (B, N) float32
    labels: dict[str, Tensor]  # task -> (B,) float32, label units, 0 where masked
    masks: dict[str, Tensor]  # task -> (B,) bool, rows that count for the task
    users: Tensor  # (B,) int64 user ids (GAUC groups)
    requests: Tensor  # (B,) int64 request ids (per-list metrics)
    extra: dict[str, Tensor] = field(default_factory=dict)  # e.g. truth columns, (B,)
    bias: Tensor | None = None  # (B, P) int64 shallow-tower inputs (position first), training only
    weights: dict[str, Tensor] = field(default_factory=dict)  # task -> (B,) loss weights

    def __len__(self) -> int:
        return self.cat.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        def mv(d: dict[str, Tensor]) -> dict[str, Tensor]:
            return {k: v.to(device, non_blocking=True) for k, v in d.items()}

        return Batch(
            self.cat.to(device, non_blocking=True),
            self.num.to(device, non_blocking=True),
            mv(self.labels),
            mv(self.masks),
            self.users,
            self.requests,
            self.extra,
            None if self.bias is None else self.bias.to(device, non_blocking=True),
            mv(self.weights),
        )

    def take(self, idx: Tensor) -> Batch:
        def tk(d: dict[str, Tensor]) -> dict[str, Tensor]:
            return {k: v[idx] for k, v in d.items()}

        return Batch(
            self.cat[idx],
            self.num[idx],
            tk(self.labels),
            tk(self.masks),
            self.users[idx],
            self.requests[idx],
            tk(self.extra),
            None if self.bias is None else self.bias[idx],
            tk(self.weights),
        )

    def slice(self, start: int, stop: int) -> Batch:
        """Rows ``start:stop`` as views (no copy): what :func:`shuffled_batches` cuts its
        shuffled buffer into, where ``take(torch.arange(...))`` copied every row once more."""

        def sl(d: dict[str, Tensor]) -> dict[str, Tensor]:
            return {k: v[start:stop] for k, v in d.items()}

        return Batch(
            self.cat[start:stop],
            self.num[start:stop],
            sl(self.labels),
            sl(self.masks),
            self.users[start:stop],
            self.requests[start:stop],
            sl(self.extra),
            None if self.bias is None else self.bias[start:stop],
            sl(self.weights),
        )

    @staticmethod
    def concat(parts: list[Batch]) -> Batch:
        if len(parts) == 1:
            return parts[0]

        def cc(key: str) -> dict[str, Tensor]:
            return {
                k: torch.cat([getattr(p, key)[k] for p in parts]) for k in getattr(parts[0], key)
            }

        return Batch(
            torch.cat([p.cat for p in parts]),
            torch.cat([p.num for p in parts]),
            cc("labels"),
            cc("masks"),
            torch.cat([p.users for p in parts]),
            torch.cat([p.requests for p in parts]),
            cc("extra"),
            None if parts[0].bias is None else torch.cat([p.bias for p in parts]),  # type: ignore[misc]
            cc("weights"),
        )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class ImpressionLog:
    """The impression log as a Parquet dataset, split by time into train and validation.

    The cutoff is ``data.validation_from`` when set, otherwise the point leaving the last
    ``validation_fraction`` of the time span for validation: a split by time, as the model will
    be used on the future, never a random split that leaks tomorrow into training.
    """

    def __init__(self, config: Config, path: Path | None = None) -> None:
        self.config = config
        self.path = Path(path or config.data.log)
        if not self.path.exists():
            raise DataError(f"impression log {self.path} does not exist")
        try:
            self.dataset = ds.dataset(self.path, format="parquet")
        except (pa.ArrowInvalid, OSError) as e:
            if self.path.is_dir():  # the schema is read from one file: name which
                files = self.path.rglob("*")
                self._check_files(
                    sorted(str(p) for p in files if p.is_file() and p.name[0] not in "._")
                )
            raise DataError(
                f"impression log {self.path} is not readable as Parquet: {_first_line(e)}"
            ) from None
        self.files = sorted(getattr(self.dataset, "files", []))
        if not self.files:
            raise DataError(f"impression log {self.path} holds no Parquet files")
        self._check_files(self.files)
        self._check_columns()
        self.cutoff = self._cutoff()

    def required_columns(self) -> list[str]:
        d = self.config.data
        cols = [d.user_key, d.video_key, d.request_key, d.time_column]
        if self.config.live is not None:
            cols += live.log_columns(self.config)
        cols += [
            f.source_column
            for f in self.config.effective_features
            if f.source in ("context", "bias")
        ]
        for t in self.config.tasks:
            cols.append(t.label)
            cols += [c for c in (t.only_where, t.weight_column) if c]
        return list(dict.fromkeys(cols))

    @staticmethod
    def _check_files(files: list[str]) -> None:
        """Reads every file's footer (a few KB each): a truncated or foreign file is named here,
        before any training, instead of surfacing as an Arrow traceback mid-epoch."""
        for f in files:
            try:
                pq.read_metadata(f)
            except (OSError, pa.ArrowInvalid) as e:
                raise DataError(
                    f"impression log file {f} is not readable as Parquet "
                    f"(truncated or damaged?): {_first_line(e)}"
                ) from None

    def _check_columns(self) -> None:
        names = set(self.dataset.schema.names)
        missing = [c for c in self.required_columns() if c not in names]
        if missing:
            raise DataError(
                f"impression log {self.path}: missing column(s) {missing} that the config needs; "
                f"the log has {sorted(names)}"
            )
        schema = self.dataset.schema
        for t in self.config.tasks:
            typ = schema.field(t.label).type
            if not (
                pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)
            ):
                raise DataError(
                    f"impression log {self.path}: label column {t.label!r} has type {typ}"
                )
        for key in (self.config.data.user_key, self.config.data.video_key):
            if not pa.types.is_integer(schema.field(key).type):
                raise DataError(
                    f"impression log {self.path}: id column {key!r} must be integer, "
                    f"got {schema.field(key).type}"
                )

    def _cutoff(self) -> float:
        d = self.config.data
        if not d.validation:
            return math.inf
        if d.validation_from is not None:
            return float(d.validation_from)
        lo, hi = np.inf, -np.inf
        for f in self.files:
            frag = ds.dataset(f, format="parquet", schema=self.dataset.schema)
            try:
                for b in frag.to_batches(columns=[d.time_column], batch_size=1 << 20):
                    mm = pc.min_max(b.column(0))
                    if mm["min"].is_valid:
                        lo, hi = min(lo, mm["min"].as_py()), max(hi, mm["max"].as_py())
            except (OSError, pa.ArrowInvalid) as e:
                raise DataError(f"impression log file {f}: {_first_line(e)}") from None
        if not np.isfinite(lo):
            raise DataError(f"impression log {self.path}: column {d.time_column!r} has no values")
        return lo + (1.0 - d.validation_fraction) * (hi - lo)

    def filter(self, split: Split) -> pc.Expression | None:
        if not self.config.data.validation:  # every row trains, none validates
            return pc.scalar(False) if split == "validation" else None
        t = pc.field(self.config.data.time_column)
        cutoff: float | int = self.cutoff
        if pa.types.is_integer(self.dataset.schema.field(self.config.data.time_column).type):
            # For integer times "t < c" is "t < ceil(c)"; comparing in integers also avoids an
            # Arrow cast of the column to float32 that fails on values like 20220425 (yyyymmdd).
            cutoff = math.ceil(self.cutoff)
        if split == "train":
            return t < cutoff
        if split == "validation":
            return t >= cutoff
        return None

    def check_validation(self) -> int:
        """Rows of the validation split; an error naming the key when a configured split is
        empty (a cutoff past the end would otherwise select on nothing, silently)."""
        d = self.config.data
        if not d.validation:
            return 0
        n = self.count_rows("validation")
        if n == 0:
            key = (
                f"data.validation_from = {d.validation_from:g}"
                if d.validation_from is not None
                else f"data.validation_fraction = {d.validation_fraction:g}"
            )
            raise DataError(
                f"impression log {self.path}: {key} leaves no validation rows "
                f"(column {d.time_column!r}); set data.validation = false to train on every row"
            )
        return n

    def count_rows(self, split: Split, files: list[str] | None = None) -> int:
        """Rows of one split (in ``files``, default all), from the time column alone."""
        flt = self.filter(split)
        total = 0
        for f in files if files is not None else self.files:
            try:
                total += ds.dataset(f, format="parquet").count_rows(filter=flt)
            except (OSError, pa.ArrowInvalid) as e:
                raise DataError(f"impression log file {f}: {_first_line(e)}") from None
        return total

    def record_batches(
        self,
        split: Split,
        columns: list[str] | None = None,
        batch_size: int = 65536,
        shuffle_files: np.random.Generator | None = None,
        files: list[str] | None = None,
    ) -> Iterator[tuple[str, pa.RecordBatch]]:
        """``(file, record batch)`` pairs of one split, file by file (optionally shuffled)."""
        files = list(files if files is not None else self.files)
        if shuffle_files is not None:
            shuffle_files.shuffle(files)
        cols = columns or self.required_columns()
        flt = self.filter(split)
        for f in files:
            frag = ds.dataset(f, format="parquet", schema=self.dataset.schema)
            try:
                for rb in frag.to_batches(columns=cols, filter=flt, batch_size=batch_size):
                    if rb.num_rows:
                        yield f, rb
            except (OSError, pa.ArrowInvalid) as e:
                raise DataError(f"impression log file {f}: {_first_line(e)}") from None


class BatchBuilder:
    """Record batch -> :class:`Batch`: joins user and video features, encodes the context,
    extracts labels and masks. The same join the service performs, vectorised."""

    def __init__(
        self,
        config: Config,
        encoder: FeatureEncoder,
        users: FeatureTable,
        videos: FeatureTable,
        extra_columns: list[str] | None = None,
        serving: bool = False,
        counters: OfflineCounters | None = None,
    ) -> None:
        self.config = config
        # Live counters: values strictly before each row's time, from ``counters`` (built over
        # the training log, plus the evaluated log when that is another one).
        if config.live is not None and counters is None:
            counters = OfflineCounters(config, [Path(config.data.log)])
        self.counters = counters
        self.encoder = encoder
        self.users = users
        self.videos = videos
        self.extra_columns = list(extra_columns or [])
        # serving=True encodes the rows as the service would see them: context features that have
        # a serving default (the position in "feature" mode) take that value, whatever was logged.
        self.serving = serving
        self.fixed = {
            f.source_column: f.serving_default
            for f in encoder.of("context")
            if f.serving_default is not None
        }

    def features(self, rb: pa.RecordBatch, origin: str) -> tuple[Encoded, np.ndarray, np.ndarray]:
        """Encoded model input for the rows, plus the user and video ids."""
        d = self.config.data
        uid = as_int64_ids(rb.column(d.user_key), f"{origin} column {d.user_key!r}")
        vid = as_int64_ids(rb.column(d.video_key), f"{origin} column {d.video_key!r}")
        u, _ = self.users.lookup(uid)
        v, _ = self.videos.lookup(vid)
        if self.serving and self.fixed:
            rb = self._fix_context(rb)
        c = self.encoder.encode(rb, "context", origin)
        parts = [u, v, c]
        if self.counters is not None:
            num = self.counters.encode(rb, self.encoder.live, origin)
            parts.append(Encoded(np.zeros((len(num), 0), np.int64), num))
            if self.counters.history is not None:  # the history's codes: the last cat columns
                codes = encode_history(self.config, self.encoder, self.counters.recent(rb, origin))
                parts.append(Encoded(codes, np.zeros((len(codes), 0), np.float32)))
        return Encoded.concat_columns(parts), uid, vid

    def _fix_context(self, rb: pa.RecordBatch) -> pa.RecordBatch:
        for name, value in self.fixed.items():
            i = rb.schema.get_field_index(name)
            col = pa.array(np.full(rb.num_rows, value)).cast(rb.schema.field(i).type)
            rb = rb.set_column(i, name, col)
        return rb

    def labels(
        self, rb: pa.RecordBatch, origin: str
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """Labels (label units, 0 where masked), masks and loss weights per task."""
        labels: dict[str, Tensor] = {}
        masks: dict[str, Tensor] = {}
        weights: dict[str, Tensor] = {}
        for t in self.config.tasks:
            col = rb.column(t.label)
            y = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
            y = y * t.label_scale
            ok = np.isfinite(y)
            bad = ~ok & ~np.asarray(col.is_null(), dtype=bool)
            if bad.any():
                raise DataError(
                    f"{origin}: label column {t.label!r} has {int(bad.sum())} NaN/inf values"
                )
            # == 0 | == 1, not np.isin: the same test without isin's sort
            if t.kind == "binary" and ok.any() and not ((y[ok] == 0.0) | (y[ok] == 1.0)).all():
                raise DataError(
                    f"{origin}: binary label column {t.label!r} has values other than 0/1"
                )
            if (
                t.loss == "ordinal"
                and ok.any()
                and ((y[ok] < 1) | (y[ok] > (t.levels or 1)) | (y[ok] != np.round(y[ok]))).any()
            ):
                raise DataError(
                    f"{origin}: ordinal label column {t.label!r} has values outside 1..{t.levels}"
                )
            if (
                t.loss in ("mse_log1p", "huber_log1p", "weighted_logistic", "ziln")
                and ok.any()
                and (y[ok] < 0).any()
            ):
                raise DataError(
                    f"{origin}: label column {t.label!r} has negative values, which loss {t.loss!r} cannot take"
                )
            if t.only_where:
                w = pc.cast(rb.column(t.only_where), pa.float64()).to_numpy(zero_copy_only=False)
                ok &= np.nan_to_num(np.asarray(w, dtype=np.float64)) != 0
            if t.value_range is not None:
                self._check_range(rb, origin, t.label, t.value_range, y, ok)
            if t.weight_column:
                w = pc.cast(rb.column(t.weight_column), pa.float64()).to_numpy(zero_copy_only=False)
                w = np.asarray(w, dtype=np.float64)
                bad = ok & ~(np.isfinite(w) & (w >= 0))
                if bad.any():
                    raise DataError(
                        f"{origin}: weight column {t.weight_column!r} has {int(bad.sum())} "
                        "negative, NaN or null values on rows that count"
                    )
                weights[t.name] = torch.from_numpy(np.where(ok, w, 0.0).astype(np.float32))
            labels[t.name] = torch.from_numpy(np.where(ok, y, 0.0).astype(np.float32))
            masks[t.name] = torch.from_numpy(ok)
        return labels, masks, weights

    def _check_range(
        self,
        rb: pa.RecordBatch,
        origin: str,
        label: str,
        value_range: tuple[float, float],
        y: np.ndarray,
        ok: np.ndarray,
    ) -> None:
        """Labels that count must lie in the task's ``value_range``: predictions are clipped to
        it, so a label outside (ratings x10 against 1..5) trains a head that can never reach
        its target, silently, with a huge loss. Checked like the binary labels' 0/1."""
        lo, hi = value_range
        out = ok & ((y < lo) | (y > hi))
        if not out.any():
            return
        i = int(np.flatnonzero(out)[0])
        d = self.config.data
        keys = ", ".join(
            f"{k}={rb.column(k)[i].as_py()}" for k in (d.request_key, d.user_key, d.video_key)
        )
        raise DataError(
            f"{origin}: label column {label!r} has {int(out.sum())} values outside value_range "
            f"[{lo:g}, {hi:g}] (after label_scale), e.g. {y[i]:g} ({keys})"
        )

    def build(self, rb: pa.RecordBatch, origin: str = "") -> Batch:
        enc, uid, _ = self.features(rb, origin)
        labels, masks, weights = self.labels(rb, origin)
        req = as_int64_ids(rb.column(self.config.data.request_key), f"{origin} request ids").copy()
        extra = {
            c: torch.from_numpy(
                pc.cast(rb.column(c), pa.float64())
                .to_numpy(zero_copy_only=False)
                .astype(np.float64)  # float64: a time in ms is exact, float32 is +-2 minutes
            )
            for c in self.extra_columns
            if c in rb.schema.names
        }
        bias = None
        if self.config.position.mode == "shallow_tower":
            bias = torch.from_numpy(self.encoder.encode(rb, "bias", origin).cat)
        return Batch(
            torch.from_numpy(enc.cat),
            torch.from_numpy(enc.num),
            labels,
            masks,
            torch.from_numpy(uid.copy()),
            torch.from_numpy(req),
            extra,
            bias,
            weights,
        )


def shuffled_batches(
    batches: Iterator[Batch], batch_size: int, buffer_rows: int, generator: torch.Generator | None
) -> Iterator[Batch]:
    """Re-batches a stream to ``batch_size`` rows, shuffling within a buffer of ``buffer_rows``.

    Streaming cannot shuffle globally; mixing a few hundred thousand rows (plus shuffled file
    order) removes the time ordering of the log from SGD's view at bounded memory.
    """
    pending: list[Batch] = []
    rows = 0

    def drain(final: bool) -> Iterator[Batch]:
        nonlocal pending, rows
        merged = Batch.concat(pending)
        if buffer_rows > 0:
            merged = merged.take(torch.randperm(len(merged), generator=generator))
        n_full = len(merged) // batch_size * batch_size
        for s in range(0, n_full, batch_size):
            yield merged.slice(s, s + batch_size)
        rest = len(merged) - n_full
        if rest and final:
            yield merged.slice(n_full, len(merged))
            pending, rows = [], 0
        elif rest:
            pending, rows = [merged.take(torch.arange(n_full, len(merged)))], rest
        else:
            pending, rows = [], 0

    for b in batches:
        pending.append(b)
        rows += len(b)
        if rows >= max(buffer_rows, batch_size):
            yield from drain(final=False)
    if pending:
        yield from drain(final=True)
