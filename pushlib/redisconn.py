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

`StoreUnavailable` is the one error every Redis-backed class raises when Redis cannot serve it:
`unavailable_on_error` (the sync side: every Redis failure, including a server refusing a
command) and `unavailable_on_connection_error` (the async side: connection failures and
timeouts only; the dispatcher handles server errors such as NOGROUP itself) translate to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
import redis.asyncio as aredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from pushlib.settings import redis_connection_options

SIP_SOCKET_TIMEOUT = 0.5
DISPATCHER_SOCKET_TIMEOUT = 10.0
DISPATCHER_CONNECT_TIMEOUT = 2.0
# Retries of a command whose connection failed (async client): the first at once, on a new
# connection (the usual case: Redis closed the pooled one), then after ~0.1 s and ~0.2 s.
ASYNC_RETRIES = 3
ASYNC_RETRY_BASE = 0.05
ASYNC_RETRY_CAP = 0.2


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


@contextmanager
def unavailable_on_error(what: str) -> Iterator[None]:
    """Every Redis failure inside the block raises StoreUnavailable. For SIP workers every
    failure is the same event (answer fast and go on), so a server error (READONLY, OOM,
    MISCONF) must not escape as something a route does not expect."""
    with unavailable_on_connection_error(what):
        try:
            yield
        except RedisError as exc:
            if isinstance(exc, RedisConnectionError | RedisTimeoutError):
                raise
            raise StoreUnavailable(f"redis refused {what}: {exc}") from exc


def sync_client(redis_url: str, timeout: float = SIP_SOCKET_TIMEOUT) -> Any:
    """A redis-py client (see module doc); `timeout` bounds both connecting and each reply.

    Typed as Any: redis-py's annotations return unions of bytes/str/awaitables that say nothing
    useful with decode_responses=True; results are converted at the call sites."""
    return redis.Redis.from_url(
        redis_url,
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        # Only connection errors: redis-py's Retry would retry timeouts too by default, which
        # doubles the time a frozen Redis holds a SIP worker.
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        **redis_connection_options(redis_url),
    )


def async_client(
    redis_url: str,
    timeout: float = DISPATCHER_SOCKET_TIMEOUT,
    connect_timeout: float = DISPATCHER_CONNECT_TIMEOUT,
) -> Any:
    """A redis.asyncio client (see module doc). Typed as Any for the reason `sync_client` gives."""
    return aredis.Redis.from_url(
        redis_url,
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=connect_timeout,
        retry=async_retry(),
        **redis_connection_options(redis_url),
    )


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
    "StoreUnavailable",
    "async_client",
    "async_retry",
    "sync_client",
    "unavailable_on_connection_error",
    "unavailable_on_error",
]
