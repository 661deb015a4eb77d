"""Reading many keys from a Redis Cluster in one round trip per node (the feature store's read).

A cluster refuses a multi-key command across hash slots (CROSSSLOT), and a request's 500 records
hash to about 490 slots. :class:`ClusterReader` groups the keys by the node serving their slot
(redis-py's slot map), sends one hiredis-packed buffer of ``GET``\\ s per node on one of that
node's pooled connections, asks the nodes in parallel and reads the replies with the hiredis
parser. redis-py 8.2's ``mget_nonatomic`` groups per node and runs the nodes in parallel too
(its asyncio cluster pipeline), but routes and packs every per-slot command through its policy
machinery in Python and reads every reply through a timeout wrapper; ``bench/feature_store.py
--cluster`` times both on the same keys. It stays the fallback for a read that met an error
reply (MOVED, ASK, CLUSTERDOWN) or a dead socket: it follows redirections and refreshes the slot
map, so the next read takes the fast path again on the new map.
"""

from __future__ import annotations

import asyncio

import hiredis
from redis._parsers.hiredis import _AsyncHiredisParser
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError

from ranker.errors import ConfigError
from ranker.feature_store import redact


def cluster_client(url: str, pool_size: int, timeout_s: float) -> RedisCluster:
    """An asyncio cluster client on ``url`` (any node; the rest is discovered on first use, so
    a cluster down at start-up only degrades answers). At most ``pool_size`` connections per
    node; one retry, at once, on a fresh connection: the per-request timeout bounds a lookup,
    and a failover shows as degraded answers until the slot map is refreshed."""
    try:
        return RedisCluster.from_url(
            url,
            max_connections=pool_size,
            socket_timeout=max(timeout_s, 1.0),
            socket_connect_timeout=max(timeout_s, 1.0),
            retry=Retry(NoBackoff(), 1),
        )
    except ValueError as e:
        raise ConfigError(f"redis_url: invalid Redis URL {redact(url)}: {e}") from None


class ClusterReader:
    """``read(keys)``: their values in one round trip per node, the nodes in parallel."""

    def __init__(self, client: RedisCluster) -> None:
        self.client = client
        self._slot_map_ready = False

    async def read(self, keys: list[str]) -> list[bytes | None]:
        try:
            return await self.per_node(keys)
        except (RedisError, RedisClusterException, OSError):
            self._slot_map_ready = False
            return await self.client.mget_nonatomic(keys)

    async def per_node(self, keys: list[str]) -> list[bytes | None]:
        """One ``GET`` per key, grouped by the node that serves its slot (redis-py's slot map)
        and sent as one hiredis-packed buffer per node on one of its pooled connections; the
        nodes are asked in parallel (the module docstring says why not redis-py's own). Any
        error reply (MOVED, ASK, CLUSTERDOWN) or socket error raises; its connection is
        dropped, since replies may be left unread on it."""
        if not self._slot_map_ready:
            await self.client.initialize()
            self._slot_map_ready = True
        nodes = self.client.nodes_manager
        groups: dict[str, tuple[ClusterNode, list[int]]] = {}
        for i, k in enumerate(keys):
            node = nodes.get_node_from_slot(key_slot(k.encode()))
            groups.setdefault(node.name, (node, []))[1].append(i)
        out: list[bytes | None] = [None] * len(keys)

        async def ask(node: ClusterNode, index: list[int]) -> None:
            packed = b"".join([hiredis.pack_command(("GET", keys[i])) for i in index])
            conn = node.acquire_connection()
            try:
                await conn.send_packed_command(packed, check_health=False)
                # The hiredis parser's own read: redis-py's Connection.read_response wraps each
                # reply in a timeout scope and checks, about 20 us a reply, most of the time of
                # 500 replies; the per-request timeout bounds the whole read instead.
                parser = getattr(conn, "_parser", None)
                read = (
                    parser.read_response
                    if isinstance(parser, _AsyncHiredisParser)
                    else conn.read_response
                )
                for i in index:
                    value = await read()
                    if isinstance(value, Exception):  # an error reply: MOVED, ASK, CLUSTERDOWN
                        raise value
                    out[i] = value
            except BaseException:
                await conn.disconnect()  # replies may be left unread on it
                raise
            finally:
                node.release(conn)

        await asyncio.gather(*(ask(node, index) for node, index in groups.values()))
        return out
