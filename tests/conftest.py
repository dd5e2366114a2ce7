from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from harness.localstack import BUNDLE, FCM_PROJECT, Stack, stop_all_sipp
from pushlib.logutil import QUIET_LOGGERS
from pushlib.settings import Settings
from pushlib.store import SyncStore
from pushsandbox.process import SandboxHandle, sandbox_process
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
def push_env(sandbox: SandboxHandle, redis_url: str) -> Iterator[tuple[SandboxHandle, SyncStore, Settings]]:
    """A clean sandbox and Redis, with one APNs (token auth) and one FCM app saved (dispatcher tests)."""
    sandbox.control.clear()
    cfg = Settings(redis_url=redis_url, reclaim_idle_ms=1000, concurrency=32)
    store = SyncStore(redis_url, cfg)
    store.save_app(sandbox.control.apns_token_app(BUNDLE))
    store.save_app(sandbox.control.fcm_app(FCM_PROJECT))
    yield sandbox, store, cfg
    store.close()


@pytest.fixture()
def sbx(sandbox: SandboxHandle) -> SandboxHandle:
    """The shared sandbox with its recorded pushes, behaviours and counters cleared."""
    sandbox.control.clear()
    return sandbox


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Entry points under test (CLI, dispatcher main, ksrlog) set up logging: put the root logger and
    the quiet HTTP/2 loggers back as pytest had them."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    names = (*QUIET_LOGGERS, "hpack.hpack", "h2.connection", "httpcore.http2")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    for name, old in levels.items():
        logging.getLogger(name).setLevel(old)


@pytest.fixture()
def tmp(stack: Stack, tmp_path: Path) -> Iterator[Path]:
    """A test's temp dir for SIPp runs against its module's `stack`; afterwards every SIPp run is
    stopped and the proxy's own lines are printed (pytest shows them only when the test failed)."""
    yield tmp_path
    stop_all_sipp()
    (tmp_path / "kamailio.log").write_text(stack.kamailio.log())
    print("\n".join(line for line in stack.kamailio.log().splitlines()
                    if "pusher" in line or "ERROR" in line or "push job" in line)[-6000:])
