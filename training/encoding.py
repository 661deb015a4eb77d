"""Fits the feature encoder on the training part of the log only, in one streamed pass.

Context features are counted over training impressions. User and video features are fitted on
the table rows of entities that occur in training, each weighted by its training impressions, so
an id seen only in validation stays in the unknown bucket (as it would in production) and
``min_count`` on an id means "at least that many training impressions".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from ranker import live
from ranker.config import Config, Source
from ranker.errors import DataError
from ranker.features import EncoderFitter, FeatureEncoder, _Counts
from ranker.heads import HeadStats
from ranker.live import OfflineCounters
from ranker.tables import FeatureTable
from training.data import ImpressionLog


def read_table(path: str, what: str) -> pa.Table:
    try:
        return pq.read_table(path)
    except FileNotFoundError:
        raise DataError(f"{what} table {path} does not exist") from None
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"{what} table {path} is not readable as Parquet: {e}") from None


def _fit_entity(
    fitter: EncoderFitter, table: pa.Table, key: str, seen: _Counts, source: Source, origin: str
) -> None:
    if key not in table.schema.names:
        raise DataError(
            f"{origin}: key column {key!r} is missing; columns are {table.schema.names}"
        )
    seen._reduce()
    if not seen.keys:
        return
    ids, counts = seen.keys[0], seen.counts[0]
    keys = np.asarray(pc.cast(table.column(key), pa.int64()).to_numpy(zero_copy_only=False))
    pos = np.minimum(np.searchsorted(ids, keys), len(ids) - 1)
    hit = ids[pos] == keys
    # A duplicated key counts once: keep its last row, as FeatureTable does.
    _, last_rev = np.unique(keys[::-1], return_index=True)
    last = np.zeros(len(keys), bool)
    last[len(keys) - 1 - last_rev] = True
    rows = np.flatnonzero(hit & last)
    fitter.update(table.take(pa.array(rows)), source, origin, weights=counts[pos[rows]])


@dataclass
class Fitted:
    encoder: FeatureEncoder
    users: FeatureTable
    videos: FeatureTable
    head_bias: dict[str, list[float]]  # per task: output-layer bias giving the base value
    counters: OfflineCounters | None = None  # live counters over the training log


def fit_encoder(config: Config, log: ImpressionLog, progress: bool = True) -> Fitted:
    """Fits the encoder in one streamed pass over the training split, encodes the users and
    videos tables, and measures each head's base value (so the heads start at it: a rating head
    starting at 0 instead of ~3.5 stars would otherwise swamp the shared layers' first steps)."""
    d = config.data
    fitter = EncoderFitter(config.effective_features)
    users_seen, videos_seen = _Counts(), _Counts()
    ctx_cols = [
        f.source_column for f in config.effective_features if f.source in ("context", "bias")
    ]
    label_cols = [c for t in config.tasks for c in (t.label, t.only_where) if c]
    live_cols = live.log_columns(config) if config.live else []
    cols = list(dict.fromkeys([d.user_key, d.video_key, *ctx_cols, *label_cols, *live_cols]))
    counters = OfflineCounters(config, [log.path]) if config.live else None
    train_events: list[live.Events] = []
    stats = {t.name: HeadStats(t) for t in config.tasks}
    rows = 0
    bar = tqdm(desc="fit encoder", unit=" rows", disable=not progress, unit_scale=True)
    for f, rb in log.record_batches("train", columns=cols, batch_size=1 << 18):
        fitter.update(rb, "context", f)
        fitter.update(rb, "bias", f)
        if counters is not None:
            train_events.append(live.events_from_table(config, rb, counters.attrs, f))
        users_seen.add(rb.column(d.user_key))
        videos_seen.add(rb.column(d.video_key))
        for t in config.tasks:
            y = pc.cast(rb.column(t.label), pa.float64()).to_numpy(zero_copy_only=False)
            y = np.asarray(y, dtype=np.float64) * t.label_scale
            ok = np.isfinite(y)
            if t.only_where:
                w = pc.cast(rb.column(t.only_where), pa.float64()).to_numpy(zero_copy_only=False)
                ok &= np.nan_to_num(np.asarray(w, dtype=np.float64)) != 0
            stats[t.name].add(y[ok])
        rows += rb.num_rows
        bar.update(rb.num_rows)
    bar.close()
    if rows == 0:
        raise DataError(
            f"impression log {log.path}: no training rows before the time cutoff {log.cutoff}"
        )
    tables: dict[Source, pa.Table | None] = {}
    for source, path, key, seen in (
        ("user", d.users, d.user_key, users_seen),
        ("video", d.videos, d.video_key, videos_seen),
    ):
        tables[source] = None if path is None else read_table(str(path), f"{source}s")
        if tables[source] is not None:
            _fit_entity(fitter, tables[source], key, seen, source, str(path))
    encoder = fitter.finish()
    if counters is not None:
        encoder.live = counters.fit(live.concat_events(train_events))
    head_bias = {name: st.bias() for name, st in stats.items()}

    def table(source: Source, path: object, key: str) -> FeatureTable:
        t = tables[source]
        if t is None:
            return FeatureTable.absent(encoder, source)
        return FeatureTable.build(t, key, encoder, source, str(path))

    return Fitted(
        encoder,
        table("user", d.users, d.user_key),
        table("video", d.videos, d.video_key),
        head_bias,
        counters,
    )
