"""The dispatcher end to end: real Redis, real sandbox providers, real ProviderPool and payloads."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis

from pushlib import schema
from pushlib.calls import call_key
from pushlib.dispatcher import Dispatcher, backoff_delay
from pushlib.models import (
    ApnsRequest,
    AppCredentials,
    Device,
    FcmMessage,
    Outcome,
    ParkedCall,
    Provider,
    PushJob,
    PushKind,
    PushParams,
    PushResult,
)
from pushlib.parked import ParkedCalls
from pushlib.settings import Settings, SettingsError
from pushlib.store import SyncStore
from pushsandbox.process import SandboxHandle
from tests.support import (
    ROOT,
    VENV_PYTHON,
    android,
    ios,
    run_dispatcher,
    stop_process,
    stored_device,
    stream_done,
)

READ_BLOCK_S = 0.5  # the dispatcher's blocking read
BUNDLE = "com.example.phone"
PROJECT = "example-phone"
DATA = {"call_id": "call-1", "caller_name": "Bob", "caller_number": "+15550100", "title": "Hello",
        "body": "A message", "message": "hi there", "sender": "Bob"}


@pytest.fixture()
def env(push_env: tuple[SandboxHandle, SyncStore, Settings]) -> tuple[SandboxHandle, SyncStore, Settings]:
    return push_env


def apns_token() -> str:
    return secrets.token_hex(32)


def fcm_token() -> str:
    return "fcm:" + secrets.token_urlsafe(40)


def job(kind: PushKind, aor: str, ttl: float = 30.0, **kw: Any) -> PushJob:
    return PushJob(uuid.uuid4().hex, kind, aor, time.time() + ttl, data=dict(DATA), created_at=time.time(), **kw)


def raw(cfg: Settings) -> Any:
    return redis.Redis.from_url(cfg.redis_url, decode_responses=True)


def app_status(cfg: Settings, provider: str, app_id: str) -> dict[str, Any]:
    store = SyncStore(cfg.redis_url, cfg)
    try:
        return store.app_status(provider, app_id)
    finally:
        store.close()


# --- every kind on every platform ---------------------------------------------------------------

# kind -> (iOS token field, topic suffix, push type, priority), Android priority; design.md §5.
WIRE = {
    PushKind.INCOMING_CALL: (("voip", ".voip", "voip", 10), "high"),
    PushKind.CANCEL_INCOMING_CALL: (("alert", "", "background", 5), "high"),
    PushKind.MISSED_CALL: (("alert", "", "alert", 10), "high"),
    PushKind.MESSAGE: (("alert", "", "alert", 10), "high"),
    PushKind.VOICEMAIL: (("alert", "", "alert", 5), "normal"),
    PushKind.REGISTRATION_REFRESH: (("alert", "", "background", 5), "normal"),
    PushKind.CUSTOM: (("alert", "", "alert", 10), None),
}


def test_every_kind_arrives_on_both_platforms(env: tuple[SandboxHandle, SyncStore, Settings]) -> None:
    sandbox, store, cfg = env
    aor = "sip:alice@example.com"
    voip, alert, fcm = apns_token(), apns_token(), fcm_token()
    store.save_device(ios(aor, "iphone", voip, alert))
    store.save_device(android(aor, "pixel", fcm))
    jobs = {kind: job(kind, aor) for kind in PushKind}
    for j in jobs.values():
        store.enqueue(j)

    d = run_dispatcher(cfg, lambda: stream_done(cfg))

    assert d.stats["delivered"] == 2 * len(PushKind)
    records = sandbox.control.pushes()
    assert len(records) == 2 * len(PushKind)
    apns = [r for r in records if r["provider"] == "apns"]
    for kind, ((which, suffix, push_type, priority), fcm_priority) in WIRE.items():
        [rec] = [r for r in apns if r["payload"].get("type") == kind.value]
        assert rec["token"] == (voip if which == "voip" else alert), kind
        assert (rec["topic"], rec["push_type"], int(rec["priority"])) == (BUNDLE + suffix, push_type, priority)
        [msg] = [r for r in records if r["provider"] == "fcm" and r["payload"]["data"]["type"] == kind.value]
        assert msg["token"] == fcm and msg["project_id"] == PROJECT
        if fcm_priority is not None:
            assert msg["payload"]["android"]["priority"] == fcm_priority, kind
    r = raw(cfg)
    assert all(r.exists(schema.sent_key(aor, j.job_id, dev)) for j in jobs.values() for dev in ("iphone", "pixel"))


def test_voip_only_iphone_gets_no_missed_call_and_it_is_said_once(
    env: tuple[SandboxHandle, SyncStore, Settings], caplog: pytest.LogCaptureFixture
) -> None:
    sandbox, store, cfg = env
    aor = "sip:vo@example.com"
    store.save_device(ios(aor, "iphone", apns_token(), None))
    for kind in (PushKind.MISSED_CALL, PushKind.CANCEL_INCOMING_CALL, PushKind.MESSAGE):
        store.enqueue(job(kind, aor))
    with caplog.at_level(logging.WARNING, logger="pushlib.dispatcher"):
        run_dispatcher(cfg, lambda: stream_done(cfg))
    assert sandbox.control.pushes() == []
    lines = [r.getMessage() for r in caplog.records if "VoIP token only" in r.getMessage()]
    assert len(lines) == 1 and "device=iphone" in lines[0]


def test_job_for_chosen_devices_only(env: tuple[SandboxHandle, SyncStore, Settings]) -> None:
    sandbox, store, cfg = env
    aor = "sip:bob@example.com"
    one, two = fcm_token(), fcm_token()
    store.save_device(android(aor, "one", one))
    store.save_device(android(aor, "two", two))
    store.enqueue(job(PushKind.MESSAGE, aor, device_ids=("two",)))
    run_dispatcher(cfg, lambda: stream_done(cfg))
    assert [p["token"] for p in sandbox.control.pushes()] == [two]


# --- outcomes ----------------------------------------------------------------------------------


def test_dead_tokens_disappear_and_a_device_without_any_is_dead(env: tuple[SandboxHandle, SyncStore, Settings]) -> None:
    sandbox, store, cfg = env
    aor = "sip:carol@example.com"
    voip, alert, fcm = apns_token(), apns_token(), fcm_token()
    store.save_device(ios(aor, "iphone", voip, alert))
    store.save_device(android(aor, "pixel", fcm))
    sandbox.control.set_behaviour(voip, 410, "Unregistered")
    sandbox.control.set_behaviour(fcm, 404, "UNREGISTERED")
    store.enqueue(job(PushKind.INCOMING_CALL, aor))

    d = run_dispatcher(cfg, lambda: stream_done(cfg))

    assert d.stats["token_dead"] == 2 and d.stats["retried"] == 0
    iphone = stored_device(store, aor, "iphone")
    assert iphone is not None and iphone.params.voip_token is None and iphone.params.alert_token == alert
    pixel = stored_device(store, aor, "pixel")  # its only token died: kept as a tombstone
    assert pixel is not None and pixel.dead and pixel.params.alert_token is None
    assert sandbox.control.pushes() == []
    # The next call finds no VoIP token: it rings the alert token with a visible alert instead.
    store.enqueue(job(PushKind.INCOMING_CALL, aor))
    d2 = run_dispatcher(cfg, lambda: stream_done(cfg))
    assert d2.stats["delivered"] == 1 and d2.stats["no_token"] == 0 and d2.stats["dead_skipped"] == 1
    assert [(p["token"], p["push_type"]) for p in sandbox.control.pushes()] == [(alert, "alert")]


def test_suspect_devices_are_quarantined_and_the_app_flagged(
    env: tuple[SandboxHandle, SyncStore, Settings],
) -> None:
    sandbox, store, cfg = env
    aor = "sip:dave@example.com"
    tokens = [apns_token() for _ in range(6)]
    for i, tok in enumerate(tokens):
        store.save_device(ios(aor, f"d{i}", alert=tok))
        sandbox.control.set_behaviour(tok, 400, "BadDeviceToken", times=1)  # later pushes would succeed
    store.enqueue(job(PushKind.MESSAGE, aor, ttl=600))
    d = run_dispatcher(cfg, lambda: stream_done(cfg))
    assert d.stats["suspect"] == 6 and d.stats["retried"] == 0
    assert all((dev.quarantined_until > time.time() + 23 * 3600) for dev in store.devices(aor))
    status = app_status(cfg, "apns", BUNDLE)
    assert status["env_suspect"] and "BadDeviceToken" in status["env_suspect"]

    store.enqueue(job(PushKind.MESSAGE, aor, ttl=600))
    d2 = run_dispatcher(cfg, lambda: stream_done(cfg))
    assert d2.stats["quarantined_skipped"] == 6
    assert sandbox.control.pushes() == []  # nothing was sent to the quarantined devices

    store.save_device(ios(aor, "d0", alert=tokens[0]))  # d0 REGISTERs again: quarantine lifted
    store.enqueue(job(PushKind.MESSAGE, aor, ttl=600))
    d3 = run_dispatcher(cfg, lambda: stream_done(cfg))
    assert d3.stats["delivered"] == 1 and [p["token"] for p in sandbox.control.pushes()] == [tokens[0]]


def test_retryable_errors_are_retried_then_delivered(env: tuple[SandboxHandle, SyncStore, Settings]) -> None:
    sandbox, store, cfg = env
    aor = "sip:erin@example.com"
    alert, fcm = apns_token(), fcm_token()
    store.save_device(ios(aor, "iphone", alert=alert))
    store.save_device(android(aor, "pixel", fcm))
    sandbox.control.set_behaviour(alert, 429, "TooManyRequests", retry_after=1, times=1)
    sandbox.control.set_behaviour(fcm, 503, "UNAVAILABLE", times=2)
    store.enqueue(job(PushKind.MESSAGE, aor, ttl=600))

    d = run_dispatcher(cfg, lambda: stream_done(cfg))

    assert d.stats["retried"] == 3 and d.stats["delivered"] == 2
    assert len(sandbox.control.pushes(alert)) == 1 and len(sandbox.control.pushes(fcm)) == 1


def test_late_jobs_are_dropped_and_counted(env: tuple[SandboxHandle, SyncStore, Settings]) -> None:
    sandbox, store, cfg = env
    aor = "sip:frank@example.com"
    slow, failing = apns_token(), fcm_token()
    store.save_device(ios(aor, "iphone", voip=slow))
    store.save_device(android(aor, "pixel", failing))
    store.enqueue(job(PushKind.INCOMING_CALL, aor, ttl=-1))  # already too late when read
    d = run_dispatcher(cfg, lambda: stream_done(cfg))
    assert d.stats["deadline_dropped"] == 1 and d.stats["delivered"] == 0

    # Retries never go past the deadline: a provider that keeps failing gets the job dropped.
    sandbox.control.set_behaviour(failing, 503, "UNAVAILABLE", retry_after=5)
    sandbox.control.set_behaviour(slow, 503, "ServiceUnavailable", retry_after=5)
    store.enqueue(job(PushKind.INCOMING_CALL, aor, ttl=2))
    d2 = run_dispatcher(cfg, lambda: stream_done(cfg))
    assert d2.stats["deadline_dropped"] == 2 and d2.stats["retried"] == 0
    assert sandbox.control.pushes() == []


def test_configuration_errors_are_recorded_not_retried(env: tuple[SandboxHandle, SyncStore, Settings]) -> None:
    sandbox, store, cfg = env
    aor = "sip:grace@example.com"
    alert, fcm = apns_token(), fcm_token()
    store.save_device(ios(aor, "iphone", alert=alert))
    store.save_device(android(aor, "pixel", fcm))
    store.save_device(Device(aor, "unknown-app", PushParams(Provider.FCM, "no-such-project",
                                                            alert_token=fcm_token()),
                             registered_at=time.time(), expires_at=time.time() + 600))
    # One failure each: a retry would succeed and show up in the sandbox.
    sandbox.control.set_behaviour(alert, 403, "InvalidProviderToken", times=1)
    sandbox.control.set_behaviour(fcm, 403, "SENDER_ID_MISMATCH", times=1)
    store.enqueue(job(PushKind.MESSAGE, aor, ttl=600))

    d = run_dispatcher(cfg, lambda: stream_done(cfg))

    assert d.stats["config_error"] == 3 and d.stats["retried"] == 0
    assert sandbox.control.pushes() == []
    assert "403" in app_status(cfg, "apns", BUNDLE)["last_error"]
    assert "403" in app_status(cfg, "fcm", PROJECT)["last_error"]
    assert "no credentials" in app_status(cfg, "fcm", "no-such-project")["last_error"]


def test_a_device_naming_the_app_by_an_alias_is_pushed_to_the_project(
    env: tuple[SandboxHandle, SyncStore, Settings],
) -> None:
    """An FCM device's app id is its pn-param: the sender id or the package name resolves to the
    project's credentials; the push goes to the project's URL and counts for the project."""
    sandbox, store, cfg = env
    app = store.app("fcm", PROJECT)
    assert app is not None
    store.save_app(replace(app, aliases=("123456789012", "com.example.phone")))
    aor = "sip:ivan@example.com"
    by_sender, by_package = fcm_token(), fcm_token()
    now = time.time()
    for name, alias, tok in (("sender", "123456789012", by_sender), ("package", "com.example.phone", by_package)):
        store.save_device(Device(aor, name, PushParams(Provider.FCM, alias, alert_token=tok),
                                 registered_at=now, expires_at=now + 3600))
    store.enqueue(job(PushKind.INCOMING_CALL, aor))

    d = run_dispatcher(cfg, lambda: stream_done(cfg))

    assert d.stats["delivered"] == 2
    records = sandbox.control.pushes()
    assert sorted(r["token"] for r in records) == sorted([by_sender, by_package])
    assert all(r["project_id"] == PROJECT for r in records)
    assert app_status(cfg, "fcm", PROJECT)["counters"] == {"delivered": 2}
    assert app_status(cfg, "fcm", "123456789012")["counters"] == {}

    # a removed alias stops resolving: its devices get no push
    sandbox.control.clear()
    assert store.remove_app_alias("fcm", PROJECT, "123456789012")
    store.enqueue(job(PushKind.MESSAGE, aor))
    d2 = run_dispatcher(cfg, lambda: stream_done(cfg))
    assert d2.stats["config_error"] == 1 and d2.stats["delivered"] == 1
    assert [r["token"] for r in sandbox.control.pushes()] == [by_package]
    assert "no credentials" in app_status(cfg, "fcm", "123456789012")["last_error"]


def test_malformed_entries_are_acked_and_the_loop_goes_on(
    env: tuple[SandboxHandle, SyncStore, Settings],
) -> None:
    sandbox, store, cfg = env
    aor = "sip:heidi@example.com"
    tok = fcm_token()
    store.save_device(android(aor, "pixel", tok))
    r = raw(cfg)
    r.xadd(cfg.stream, {"garbage": "1"})
    r.xadd(cfg.stream, {"job_id": "x", "kind": "incomingCall", "aor": aor, "deadline": "soon"})
    store.enqueue(job(PushKind.MESSAGE, aor))
    d = run_dispatcher(cfg, lambda: stream_done(cfg))
    assert d.stats["malformed"] == 2 and d.stats["delivered"] == 1
    assert len(sandbox.control.pushes(tok)) == 1


def test_non_finite_deadlines_are_malformed_entries_never_pushed(
    env: tuple[SandboxHandle, SyncStore, Settings],
) -> None:
    sandbox, store, cfg = env
    aor = "sip:ivan@example.com"
    tok = fcm_token()
    store.save_device(android(aor, "pixel", tok))
    r = raw(cfg)
    for deadline in ("nan", "inf", "-inf"):  # NaN never compares as late; inf would never expire
        r.xadd(cfg.stream, {"job_id": f"x-{deadline}", "kind": "messageReceived", "aor": aor,
                            "deadline": deadline, "data": "{}"})
    r.xadd(cfg.stream, {"job_id": "y", "kind": "messageReceived", "aor": aor,
                        "deadline": repr(time.time() + 30), "created_at": "nan", "data": "{}"})
    d = run_dispatcher(cfg, lambda: stream_done(cfg))
    assert d.stats["malformed"] == 4 and d.stats["delivered"] == 0
    assert sandbox.control.pushes(tok) == []


# --- claims, stop, crash ------------------------------------------------------------------------


class SlowPool:
    """A ProviderPool stand-in: every push succeeds after `delay` seconds; calls are counted."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.calls: list[tuple[str, float]] = []

    async def send(self, app: AppCredentials, device: Device, request: ApnsRequest | FcmMessage,
                   timeout: float) -> PushResult:
        self.calls.append((device.device_id, time.time()))
        await asyncio.sleep(self.delay)
        return PushResult(Outcome.DELIVERED, 200)

    async def aclose(self) -> None:
        return None


