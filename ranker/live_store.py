"""The Redis layout of live counter state, shared by ``ranker push-state`` and the service.

Per counter and entity one string value, a packed little-endian float64 record::

    impressions, one sum per event the counter counts, last impression time, reference time

(``8 * (3 + E)`` bytes; the reference time is the time the sums are decayed to, as
:class:`ranker.live.Totals` keeps it), so the counters a request needs ride in the same MGET as
its feature records (``service/redis_store.py``): no second round trip. A packed string rather
than a hash: MGET reads strings only, and a hash of 4-6 small fields costs more memory
(``docs/live-features.md`` has the measured figures).

Keys (``P`` is the feature store's prefix)::

    P:live:{<counter>.<digest>:<entity>}              a counter's record; TTL refreshed on write
    P:live-id:{<counter>.<digest>:<entity>}:<event>   an event this record counted (SET NX, TTL)

The braces are a Redis Cluster hash tag: a record and the ids of the events it counted share
one slot, so :data:`UPDATE_LUA`, called once per record with that record's events, touches one
slot (a cluster refuses a script whose keys span slots). The price is one id key per counter an
event updates instead of one per event; what it buys is that each record counts each event
exactly once, atomically with its id, on one node or on a cluster. Per-user lists (a user's
recent history) fit the same way: tag them by the user, ``P:hist:{u:<user>}``, with their event
ids under the same tag.

``<entity>`` is :func:`ranker.live.combine_keys` of the counter's key columns, in decimal;
``<digest>`` names the counter's definition (its keys, events and their scales, decay, the
log's time unit), so a model that counts something else never reads state of another
definition: it starts empty until ``ranker push-state`` fills it. Records have no version: the
state is live, every writer updates it in place, atomically per event (:data:`UPDATE_LUA`).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from ranker.config import CounterSpec, LiveConfig
from ranker.errors import StoreError
from ranker.live import Totals

STATE_TTL_S = 30 * 86400  # a counted entity not updated for this long is forgotten
EVENT_ID_TTL_S = 86400  # a retried event is recognised for this long


def record_width(spec: CounterSpec) -> int:
    """Float64 fields per record: impressions, the event sums, last time, reference time."""
    return len(spec.events) + 3


def counter_digest(live: LiveConfig, spec: CounterSpec, unit_s: float) -> str:
    """Eight hex digits naming what a counter's state means (see the module docstring)."""
    events = {e.name: e.model_dump(mode="json") for e in live.events if e.name in spec.events}
    blob = json.dumps([spec.model_dump(mode="json"), events, unit_s], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def counter_prefix(prefix: str, live: LiveConfig, spec: CounterSpec, unit_s: float) -> str:
    """Key prefix of one counter's records; :func:`record_keys` appends the entities."""
    return f"{prefix}:live:{{{spec.name}.{counter_digest(live, spec, unit_s)}:"


def record_keys(counter: str, entities: list[int]) -> list[str]:
    """The record keys of ``entities`` (decimal) under a :func:`counter_prefix`."""
    return [f"{counter}{e}}}" for e in entities]


def event_id_key(record_key: str, event_id: str) -> str:
    """The key marking ``event_id`` as counted by one record: the record's hash tag, so both
    live in one cluster slot (``P:live:{tag}`` -> ``P:live-id:{tag}:<event_id>``)."""
    head, _, tag = record_key.partition(":live:")
    return f"{head}:live-id:{tag}:{event_id}"


def pack_totals(totals: Totals) -> np.ndarray:
    """Every entity's record, ``(n, 8 * width)`` bytes as a ``(n, width)`` ``<f8`` array."""
    ref = totals.ref if totals.tau is not None else np.nan_to_num(totals.ref, nan=-np.inf)
    return np.ascontiguousarray(
        np.c_[totals.imp, totals.vals, totals.last_time, ref].astype("<f8", copy=False)
    )


def unpack(values: list[bytes | None], spec: CounterSpec, what: str) -> tuple[np.ndarray, ...]:
    """``(found (n,), impressions (n,), sums (n, E), last (n,), ref (n,))`` from MGET values;
    absent records are zeros (last time NaN)."""
    n, w = len(values), record_width(spec)
    found = np.fromiter((v is not None for v in values), bool, n)
    rec = np.zeros((n, w))
    rec[:, w - 2] = np.nan
    if found.any():
        buf = b"".join(v for v in values if v is not None)
        if len(buf) != int(found.sum()) * 8 * w:
            raise StoreError(f"{what}: counter records are not {8 * w} bytes: another layout")
        rec[found] = np.frombuffer(buf, "<f8").reshape(-1, w)
    return found, rec[:, 0], rec[:, 1 : w - 2], rec[:, w - 2], rec[:, w - 1]


UPDATE_LUA = """
-- Counts feedback events into live counter records, each event atomically with its id.
-- ARGV: id_ttl, state_ttl, n_events, then per event: time, impressions, n_keys, and per key:
-- tau (0: no decay), n_sums, the event's value for each sum.
-- KEYS: per event its id key, then its counter keys. Returns 1 (counted) or 0 (seen) per event.
-- On a Redis Cluster every key of one call must share a slot: the service calls it per record,
-- with the id keys tagged as the record (ranker/live_store.py).
-- The arithmetic is ranker.live.Totals.add's: sums decayed to a reference time, the newest
-- event's; the old sums decay to it and the event counts exp(-(ref - t) / tau).
local id_ttl, ttl, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local a, k = 4, 1
local out = {}
for e = 1, n do
  local t, imp, nk = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  local fresh = redis.call('SET', KEYS[k], '1', 'NX', 'EX', id_ttl)
  k = k + 1
  out[e] = fresh and 1 or 0
  for j = 1, nk do
    local tau, ne = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
    local fmt = '<' .. string.rep('d', ne + 3)
    if fresh then
      local rec = redis.call('GET', KEYS[k])
      local v
      if rec then
        v = {struct.unpack(fmt, rec)}
      else
        v = {0}
        for i = 1, ne do v[i + 1] = 0 end
        v[ne + 2] = 0 / 0
        v[ne + 3] = -math.huge
      end
      local ref = v[ne + 3]
      local f, w = 1, 1
      if t > ref then
        if tau > 0 then
          f = (ref == -math.huge) and 0 or math.exp(-(t - ref) / tau)
        end
        ref = t
      elseif tau > 0 then
        w = math.exp(-(ref - t) / tau)
      end
      v[1] = v[1] * f + imp * w
      for i = 1, ne do
        v[i + 1] = v[i + 1] * f + tonumber(ARGV[a + 1 + i]) * w
      end
      local last = v[ne + 2]
      if imp > 0 and (last ~= last or t > last) then v[ne + 2] = t end
      v[ne + 3] = ref
      redis.call('SET', KEYS[k], struct.pack(fmt, unpack(v, 1, ne + 3)), 'EX', ttl)
    end
    a = a + 2 + ne
    k = k + 1
  end
end
return out
"""
