"""The HTTP API on loopback, with what it needs, for the API tests and `make demo-api`.

- `api_process(redis_url)`: `pushlib-api` (as `python -m pushlib.api`) on a free loopback port.
- `dispatcher_process(redis_url)`: a standalone `pushlib-dispatcher`.
- `api_stack()`: redis-server + the sandbox providers (an APNs token-auth app and an FCM app
  registered and stored) + a dispatcher + the API, and an operator-wide admin key.

Every process runs in its own session and is stopped by PID (also when start-up fails half way);
temp dirs are removed.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from harness.localrun import RedisServer, free_port, redis_server, stop_process, wait_for_port
from harness.sipua import BUNDLE, FCM_PROJECT, TEAM
from pushlib.apikeys import ApiKeyStore, Scope
from pushlib.models import AppCredentials
from pushlib.redisconn import async_client
from pushlib.settings import Settings
from pushlib.store import SyncStore
from pushsandbox.process import SandboxHandle, sandbox_process


@dataclass
class Proc:
    """A started process; its output goes to `log`."""

    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def _process(argv: list[str], env: Mapping[str, str], log: Path) -> Iterator[Proc]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **env}, start_new_session=True)
    try:
        yield Proc(proc, log)
    finally:
        stop_process(proc, timeout=10)


@contextmanager
def api_process(redis_url: str, workdir: Path, env: Mapping[str, str] | None = None) -> Iterator[tuple[str, Proc]]:
    """(base URL, process) of a `pushlib-api` on a free loopback port, once it accepts connections."""
    port = free_port()
    argv = [sys.executable, "-m", "pushlib.api", "--host", "127.0.0.1", "--port", str(port)]
    with _process(argv, {"PUSHLIB_REDIS_URL": redis_url, **(env or {})}, workdir / f"api-{port}.log") as p:
        try:
            wait_for_port(port, timeout=20)
        except TimeoutError:
            raise RuntimeError("pushlib-api did not start:\n" + p.output()[-3000:]) from None
        yield f"http://127.0.0.1:{port}", p


@contextmanager
def dispatcher_process(redis_url: str, workdir: Path) -> Iterator[Proc]:
    argv = [sys.executable, "-m", "pushlib.dispatcher", "--redis-url", redis_url, "--log-level", "INFO"]
    with _process(argv, {}, workdir / "dispatcher.log") as p:
        yield p


def create_key(redis_url: str, scopes: frozenset[Scope], tenant: str | None = None, name: str = "") -> str:
    """A new API key's token (what `pushlib-admin keys create` does)."""

    async def run() -> str:
        client = async_client(redis_url)
        try:
            token, _ = await ApiKeyStore(client).create(scopes, tenant, name)
            return token
        finally:
            await client.aclose()

    return asyncio.run(run())


def wait_healthy(url: str, timeout: float = 20.0) -> None:
    """Wait until the API's /health says ok (Redis up, a dispatcher consuming)."""
    end = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{url}/health", timeout=5)
        if r.status_code == 200 or time.monotonic() > end:
            break
        time.sleep(0.1)
    if r.status_code != 200:
        raise RuntimeError(f"the API stack is not healthy: {r.text}")


@dataclass
class ApiStack:
    redis: RedisServer
    sandbox: SandboxHandle
    store: SyncStore
    apns_app: AppCredentials
    fcm_app: AppCredentials
    url: str
    api: Proc
    dispatcher: Proc
    admin_token: str
    workdir: Path

    def wait_pushes(self, token: str, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Pushes the sandbox received for `token`, once there are `count` (or at `timeout`)."""
        end = time.monotonic() + timeout
        while True:
            got = self.sandbox.control.pushes(token)
            if len(got) >= count or time.monotonic() > end:
                return got
            time.sleep(0.05)


@contextmanager
def api_stack(api_env: Mapping[str, str] | None = None) -> Iterator[ApiStack]:
    """Redis + sandbox (apps stored) + dispatcher + API, all on loopback (see module doc)."""
    with ExitStack() as es:
        workdir = Path(es.enter_context(tempfile.TemporaryDirectory(prefix="pn-api-")))
        srv = es.enter_context(redis_server())
        sandbox = es.enter_context(sandbox_process())
        store = SyncStore(srv.url, Settings(redis_url=srv.url), timeout=2.0)
        es.callback(store.close)
        apns_app = sandbox.control.apns_token_app(BUNDLE, TEAM)
        fcm_app = sandbox.control.fcm_app(FCM_PROJECT)
        store.save_app(apns_app)
        store.save_app(fcm_app)
        dispatcher = es.enter_context(dispatcher_process(srv.url, workdir))
        url, api = es.enter_context(api_process(srv.url, workdir, api_env))
        token = create_key(srv.url, frozenset({Scope.ADMIN}), name="stack admin")
        wait_healthy(url)
        yield ApiStack(srv, sandbox, store, apns_app, fcm_app, url, api, dispatcher, token, workdir)