def test_live_work_is_not_stolen_by_another_dispatchers_reclaim(
    env: tuple[SandboxHandle, SyncStore, Settings],
) -> None:
    _, store, cfg = env
    cfg = Settings(redis_url=cfg.redis_url, reclaim_idle_ms=200, concurrency=4)
    aor = "sip:ivan@example.com"
    store.save_device(android(aor, "pixel", fcm_token()))
    store.enqueue(job(PushKind.MESSAGE, aor))
    pool = SlowPool(delay=1.5)  # far longer than reclaim_idle_ms

    async def main() -> tuple[Dispatcher, Dispatcher]:
        stop = asyncio.Event()
        a, b = (Dispatcher(cfg, pool=pool, consumer=name) for name in ("a", "b"))  # type: ignore[arg-type]
        tasks = [asyncio.create_task(x.run(stop)) for x in (a, b)]
        while not await asyncio.to_thread(stream_done, cfg):
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*tasks)
        return a, b

    a, b = asyncio.run(main())
    assert len(pool.calls) == 1  # both dispatchers swept for idle entries during the 1.5 s push
    assert a.stats["delivered"] + b.stats["delivered"] == 1


def test_graceful_stop_finishes_in_flight_pushes(env: tuple[SandboxHandle, SyncStore, Settings]) -> None:
    _, store, cfg = env
    aor = "sip:judy@example.com"
    store.save_device(android(aor, "pixel", fcm_token()))
    store.enqueue(job(PushKind.MESSAGE, aor))
    pool = SlowPool(delay=1.0)
    d = run_dispatcher(cfg, lambda: len(pool.calls) == 1, pool=pool)  # stop as soon as the push starts
    assert d.stats["delivered"] == 1 and stream_done(cfg)


