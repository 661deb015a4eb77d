"""``ranker push-state``: live counter state from a log into Redis (``ranker/live_store.py``).

What the in-process service builds from the training log at start-up, written once for every
worker and replica: per counter, every entity's totals after the whole log (the offline
engine's, :class:`ranker.live.PointInTime`), one ``SET ... EX`` per entity, pipelined in
batches (one round trip per node each; the same code on one node and on a Redis Cluster).
Records are overwritten: push before the service takes events
that the log does not hold, or events sent meanwhile are lost for the entities the log has.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import redis
from tqdm import tqdm

from ranker.config import Config
from ranker.errors import StoreError
from ranker.feature_store import check_prefix, redact
from ranker.live import OfflineCounters
from ranker.live_store import STATE_TTL_S, counter_prefix, pack_totals, record_keys
from training.push import Client, connect, write_many


@dataclass
class StateResult:
    entities: dict[str, int]  # counter -> entities written
    seconds: float

    @property
    def per_second(self) -> float:
        return sum(self.entities.values()) / max(self.seconds, 1e-9)


def push_state(
    client: Client,
    config: Config,
    logs: list[Path],
    prefix: str = "ranker:fs",
    ttl_s: int = STATE_TTL_S,
    batch_size: int = 5_000,
    progress: bool = True,
) -> StateResult:
    """Every counter's totals after ``logs`` into Redis under ``prefix``."""
    assert config.live is not None
    check_prefix(prefix)
    t0 = time.perf_counter()
    counters = OfflineCounters(config, logs).counters
    totals = [c.totals() for c in counters]
    unit = config.data.time_unit_s
    written: dict[str, int] = {}
    with tqdm(total=sum(len(t) for t in totals), unit="entities", disable=not progress) as bar:
        for tot in totals:
            key_prefix = counter_prefix(prefix, config.live, tot.spec, unit)
            records = pack_totals(tot)
            width = records.shape[1] * 8
            for start in range(0, len(tot), batch_size):
                stop = min(start + batch_size, len(tot))
                buf = records[start:stop].tobytes()
                keys = record_keys(key_prefix, tot.keys[start:stop].tolist())
                items = {k: buf[j * width : (j + 1) * width] for j, k in enumerate(keys)}
                write_many(client, items, ttl_s)
                bar.update(stop - start)
            written[tot.spec.name] = len(tot)
    return StateResult(written, time.perf_counter() - t0)


def push_state_files(
    url: str,
    config: Config,
    logs: list[Path],
    prefix: str = "ranker:fs",
    ttl_s: int = STATE_TTL_S,
    batch_size: int = 5_000,
    progress: bool = True,
) -> StateResult:
    """Connects to ``url`` and pushes (what ``ranker push-state`` runs)."""
    client = connect(url)
    try:
        return push_state(client, config, logs, prefix, ttl_s, batch_size, progress)
    except redis.RedisError as e:
        raise StoreError(f"Redis at {redact(url)}: {type(e).__name__}: {e}") from None
    finally:
        client.close()
