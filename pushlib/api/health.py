"""`GET /health`: Redis reachable, a dispatcher alive, how far behind the job stream is.

A dispatcher is alive when it talked to Redis about the job stream recently. Two signs, either
is enough: its consumer in the group is idle less than `ALIVE_IDLE_MS` (XINFO CONSUMERS; consumers
of dead dispatchers stay listed until someone deletes them), or a client connection whose last
command was a stream read (XREADGROUP, XAUTOCLAIM) is idle less than that (CLIENT LIST): Redis 7.0
creates a consumer only once it was served an entry, so an idle dispatcher that never got a job
shows only as a client blocked in XREADGROUP (it blocks `dispatcher.READ_BLOCK_MS` at a time and
sweeps with XAUTOCLAIM every second or two). A Redis user without CLIENT LIST permission leaves
the second sign out. On a Redis Cluster, CLIENT LIST asks the master that owns the stream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from redis.exceptions import RedisError, ResponseError

from pushlib.redisconn import is_cluster
from pushlib.settings import Settings

ALIVE_IDLE_MS = 5_000


_STREAM_READS = frozenset({"xreadgroup", "xautoclaim"})


def reading_clients(clients: Sequence[Mapping[str, Any]]) -> int:
    """How many connections (CLIENT LIST entries) read the job stream within ALIVE_IDLE_MS."""
    return sum(1 for c in clients
               if str(c.get("cmd", "")).lower() in _STREAM_READS and int(c.get("idle", ALIVE_IDLE_MS)) * 1000
               < ALIVE_IDLE_MS)


def assess(redis_up: bool, group: Mapping[str, Any] | None, consumers: Sequence[Mapping[str, Any]],
           length: int | None, readers: int = 0) -> dict[str, Any]:
    """The health document from XINFO GROUPS (our group's entry), XINFO CONSUMERS, XLEN and
    `reading_clients` (CLIENT LIST)."""
    active = [c for c in consumers if int(c.get("idle", ALIVE_IDLE_MS)) < ALIVE_IDLE_MS]
    lag = group.get("lag") if group else None
    alive = bool(active) or readers > 0
    status = "down" if not redis_up else ("ok" if alive else "degraded")
    return {
        "status": status,
        "redis": redis_up,
        "dispatcher_alive": alive,
        "reading_clients": readers,
        "consumers": len(consumers),
        "active_consumers": len(active),
        "stream_length": length,
        "pending": int(group["pending"]) if group and group.get("pending") is not None else None,
        "lag": int(lag) if lag is not None else None,
    }


async def health(client: Any, settings: Settings) -> dict[str, Any]:
    """Ask Redis (never raises: an unreachable Redis is status `down`)."""
    try:
        await client.ping()
    except (RedisError, OSError):
        return assess(False, None, [], None)
    try:
        length = int(await client.xlen(settings.stream))
        groups = await client.xinfo_groups(settings.stream)
        group = next((g for g in groups if g.get("name") == settings.group), None)
        consumers = await client.xinfo_consumers(settings.stream, settings.group) if group else []
    except ResponseError:  # no stream or group yet: no dispatcher ever started
        return assess(True, None, [], 0)
    except (RedisError, OSError):
        return assess(False, None, [], None)
    try:
        # On a Redis Cluster only the node that owns the stream sees its readers.
        where = {"target_nodes": client.get_node_from_key(settings.stream)} if is_cluster(client) else {}
        readers = reading_clients(await client.client_list(**where))
    except ResponseError:  # NOPERM: this Redis user may not list clients
        readers = 0
    except (RedisError, OSError):
        return assess(False, None, [], None)
    return assess(True, group, consumers, length, readers)