def test_redis_coming_back_empty_recreates_the_group(env: tuple[SandboxHandle, SyncStore, Settings]) -> None:
    """A Redis restart without persistence loses the stream and its group: the running
    dispatcher must recreate the group and go on delivering, not stop reading."""
    sandbox, store, cfg = env
    token = apns_token()
    state = {"flushed": False}

    def until() -> bool:
        if not state["flushed"]:
            r = raw(cfg)
            r.flushall()  # what a restart without persistence looks like to the dispatcher
            r.close()
            state["flushed"] = True
            store.save_app(sandbox.control.apns_token_app(BUNDLE))
            store.save_device(ios("sip:eve@example.com", "iphone", alert=token))
            time.sleep(READ_BLOCK_S + 0.5)  # let the blocked read fail with NOGROUP first
            store.enqueue(job(PushKind.MISSED_CALL, "sip:eve@example.com"))
            return False
        return len(sandbox.control.pushes(token)) >= 1

    run_dispatcher(cfg, until)
    pushes = sandbox.control.pushes(token)
    assert len(pushes) == 1 and pushes[0]["payload"]["type"] == "missedCall"


def test_backoff_grows_with_jitter_and_honours_retry_after() -> None:
    import random

    rng = random.Random(7)
    delays = [backoff_delay(n, None, rng) for n in range(1, 9)]
    assert all(0.25 * 2 ** (n - 1) <= d <= 0.5 * 2 ** (n - 1) or d <= 30 for n, d in enumerate(delays, 1))
    assert max(delays) <= 30 and delays[0] <= 0.5 < delays[3]
    assert backoff_delay(1, 7.0, rng) == 7.0


