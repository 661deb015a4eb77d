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
from ranker.history import Recent
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


# The history (``[live.history]``): per user one string of up to N 16-byte entries, most recent
# first: the time as a little-endian float64, then the video id as 8 big-endian bytes with the
# sign bit flipped, so that comparing the bytes as strings (Lua) orders ids as int64s do
# (ranker/history.py's tie order). Key: P:live-hist:<name>.<digest>:{u:<user>}, the user in a
# hash tag, so one user's keys can share a Redis Cluster slot.

HISTORY_ENTRY = 16
_SIGN = np.uint64(1 << 63)


def history_digest(live: LiveConfig, unit_s: float) -> str:
    """Eight hex digits naming what a history means (its spec, the engaged event, the unit)."""
    assert live.history is not None
    spec = live.history
    event = next(e for e in live.events if e.name == spec.engaged).model_dump(mode="json")
    what = {"engaged": spec.engaged, "length": spec.length}  # the pooling is the model's
    blob = json.dumps([what, event, unit_s], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def history_key(prefix: str, live: LiveConfig, unit_s: float, user: int) -> str:
    assert live.history is not None
    return f"{prefix}:live-hist:{live.history.name}.{history_digest(live, unit_s)}:{{u:{user}}}"


def video_bytes(videos: np.ndarray) -> np.ndarray:
    """Video ids as ``(n, 8)`` uint8: big-endian with the sign bit flipped (order-preserving)."""
    v = (np.asarray(videos, np.int64).view(np.uint64) ^ _SIGN).astype(">u8")
    return v.view(np.uint8).reshape(-1, 8)


def pack_history(recent: Recent) -> list[bytes]:
    """One record per row of ``recent`` (its ``ok`` entries, most recent first)."""
    n, k = recent.ok.shape
    rec = np.zeros((n, k, HISTORY_ENTRY), np.uint8)
    rec[:, :, :8] = recent.times.astype("<f8").view(np.uint8).reshape(n, k, 8)
    rec[:, :, 8:] = video_bytes(recent.videos.ravel()).reshape(n, k, 8)
    counts = recent.ok.sum(1)
    flat = rec.reshape(n, -1)
    return [flat[i, : counts[i] * HISTORY_ENTRY].tobytes() for i in range(n)]  # per user


def unpack_history(value: bytes | None, length: int, what: str) -> Recent:
    """A record as a one-row :class:`Recent` (an absent record: the empty history)."""
    buf = value or b""
    if len(buf) % HISTORY_ENTRY or len(buf) > length * HISTORY_ENTRY:
        raise StoreError(f"{what}: a history record of {len(buf)} bytes: another layout")
    m = len(buf) // HISTORY_ENTRY
    rec = np.frombuffer(buf, np.uint8).reshape(m, HISTORY_ENTRY)
    times = np.full((1, length), np.nan)
    videos = np.zeros((1, length), np.int64)
    ok = np.zeros((1, length), bool)
    times[0, :m] = rec[:, :8].copy().view("<f8").ravel()
    videos[0, :m] = (rec[:, 8:].copy().view(">u8").ravel().astype(np.uint64) ^ _SIGN).view(np.int64)
    ok[0, :m] = True
    return Recent(videos, times, ok)


HISTORY_LUA = """
-- Adds engaged events to users' histories: per user a string of 16-byte entries, most recent
-- first (time '<d', then the video's order-preserving 8 bytes), at most ARGV[2] of them.
-- ARGV: ttl, length, then per event: time, video bytes. KEYS: per event its user's history key.
-- The order is ranker.history's: (time, video) descending; the oldest falls off the end.
-- Video bytes are compared as two big-endian unsigned 32-bit halves (not as Lua strings, whose
-- comparison follows the locale).
local function vge(a, b)
  local ah, al = struct.unpack('>I4>I4', a)
  local bh, bl = struct.unpack('>I4>I4', b)
  return ah > bh or (ah == bh and al >= bl)
end
local ttl, len = tonumber(ARGV[1]), tonumber(ARGV[2])
for e = 1, #KEYS do
  local t, vb = tonumber(ARGV[1 + 2 * e]), ARGV[2 + 2 * e]
  local rec = redis.call('GET', KEYS[e]) or ''
  local n = #rec / 16
  local at = n
  for i = 0, n - 1 do
    local ti = struct.unpack('<d', string.sub(rec, 16 * i + 1, 16 * i + 8))
    local vi = string.sub(rec, 16 * i + 9, 16 * i + 16)
    if t > ti or (t == ti and vge(vb, vi)) then at = i break end
  end
  local out = string.sub(rec, 1, 16 * at) .. struct.pack('<d', t) .. vb .. string.sub(rec, 16 * at + 1)
  redis.call('SET', KEYS[e], string.sub(out, 1, 16 * len), 'EX', ttl)
end
return #KEYS
"""
