"""Faults never cost a call: the dispatcher across a Redis restart, a dispatcher killed with call
pushes in flight, and devices whose every token died. Real redis-server and sandbox on loopback."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from pushlib import schema
from pushlib.astore import AsyncStore
from pushlib.dispatcher import Dispatcher
from pushlib.models import PushJob, PushKind
from pushlib.settings import Settings
from pushlib.store import SyncStore
from pushsandbox.process import SandboxHandle
from tests.support import ROOT, VENV_PYTHON, RedisServer, android, ios, redis_server, stop_process, stored_device

BUNDLE = "com.example.phone"
PROJECT = "example-phone"
DATA = {"call_id": "call-1", "caller_name": "Bob", "caller_number": "+15550100"}


def call_job(aor: str, ttl: float = 30.0) -> PushJob:
    """An incomingCall job with the default wait window as its deadline."""
    data = dict(DATA, call_id=uuid.uuid4().hex)
    return PushJob(uuid.uuid4().hex, PushKind.INCOMING_CALL, aor, time.time() + ttl, data=data,
                   created_at=time.time())


def raw(url: str) -> Any:
    return redis.Redis.from_url(url, decode_responses=True)


def stream_done(cfg: Settings) -> bool:
    r = raw(cfg.redis_url)
    try:
        groups = {g["name"]: g for g in r.xinfo_groups(cfg.stream)} if r.exists(cfg.stream) else {}
        return cfg.group in groups and r.xlen(cfg.stream) == 0 and groups[cfg.group]["pending"] == 0
    finally:
        r.close()


def wait(cond: Callable[[], bool], limit: float) -> bool:
    end = time.monotonic() + limit  # safety bound only; the assertions decide
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def seed(sandbox: SandboxHandle, store: SyncStore, aor: str, token: str) -> None:
    store.save_app(sandbox.control.apns_token_app(BUNDLE))
    store.save_device(ios(aor, "iphone", voip=token))


@pytest.fixture()
def own_redis() -> Iterator[RedisServer]:
    """A private redis-server this test may stop and start again."""
    with redis_server() as server:
        yield server


# --- 1. the first call after a Redis restart ------------------------------------------------------


@pytest.mark.timeout(90)
def test_first_call_after_a_redis_restart_is_pushed_at_once(sbx: SandboxHandle, own_redis: RedisServer) -> None:
    """Redis restarts (without persistence) under a running dispatcher: the dispatcher's pooled
    connections were closed by the old server. The first call job after Redis is back must be
    pushed at once, not left pending until the reclaim sweep (past the call's window)."""
    cfg = Settings(redis_url=own_redis.url, concurrency=32)  # the default reclaim idle time
    aor = "sip:restart@example.com"
    warm, first = secrets.token_hex(32), secrets.token_hex(32)
    times: dict[str, float] = {}

    def scenario() -> None:
        store = SyncStore(cfg.redis_url, cfg)
        try:
            seed(sbx, store, aor, warm)
            # Several calls at once: the dispatcher's pool holds several connections, as in production.
            for _ in range(5):
                store.enqueue(call_job(aor))
            assert wait(lambda: len(sbx.control.pushes(warm)) == 5 and stream_done(cfg), 15)
            own_redis.stop()
            time.sleep(1.0)  # the dispatcher sees the outage
            own_redis.start_again()
            times["up"] = time.monotonic()
            seed(sbx, store, aor, first)  # Redis came back empty
            store.enqueue(call_job(aor))
            if wait(lambda: bool(sbx.control.pushes(first)), 10):
                times["pushed"] = time.monotonic()
        finally:
            store.close()

    run_with_dispatcher(cfg, scenario)
    assert "pushed" in times, "no push within 10 s of Redis coming back"
    delay = times["pushed"] - times["up"]
    print(f"first push {delay:.2f} s after Redis was back")
    assert delay < 5.0


def run_with_dispatcher(cfg: Settings, scenario: Callable[[], None], **kw: Any) -> Dispatcher:
    """Run `scenario()` in a thread while one in-process dispatcher runs; stop it afterwards."""
    dispatcher = Dispatcher(cfg, consumer="test-" + uuid.uuid4().hex[:6], **kw)

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(dispatcher.run(stop))
        try:
            await asyncio.to_thread(scenario)
        finally:
            stop.set()
            await task

    asyncio.run(main())
    return dispatcher


# --- 2. a dispatcher killed with call pushes in flight ------------------------------------------


def _start_worker(cfg: Settings, consumer: str, log_path: Path) -> subprocess.Popen[bytes]:
    """A standalone dispatcher with the default reclaim idle time."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHLIB_")}
    env.update(PYTHONPATH=str(ROOT), PUSHLIB_STREAM=cfg.stream, PUSHLIB_GROUP=cfg.group)
    with log_path.open("ab") as out:
        return subprocess.Popen(
            [str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable, "-m", "pushlib.dispatcher",
             "--redis-url", cfg.redis_url, "--consumer", consumer, "--concurrency", str(cfg.concurrency)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )


def _pending_of(cfg: Settings, consumer: str) -> int:
    r = raw(cfg.redis_url)
    try:
        for c in r.xinfo_consumers(cfg.stream, cfg.group):
            if c["name"] == consumer:
                return int(c["pending"])
        return 0
    except redis.ResponseError:
        return 0
    finally:
        r.close()


def _readers(cfg: Settings) -> int:
    """Redis clients whose last command was a read of the job stream (one per reading dispatcher)."""
    r = raw(cfg.redis_url)
    try:
        return sum(1 for c in r.client_list() if c.get("cmd") == "xreadgroup")
    finally:
        r.close()


@pytest.mark.timeout(120)
def test_a_killed_dispatchers_call_pushes_are_taken_over_before_their_deadline(
    sbx: SandboxHandle, redis_url: str,
) -> None:
    """Two dispatchers on one group with the default settings; one is SIGKILLed while it holds
    slow call pushes. The other delivers them within a few seconds, well before the calls'
    deadline (the default 30 s wait window)."""
    cfg = Settings(redis_url=redis_url, concurrency=16)
    store = SyncStore(redis_url, cfg)
    store.save_app(sbx.control.apns_token_app(BUNDLE))
    tokens = [secrets.token_hex(32) for _ in range(5)]
    jobs: dict[str, PushJob] = {}
    for i, token in enumerate(tokens):
        aor = f"sip:killed{i}@example.com"
        store.save_device(ios(aor, "iphone", voip=token))
        sbx.control.set_behaviour(token, 200, delay=60, times=1)  # the first attempt hangs
        jobs[token] = call_job(aor)

    workdir = Path(tempfile.mkdtemp(prefix="pn-killed-"))
    victim = survivor = None
    try:
        victim = _start_worker(cfg, "victim", workdir / "victim.log")
        assert wait(lambda: _readers(cfg) == 1, 15), (workdir / "victim.log").read_text()
        for token in tokens:
            store.enqueue(jobs[token])
        # Every push is in flight at the sandbox, held by the victim.
        assert wait(lambda: all(sbx.control.pushes(t) for t in tokens) and _pending_of(cfg, "victim") == 5, 15)
        survivor = _start_worker(cfg, "survivor", workdir / "survivor.log")
        assert wait(lambda: "starting" in (workdir / "survivor.log").read_text() and _readers(cfg) >= 2, 15), (
            workdir / "survivor.log").read_text()
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(5)
        killed_at = time.time()

        assert wait(lambda: stream_done(cfg), 20), (workdir / "survivor.log").read_text()[-3000:]
        r = raw(redis_url)
        try:
            assert all(r.exists(schema.sent_key(jobs[t].aor, jobs[t].job_id, "iphone")) for t in tokens)
        finally:
            r.close()
        delays = []
        for token in tokens:
            times = sorted(float(p["time"]) for p in sbx.control.pushes(token))
            assert len(times) == 2 and times[0] < killed_at < times[1], times  # the victim's, the survivor's
            assert times[1] < jobs[token].deadline
            delays.append(times[1] - killed_at)
        print(f"taken over {min(delays):.2f}-{max(delays):.2f} s after the kill")
        assert max(delays) < 10.0  # the goal is a few seconds; the deadline is 30 s away
    finally:
        for proc in (victim, survivor):
            if proc is not None:
                stop_process(proc)
        store.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.timeout(60)
def test_live_slow_pushes_are_not_stolen_with_the_default_idle_time(sbx: SandboxHandle, redis_url: str) -> None:
    """Two live dispatchers with the default settings and pushes slower than the reclaim idle
    time: the owner keeps refreshing its claims, so each push is sent exactly once."""
    cfg = Settings(redis_url=redis_url, concurrency=8)
    store = SyncStore(redis_url, cfg)
    store.save_app(sbx.control.apns_token_app(BUNDLE))
    idle_s = cfg.reclaim_idle_ms / 1000
    tokens = [secrets.token_hex(32) for _ in range(3)]
    for i, token in enumerate(tokens):
        aor = f"sip:slow{i}@example.com"
        store.save_device(ios(aor, "iphone", voip=token))
        sbx.control.set_behaviour(token, 200, delay=min(idle_s * 2, cfg.push_timeout - 2))
        store.enqueue(call_job(aor, ttl=60))

    async def main() -> list[Dispatcher]:
        stop = asyncio.Event()
        pair = [Dispatcher(cfg, consumer=name) for name in ("a", "b")]
        tasks = [asyncio.create_task(d.run(stop)) for d in pair]
        try:
            assert await asyncio.to_thread(wait, lambda: stream_done(cfg), idle_s * 6)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        return pair

    try:
        pair = asyncio.run(main())
    finally:
        store.close()
    assert sum(d.stats["delivered"] for d in pair) == 3
    assert all(len(sbx.control.pushes(t)) == 1 for t in tokens)


# --- 3. dead devices: tombstones ----------------------------------------------------------------


def test_a_device_whose_last_token_died_is_kept_as_a_dead_tombstone(redis_url: str) -> None:
    sync = SyncStore(redis_url, Settings())
    aor = "sip:tomb@example.com"
    voip, alert = secrets.token_hex(32), secrets.token_hex(32)
    sync.save_device(ios(aor, "iphone", voip, alert))
    key = schema.device_key(aor, "iphone")
    r = raw(redis_url)
    ttl_before = r.ttl(key)

    async def scenario() -> list[bool]:
        store = AsyncStore(redis_url, Settings())
        try:
            return [await store.remove_token(aor, "iphone", voip), await store.remove_token(aor, "iphone", alert),
                    await store.remove_token(aor, "iphone", alert)]
        finally:
            await store.aclose()

    try:
        assert asyncio.run(scenario()) == [True, True, False]
        left = stored_device(sync, aor, "iphone")
        assert left is not None and left.dead
        assert left.params.voip_token is None and left.params.alert_token is None
        assert r.hget(key, "dead") == "1"
        assert "voip_token" not in r.hgetall(key) and "alert_token" not in r.hgetall(key)
        assert 0 < r.ttl(key) <= ttl_before  # the record keeps its TTL: it expires as the binding does
        assert "iphone" in r.smembers(schema.devices_key(aor))
        # A later REGISTER of the same device replaces the record: alive again.
        sync.save_device(ios(aor, "iphone", voip=secrets.token_hex(32)))
        again = stored_device(sync, aor, "iphone")
        assert again is not None and not again.dead and r.hget(key, "dead") is None
    finally:
        r.close()
        sync.close()


def test_dead_devices_are_never_pushed(sbx: SandboxHandle, redis_url: str) -> None:
    cfg = Settings(redis_url=redis_url, concurrency=8)
    store = SyncStore(redis_url, cfg)
    store.save_app(sbx.control.apns_token_app(BUNDLE))
    store.save_app(sbx.control.fcm_app(PROJECT))
    aor = "sip:dead@example.com"
    dead_fcm, alive = "fcm:" + secrets.token_urlsafe(40), secrets.token_hex(32)
    store.save_device(android(aor, "pixel", dead_fcm))
    store.save_device(ios(aor, "iphone", alert=alive))
    sbx.control.set_behaviour(dead_fcm, 404, "UNREGISTERED")

    def scenario() -> None:
        store.enqueue(call_job(aor))
        assert wait(lambda: stream_done(cfg), 15)
        pixel = stored_device(store, aor, "pixel")
        assert pixel is not None and pixel.dead
        # A token that comes back to life at the provider changes nothing: the record holds none.
        sbx.control.clear_behaviours()
        store.enqueue(call_job(aor))
        assert wait(lambda: stream_done(cfg), 15)

    try:
        d = run_with_dispatcher(cfg, scenario)
    finally:
        store.close()
    assert d.stats["token_dead"] == 1 and d.stats["dead_skipped"] == 1
    assert d.stats["delivered"] == 2
    assert sbx.control.pushes(dead_fcm) == []
    assert len(sbx.control.pushes(alive)) == 2


def test_dead_round_trips_through_the_schema() -> None:
    device = ios("sip:x@example.com", "d1", voip="ab" * 32)
    encoded = schema.encode_device(device)
    assert "dead" not in encoded and schema.decode_device(encoded).dead is False
    tomb = schema.decode_device({**{k: v for k, v in encoded.items() if k != "voip_token"}, "dead": "1"})
    assert tomb.dead and tomb.params.voip_token is None
    from dataclasses import replace
    assert schema.encode_device(replace(device, dead=True))["dead"] == "1"


def test_admin_devices_shows_a_dead_device(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    from pushlib.cli import main

    sync = SyncStore(redis_url, Settings())
    aor = "sip:listed@example.com"
    token = "fcm:" + secrets.token_urlsafe(40)
    sync.save_device(android(aor, "pixel", token))
    sync.save_device(ios(aor, "iphone", voip=secrets.token_hex(32)))

    async def kill_token() -> None:
        store = AsyncStore(redis_url, Settings())
        try:
            assert await store.remove_token(aor, "pixel", token)
        finally:
            await store.aclose()

    try:
        asyncio.run(kill_token())
    finally:
        sync.close()
    assert main(["--redis-url", redis_url, "devices", "listed@example.com"]) == 0
    lines = {line.split("\t")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["pixel"].endswith(" dead") and "tokens=\t" in lines["pixel"]
    assert "dead" not in lines["iphone"]