# --- iOS devices without a VoIP token: the alert-style call push is repeated while the call is parked -----


def park(store: SyncStore, call: PushJob, devices: tuple[str, ...]) -> str:
    """Park `call` as the router does (`ParkedCalls.park`); returns its parked-call hash key."""
    key = call_key(call.data["call_id"])
    parked = ParkedCall(call.aor, key, call.data["call_id"], "1", "Bob", "+15550100", call.deadline, devices)
    assert ParkedCalls(store.client).park(parked, time.time())
    return schema.call_key(call.aor, key)


def end_jobs(call: PushJob, reason: str) -> list[PushJob]:
    """The cancel and missed-call jobs of `call`, as `calls.end_of_call_jobs` queues them."""
    now, data = time.time(), {"call_id": call.data["call_id"], "callee": call.aor}
    return [
        PushJob(uuid.uuid4().hex, PushKind.CANCEL_INCOMING_CALL, call.aor, now + 60, call.device_ids,
                {**data, "reason": reason}, now),
        PushJob(uuid.uuid4().hex, PushKind.MISSED_CALL, call.aor, now + 3600,
                data={**data, "caller_name": "Bob", "caller_number": "+15550100"}, created_at=now),
    ]


def run_until_pushes(cfg: Settings, sandbox: SandboxHandle, token: str, count: int,
                     then: Callable[[], None], linger: float = 2.5) -> Dispatcher:
    """Run a dispatcher until `token` got `count` pushes, call `then()` at once, go on `linger`
    seconds more (long enough for any further repeat to arrive), then stop."""
    state: dict[str, float] = {}

    def until() -> bool:
        if "at" not in state:
            if len(sandbox.control.pushes(token)) >= count:
                then()
                state["at"] = time.monotonic()
            return False
        return time.monotonic() - state["at"] >= linger

    return run_dispatcher(cfg, until)


