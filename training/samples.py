"""Builds the sample requests an artifact carries (:mod:`ranker.samples`) from the training data.

Each request is one validation impression's user and context (as logged; context features
with a serving default take it, as the service would see them) beside ``candidates`` videos
drawn from the videos table, the shape of a real ranking request. Encoded by the same
:class:`~training.data.BatchBuilder` join that validation uses.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ranker.config import Config
from ranker.features import FeatureEncoder
from ranker.samples import SampleRequests
from ranker.tables import FeatureTable
from training.data import BatchBuilder, ImpressionLog


def build_samples(
    config: Config,
    encoder: FeatureEncoder,
    requests: int,
    candidates: int,
    seed: int = 0,
) -> SampleRequests | None:
    """``requests`` requests of ``candidates`` videos each (fewer requests when the validation
    split has fewer impressions; ``None`` when it has none or ``requests`` is 0)."""
    if requests < 1 or candidates < 1:
        return None
    d = config.data
    log = ImpressionLog(config)
    users = FeatureTable.from_parquet(d.users, d.user_key, encoder, "user")
    videos = FeatureTable.from_parquet(d.videos, d.video_key, encoder, "video")
    if len(videos) == 0:
        return None
    builder = BatchBuilder(config, encoder, users, videos, serving=True)
    rng = np.random.default_rng(seed)
    # Labels are not features, except where live counters count them as events (only those
    # strictly before a row enter its features, so a row's own labels never do).
    labels = set() if config.live is not None else {t.label for t in config.tasks}
    columns = [c for c in log.required_columns() if c not in labels]
    pool: list[pa.RecordBatch] = []
    seen = 0
    for _, rb in log.record_batches("validation", columns=columns, batch_size=4096):
        pool.append(rb)
        seen += rb.num_rows
        if seen >= 50 * requests:  # enough distinct users and contexts to draw from
            break
    if not pool:
        return None
    table = pa.Table.from_batches(pool)
    picks = np.sort(rng.choice(table.num_rows, size=min(requests, table.num_rows), replace=False))
    rows = table.take(np.repeat(picks, candidates))  # each impression once per candidate
    vids = rng.choice(videos.keys, size=len(picks) * candidates, replace=True)
    i = rows.schema.get_field_index(d.video_key)
    rows = rows.set_column(i, d.video_key, pa.array(vids, type=rows.schema.field(i).type))
    enc, _, _ = builder.features(rows.combine_chunks().to_batches()[0], "sample requests")
    r = len(picks)
    return SampleRequests(
        enc.cat.reshape(r, candidates, -1), enc.num.reshape(r, candidates, -1).astype(np.float32)
    )
