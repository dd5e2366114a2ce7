from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from pushlib.sandbox.process import SandboxHandle, sandbox_process
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


@pytest.fixture(scope="session")
def sandbox() -> Iterator[SandboxHandle]:
    """One sandbox provider process for the session (tests/test_sandbox.py starts its own, since it
    resets registrations)."""
    with sandbox_process() as handle:
        yield handle


@pytest.fixture()
def sbx(sandbox: SandboxHandle) -> SandboxHandle:
    """The shared sandbox with its recorded pushes, behaviours and counters cleared."""
    sandbox.control.clear()
    return sandbox