def _repeat_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if " repeat=" in r.getMessage()]


@pytest.mark.parametrize("end", ["call-ended", "device-woke"])
def test_alert_call_is_repeated_while_the_call_is_parked_for_the_device(
    env: tuple[SandboxHandle, SyncStore, Settings], caplog: pytest.LogCaptureFixture, end: str
) -> None:
    sandbox, store, cfg = env
    cfg = replace(cfg, call_alert_repeat=1.0)
    aor, token = "sip:rita@example.com", apns_token()
    store.save_device(ios(aor, "iphone", alert=token))  # an app that registered its alert token only
    call = job(PushKind.INCOMING_CALL, aor, device_ids=("iphone",))
    hash_key = park(store, call, ("iphone",))
    store.enqueue(call)

    def call_ends() -> None:
        if end == "call-ended":
            store.client.delete(hash_key)  # what ParkedCalls.finish does
        else:
            assert ParkedCalls(store.client).wake(aor, "iphone") == [call_key("call-1")]

    with caplog.at_level(logging.INFO, logger="pushlib.dispatcher"):
        d = run_until_pushes(cfg, sandbox, token, 3, call_ends)

    pushes = sandbox.control.pushes(token)
    assert len(pushes) == 3, pushes  # the push and two repeats, and none after the end
    assert pushes[2]["time"] - pushes[0]["time"] <= 2.5
    for p in pushes:
        assert (p["topic"], p["push_type"], int(p["priority"])) == (BUNDLE, "alert", 10)
        assert p["collapse_id"] == "call-1" and p["expiration"] == int(call.deadline)
        assert p["payload"]["type"] == "incomingCall" and p["payload"]["call_id"] == "call-1"
        assert p["payload"]["aps"]["alert"] == {"title": "Incoming call", "body": "Bob (+15550100)"}
    assert len({p["payload"]["sent_at"] for p in pushes}) == 3  # each one built afresh
    assert d.stats["repeated"] == 2 and d.stats["delivered"] == 3
    lines = _repeat_lines(caplog)
    assert len(lines) == 2 and all("outcome=delivered" in line and "device=iphone" in line for line in lines)
    assert "repeat=1" in lines[0] and "repeat=2" in lines[1]
    assert token not in " ".join(lines)


