from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.support import RedisServer, redis_server


@pytest.fixture(scope="session")
def redis_srv() -> Iterator[RedisServer]:
    """One private redis-server for the whole test session."""
    with redis_server() as server:
        yield server


@pytest.fixture()
def redis_url(redis_srv: RedisServer) -> Iterator[str]:
    """The shared server, flushed before each test that asks for it."""
    client = redis.Redis.from_url(redis_srv.url)
    client.flushall()
    client.close()
    yield redis_srv.url
