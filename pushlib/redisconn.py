"""How every part of pushlib reaches Redis: the client factories and the one "Redis unavailable" error.

- `sync_client(url)`: redis-py, for the Kamailio SIP workers (one per process, after the fork,
  shared by `store.SyncStore`, `parked.ParkedCalls` and `credentials.Subscribers`) and the
  operator CLI. Short socket timeouts (`SIP_SOCKET_TIMEOUT`, 0.5 s by default) and one immediate
  reconnect on a connection error (a socket the server closed, e.g. after a restart), no retry
  after a timeout: a SIP worker never hangs on a dead or frozen Redis, and works again by itself
  as soon as Redis is back.
- `async_client(url)`: redis.asyncio, for the push dispatcher (`astore.AsyncStore`). Its socket
  timeout must exceed the dispatcher's XREADGROUP block time. A connection error is retried at
  once on a fresh connection, then twice more with a short backoff (`ASYNC_RETRIES`, at most
  ~0.3 s in all): a pooled connection that Redis closed (a restart, `CLIENT KILL`, an idle
  timeout) costs one reconnect, not the job (left pending until the reclaim sweep, past a
  call's window). Timeouts are not retried, and a Redis still down after the retries raises:
  the dispatcher's loop logs the outage and retries with its own pace.

Both decode replies to `str` (`decode_responses=True`), take user name and password from the URL,
and verify the server's certificate and host name for a rediss:// URL
(`settings.redis_connection_options`, which also refuses URLs that turn verification off).

Redis Cluster: a `redis+cluster://host:port[,host:port...]` (or `rediss+cluster://`) URL
(`settings.cluster_url`) gives redis-py's cluster clients (`redis.cluster.RedisCluster`,
`redis.asyncio.cluster.RedisCluster`) with the same timeouts, decoding, TLS verification and
credentials; every other URL gives the plain clients, exactly as before. A cluster client routes
each command by its key's hash slot, follows MOVED/ASK redirections, refreshes its view of the
cluster after a connection error, and runs EVALSHA on the node that owns the keys (a NOSCRIPT
there, e.g. on a replica just promoted, loads the script on every master and runs it again).
Its retries are redis-py's cluster retries, counted like the plain clients' (`SYNC_RETRIES`,
`ASYNC_RETRIES`), each after a fresh look at the cluster instead of a backoff, on a connection
error, CLUSTERDOWN or an uncovered slot; as on a plain client, never after a timeout (a node that
does not answer holds the caller once, not twice). Pipelines (not single commands) follow
redis-py's own cluster-pipeline retries, which also retry after a timeout.

`StoreUnavailable` is the one error every Redis-backed class raises when Redis cannot serve it:
`unavailable_on_error` (the sync side: every Redis failure, including a server refusing a
command) and `unavailable_on_connection_error` (the async side: connection failures and
timeouts only, and on a cluster the cluster-wide ones: CLUSTERDOWN, no reachable node, a slot
without a master; the dispatcher handles server errors such as NOGROUP itself) translate to it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis
import redis.asyncio as aredis
import redis.asyncio.cluster as acluster
import redis.cluster as scluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import (
    ClusterDownError,
    CrossSlotTransactionError,
    InvalidPipelineStack,
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from pushlib.settings import cluster_url, redis_connection_options

SIP_SOCKET_TIMEOUT = 0.5
DISPATCHER_SOCKET_TIMEOUT = 10.0
DISPATCHER_CONNECT_TIMEOUT = 2.0
# Retries of a command whose connection failed (async client): the first at once, on a new
# connection (the usual case: Redis closed the pooled one), then after ~0.1 s and ~0.2 s.
ASYNC_RETRIES = 3
ASYNC_RETRY_BASE = 0.05
ASYNC_RETRY_CAP = 0.2
# Retries of a SIP worker's command whose connection failed: one, at once.
SYNC_RETRIES = 1
# Connections per cluster node (async cluster client): redis-py's default (100) would fail
# commands with MaxConnectionsError under the dispatcher's concurrency; the plain client's pool
# is unbounded too.
ASYNC_CLUSTER_MAX_CONNECTIONS = 2**16

# What redis-py's cluster clients may retry (after refreshing their view of the cluster): not
# TimeoutError (see module doc).
_CLUSTER_RETRIED = (RedisConnectionError, ClusterDownError, SlotNotCoveredError)
# Cluster-wide failures: nothing serves the key now (no reachable node, CLUSTERDOWN/MASTERDOWN
# during a failover, a slot without a master, TRYAGAIN while a slot moves)...
_CLUSTER_OUTAGES = (ClusterDownError, TryAgainError, RedisClusterException)
# ...but a transaction over several slots or a malformed pipeline is a bug, never an outage.
_CLUSTER_MISUSE = (CrossSlotTransactionError, InvalidPipelineStack)


class StoreUnavailable(ConnectionError):
    """Redis could not be reached, did not answer in time, or (sync side) refused the command
    (READONLY after a failover, OOM, ...). Callers fail fast (e.g. SIP 500/503)."""


@contextmanager
def unavailable_on_connection_error(what: str) -> Iterator[None]:
    """Connection failures and timeouts inside the block raise StoreUnavailable; other Redis
    errors (a server's error reply) pass through."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise StoreUnavailable(f"redis unavailable during {what}: {exc}") from exc
    except _CLUSTER_MISUSE:
        raise
    except _CLUSTER_OUTAGES as exc:
        raise StoreUnavailable(f"redis cluster unavailable during {what}: {exc}") from exc


@contextmanager
def unavailable_on_error(what: str) -> Iterator[None]:
    """Every Redis failure inside the block raises StoreUnavailable. For SIP workers every
    failure is the same event (answer fast and go on), so a server error (READONLY, OOM,
    MISCONF) must not escape as something a route does not expect."""
    with unavailable_on_connection_error(what):
        try:
            yield
        except (RedisError, RedisClusterException) as exc:
            outage = isinstance(exc, (RedisConnectionError, RedisTimeoutError, *_CLUSTER_OUTAGES))
            if outage and not isinstance(exc, _CLUSTER_MISUSE):
                raise
            raise StoreUnavailable(f"redis refused {what}: {exc}") from exc


def sync_client(redis_url: str, timeout: float = SIP_SOCKET_TIMEOUT) -> Any:
    """A redis-py client (see module doc); `timeout` bounds both connecting and each reply.

    Typed as Any: redis-py's annotations return unions of bytes/str/awaitables that say nothing
    useful with decode_responses=True; results are converted at the call sites."""
    options = redis_connection_options(redis_url)  # first: refuses a bad URL without quoting it
    cluster = cluster_url(redis_url)
    if cluster is not None:
        node_url, nodes = cluster.node_url, cluster.nodes

        def build() -> scluster.RedisCluster:
            return _SyncCluster(
                url=node_url,
                startup_nodes=[scluster.ClusterNode(host, port)  # type: ignore[no-untyped-call]
                               for host, port in nodes[1:]],
                decode_responses=True,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), SYNC_RETRIES),  # only its count is used (module doc)
                **options,
            )

        return LazyCluster(build)
    return redis.Redis.from_url(
        redis_url,
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        # Only connection errors: redis-py's Retry would retry timeouts too by default, which
        # doubles the time a frozen Redis holds a SIP worker.
        retry=Retry(NoBackoff(), SYNC_RETRIES, supported_errors=(RedisConnectionError,)),
        **options,
    )