@pytest.mark.parametrize("case", ["no-parked-call", "voip-device", "repeat-off"])
def test_alert_call_is_not_repeated(
    env: tuple[SandboxHandle, SyncStore, Settings], caplog: pytest.LogCaptureFixture, case: str
) -> None:
    sandbox, store, cfg = env
    cfg = replace(cfg, call_alert_repeat=0.0 if case == "repeat-off" else 1.0)
    aor, token = "sip:sam@example.com", apns_token()
    if case == "voip-device":
        store.save_device(ios(aor, "iphone", voip=token, alert=apns_token()))
    else:
        store.save_device(ios(aor, "iphone", alert=token))
    call = job(PushKind.INCOMING_CALL, aor, device_ids=("iphone",))
    if case != "no-parked-call":
        park(store, call, ("iphone",))
    store.enqueue(call)
    with caplog.at_level(logging.INFO, logger="pushlib.dispatcher"):
        d = run_until_pushes(cfg, sandbox, token, 1, lambda: None)
    [push] = sandbox.control.pushes(token)
    assert push["push_type"] == ("voip" if case == "voip-device" else "alert")
    assert d.stats["repeated"] == 0 and d.stats["delivered"] == 1 and _repeat_lines(caplog) == []


def test_end_of_call_jobs_stop_the_repeats_and_the_missed_call_alert_comes_last(
    env: tuple[SandboxHandle, SyncStore, Settings],
) -> None:
    sandbox, store, cfg = env
    cfg = replace(cfg, call_alert_repeat=1.0)
    aor, token = "sip:tom@example.com", apns_token()
    store.save_device(ios(aor, "iphone", alert=token))
    call = job(PushKind.INCOMING_CALL, aor, device_ids=("iphone",))
    park(store, call, ("iphone",))  # still parked: only the end-of-call jobs stop the repeats
    store.enqueue(call)

    def call_ends() -> None:
        for end in end_jobs(call, "timeout"):
            store.enqueue(end)

    d = run_until_pushes(cfg, sandbox, token, 2, call_ends)
    pushes = sandbox.control.pushes(token)
    assert [p["payload"]["type"] for p in pushes] == [
        "incomingCall", "incomingCall", "cancelIncomingCall", "missedCall"]
    assert {p["collapse_id"] for p in pushes} == {"call-1"}
    cancel, missed = pushes[2], pushes[3]
    assert (cancel["push_type"], int(cancel["priority"])) == ("alert", 10)
    assert cancel["payload"]["aps"] == {"alert": {"title": "Call ended", "body": "Not answered"},
                                        "interruption-level": "passive"}
    assert missed["payload"]["aps"]["alert"] == {"title": "Missed Call", "body": "Bob (+15550100)"}
    assert d.stats["repeated"] == 1 and stream_done(cfg)


def test_stopping_the_dispatcher_cancels_the_repeats(env: tuple[SandboxHandle, SyncStore, Settings]) -> None:
    sandbox, store, cfg = env
    cfg = replace(cfg, call_alert_repeat=1.0)
    aor, token = "sip:uma@example.com", apns_token()
    store.save_device(ios(aor, "iphone", alert=token))
    call = job(PushKind.INCOMING_CALL, aor, device_ids=("iphone",))
    park(store, call, ("iphone",))
    store.enqueue(call)
    d = run_until_pushes(cfg, sandbox, token, 1, lambda: None, linger=0.0)
    assert not d._repeat_tasks and not d._repeats
    time.sleep(1.5)
    assert len(sandbox.control.pushes(token)) == 1


def test_call_alert_repeat_setting_comes_from_the_environment() -> None:
    assert Settings().call_alert_repeat == 10.0
    assert Settings.from_env({"PUSHLIB_CALL_ALERT_REPEAT": "2.5"}).call_alert_repeat == 2.5
    assert Settings.from_env({"PUSHLIB_CALL_ALERT_REPEAT": "0"}).call_alert_repeat == 0.0
    with pytest.raises(SettingsError, match="PUSHLIB_CALL_ALERT_REPEAT"):
        Settings.from_env({"PUSHLIB_CALL_ALERT_REPEAT": "nan"})