def async_client(
    redis_url: str,
    timeout: float = DISPATCHER_SOCKET_TIMEOUT,
    connect_timeout: float = DISPATCHER_CONNECT_TIMEOUT,
) -> Any:
    """A redis.asyncio client (see module doc). Typed as Any for the reason `sync_client` gives."""
    options = redis_connection_options(redis_url)
    cluster = cluster_url(redis_url)
    if cluster is not None:
        return _AsyncCluster.from_url(
            cluster.node_url,
            startup_nodes=[acluster.ClusterNode(host, port) for host, port in cluster.nodes[1:]],
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=connect_timeout,
            retry=async_retry(),  # only its count is used (module doc)
            max_connections=ASYNC_CLUSTER_MAX_CONNECTIONS,
            **options,
        )
    return aredis.Redis.from_url(
        redis_url,
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=connect_timeout,
        retry=async_retry(),
        **options,
    )


def is_cluster(client: Any) -> bool:
    """Whether `client` (from `sync_client` or `async_client`) talks to a Redis Cluster."""
    return isinstance(client, LazyCluster | scluster.RedisCluster | acluster.RedisCluster)


class LazyCluster:
    """`sync_client`'s Redis Cluster client, built on first use and built again after a failed
    build: redis-py's sync cluster client reads the cluster's layout in its constructor, and a
    SIP worker must start while the cluster is unreachable (and work once it is back), as it does
    with a plain client, which connects on first use. Every attribute is the cluster client's;
    `register_script` answers at once (the build happens on the script's first call)."""

    def __init__(self, build: Callable[[], scluster.RedisCluster]) -> None:
        self._build = build
        self._client: scluster.RedisCluster | None = None

    def cluster_client(self) -> scluster.RedisCluster:
        """The redis-py cluster client; raises (RedisClusterException, ...) when no node answers."""
        if self._client is None:
            self._client = self._build()
        return self._client

    def register_script(self, script: str) -> _LazyScript:
        return _LazyScript(self, script)

    def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            client.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cluster_client(), name)


class _LazyScript:
    """redis-py's Script (EVALSHA, loading the script on NOSCRIPT) on a LazyCluster's client."""

    def __init__(self, owner: LazyCluster, script: str) -> None:
        self._owner, self.script = owner, script
        self.sha = hashlib.sha1(script.encode()).hexdigest()
        self._script: Any = None

    def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = (), client: Any = None) -> Any:
        registered = self._owner.cluster_client()
        if self._script is None or self._script.registered_client is not registered:
            self._script = registered.register_script(self.script)
        return self._script(keys=keys, args=args, client=client)


class _SyncCluster(scluster.RedisCluster):
    """redis-py's cluster client, retrying what `_CLUSTER_RETRIED` lists (not timeouts)."""

    ERRORS_ALLOW_RETRY = _CLUSTER_RETRIED  # type: ignore[assignment]  # narrower on purpose


class _AsyncCluster(acluster.RedisCluster):
    """redis-py's asyncio cluster client, retrying what `_CLUSTER_RETRIED` lists (not timeouts)."""

    ERRORS_ALLOW_RETRY = _CLUSTER_RETRIED  # type: ignore[assignment]  # narrower on purpose


class _FirstAtOnce(ExponentialWithJitterBackoff):
    """No wait before the first retry (a fresh connection usually just works), then exponential
    backoff with jitter."""

    def compute(self, failures: int) -> float:
        return 0.0 if failures <= 1 else float(super().compute(failures - 1))


def async_retry() -> AsyncRetry:
    """The async client's retry policy (see module doc): connection errors only."""
    return AsyncRetry(_FirstAtOnce(cap=ASYNC_RETRY_CAP, base=ASYNC_RETRY_BASE), ASYNC_RETRIES,
                      supported_errors=(RedisConnectionError,))


__all__ = [
    "SIP_SOCKET_TIMEOUT",
    "LazyCluster",
    "StoreUnavailable",
    "async_client",
    "async_retry",
    "is_cluster",
    "sync_client",
    "unavailable_on_connection_error",
    "unavailable_on_error",
]