def _pushes_by_token(sandbox: SandboxHandle) -> dict[str, list[float]]:
    seen: dict[str, list[float]] = {}
    for p in sandbox.control.pushes():
        seen.setdefault(p["token"], []).append(float(p["time"]))
    return seen


def _start_worker(cfg: Settings, consumer: str, log_path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PUSHLIB_RECLAIM_IDLE_MS=str(cfg.reclaim_idle_ms),
               PUSHLIB_STREAM=cfg.stream, PUSHLIB_GROUP=cfg.group)
    with log_path.open("ab") as out:
        return subprocess.Popen(
            [str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable, "-m", "pushlib.dispatcher",
             "--redis-url", cfg.redis_url, "--consumer", consumer, "--concurrency", str(cfg.concurrency)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )


def _wait(cond: Callable[[], bool], limit: float) -> bool:
    end = time.monotonic() + limit  # safety bound only; the assertions decide
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


def test_crash_mid_flight_loses_nothing_and_duplicates_only_in_the_window(
    env: tuple[SandboxHandle, SyncStore, Settings],
) -> None:
    sandbox, store, cfg = env
    cfg = Settings(redis_url=cfg.redis_url, reclaim_idle_ms=1000, concurrency=40)
    tokens = [apns_token() for _ in range(200)]
    job_of: dict[str, tuple[str, str, str]] = {}
    for i, tok in enumerate(tokens):
        aor = f"sip:user{i}@example.com"
        store.save_device(ios(aor, "iphone", alert=tok))
        sandbox.control.set_behaviour(tok, 200, delay=0.4)  # slow successes: many in flight at the kill
        j = job(PushKind.MESSAGE, aor, ttl=600)
        job_of[tok] = (aor, j.job_id, "iphone")
        store.enqueue(j)

    workdir = Path(tempfile.mkdtemp(prefix="pn-dispatch-"))
    first = second = None
    try:
        first = _start_worker(cfg, "first", workdir / "first.log")
        assert _wait(lambda: len(sandbox.control.pushes()) >= 60, 30), (workdir / "first.log").read_text()
        os.kill(first.pid, signal.SIGKILL)
        first.wait(5)
        # Let requests the first dispatcher wrote before dying land, then take the boundary.
        counts = [-1]

        def settled() -> bool:
            counts.append(len(sandbox.control.pushes()))
            return counts[-1] == counts[-2]

        _wait(settled, 5)
        kill_time = time.time()
        r = raw(cfg)
        accepted = _pushes_by_token(sandbox)
        in_flight = {t for t in accepted if not r.exists(schema.sent_key(*job_of[t]))}
        assert 0 < len(accepted) < len(tokens)
        assert len(in_flight) <= cfg.concurrency

        second = _start_worker(cfg, "second", workdir / "second.log")
        assert _wait(lambda: stream_done(cfg), 60), (workdir / "second.log").read_text()
        stop_process(second)
        assert second.returncode == 0

        seen = _pushes_by_token(sandbox)
        assert set(seen) == set(tokens)  # every job delivered at least once
        duplicates = {t for t, times in seen.items() if len(times) > 1}
        assert duplicates <= in_flight, "a push already marked sent was sent again"
        assert all(len(seen[t]) == 2 and seen[t][0] < kill_time for t in duplicates)
        assert all(r.exists(schema.sent_key(*job_of[t])) for t in tokens)
        assert r.xlen(cfg.stream) == 0 and r.xpending(cfg.stream, cfg.group)["pending"] == 0
    finally:
        for proc in (first, second):
            if proc is not None:
                stop_process(proc)
        shutil.rmtree(workdir, ignore_errors=True)
