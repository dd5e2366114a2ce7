"""The one support module of the tests: what several test modules share.

The stack runner, SIPp runner and SIP test phone live in `harness` (the demo and the benchmarks use
them too); this module re-exports the names the tests use and keeps the test-only parts: the native
host config, `flagship_call()` (the demo flow with assertions), small SIP flow helpers
(`register`, `asleep`, `payload_data`), and the store reads and writes only tests need (production
has no caller for them: `stored_device`, `job_devices`, `mark_sent`, `record_outcome`). No test
module imports another.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import redis

from harness.localrun import ROOT, RedisServer, free_port, redis_server, stop_process, wait_for_port
from harness.localstack import (
    BUNDLE,
    DOMAIN,
    FCM_PROJECT,
    KAMAILIO_CFG,
    SCENARIOS,
    TEAM,
    KamailioProc,
    SippRun,
    Stack,
    _port_taken,
    _sipp,
    check_config,
    device_params,
    kamailio_process,
    push_kind,
    push_stack,
    pusher_defines,
    sipp_caller,
    sipp_device,
    sipp_events,
    stop_all_sipp,
    wait_log,
)
from harness.sipua import (
    SipClient,
    SipResponse,
    apns_token,
    fcm_token,
    parse_response,
    rfc8599_apns_contact,
    rfc8599_fcm_contact,
)
from harness.sipua import digest_authorization as _digest
from pushlib import schema
from pushlib.astore import AsyncStore
from pushlib.dispatcher import Dispatcher
from pushlib.models import Device, Outcome, Provider, PushParams
from pushlib.settings import Settings
from pushlib.store import SyncStore

NATIVE_HOST_CFG = ROOT / "tests" / "native-host.cfg"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"

__all__ = [
    "BUNDLE",
    "DOMAIN",
    "FCM_PROJECT",
    "KAMAILIO_CFG",
    "NATIVE_HOST_CFG",
    "ROOT",
    "SCENARIOS",
    "TEAM",
    "TLS_CFG",
    "VENV_PYTHON",
    "KamailioProc",
    "RedisServer",
    "SipClient",
    "SipResponse",
    "SippRun",
    "Stack",
    "_digest",
    "_port_taken",
    "_sipp",
    "android",
    "apns_token",
    "asleep",
    "check_config",
    "device_params",
    "fcm_token",
    "flagship_call",
    "free_port",
    "ios",
    "job_devices",
    "kamailio_process",
    "mark_sent",
    "parse_response",
    "payload_data",
    "push_kind",
    "push_stack",
    "pusher_defines",
    "record_outcome",
    "redis_server",
    "register",
    "rfc8599_apns_contact",
    "rfc8599_fcm_contact",
    "run_dispatcher",
    "sipp_caller",
    "sipp_device",
    "sipp_events",
    "stop_all_sipp",
    "stop_process",
    "stored_device",
    "stream_done",
    "wait_for_port",
    "wait_log",
]


# --------------------------------------------------------------------------- the flagship flow (demo)


def flagship_call(stack: Stack, transport: str = "tcp", user: str = "alice-phone") -> list[tuple[str, float]]:
    """The demo flow on a running stack: an iPhone-like device registers with RFC 8599 params and
    sleeps; a caller calls; the sandbox receives the VoIP push; the device wakes (re-REGISTERs with
    digest auth when the push arrives) and answers; the caller hangs up.

    Returns the timeline [(event, epoch seconds)] in order; raises AssertionError on any failure.
    """
    password = stack.passwords.get(user) or stack.add_user(user)
    token = apns_token()
    device = sipp_device(stack.tmpdir, transport)
    contact = rfc8599_apns_contact(device.port, token, transport, instance=str(uuid.uuid4()))
    with SipClient(stack.kamailio.port, transport) as c:
        r = c.register(user, contact, password=password)
    assert r.status == 200, f"REGISTER: {r.status} {r.reason}"
    aor = f"sip:{user}@{DOMAIN}"
    for d in stack.store.devices(aor):  # the app goes silent: its last REGISTER is long ago
        stack.store.save_device(replace(d, registered_at=time.time() - 3600))
    caller = sipp_caller(stack.tmpdir, stack.kamailio.port, user, transport, args=["-d", "500"])
    pushes = stack.wait_pushes(token, 1)
    assert pushes, "no push reached the sandbox"
    register_at = time.time()
    with SipClient(stack.kamailio.port, transport) as c:
        r = c.register(user, contact, password=password)
    assert r.status == 200, f"wake REGISTER: {r.status} {r.reason}"
    assert caller.wait(30) == 0 and caller.final_codes() == [200], caller.logs()[-2000:]
    assert device.wait(15) == 0, device.logs()[-2000:]
    caller_ev, device_ev = sipp_events(caller), sipp_events(device)
    log = stack.kamailio.log()
    timeline = [
        ("INVITE sent by caller", next(t for t, d, f in caller_ev if d == "sent" and f.startswith("INVITE"))),
        ("push received by sandbox", float(pushes[0]["time"])),
        ("REGISTER sent by woken device", register_at),
        ("INVITE received by device", next(t for t, d, f in device_ev if d == "received" and f.startswith("INVITE"))),
        ("200 OK received by caller", next(t for t, d, f in caller_ev if d == "received" and "200 OK" in f)),
        ("BYE answered", max(t for t, d, f in caller_ev if d == "received" and "200 OK" in f)),
    ]
    assert "pusher: park" in log and "pusher: wake" in log
    return timeline


# --------------------------------------------------------------------------- SIP flow helpers


def register(stack: Stack, user: str, contact: str, transport: str, **kw: Any) -> SipResponse:
    password = stack.passwords.get(user) or stack.add_user(user)
    with SipClient(stack.kamailio.port, transport) as c:
        return c.register(user, contact, password=password, **kw)


def asleep(stack: Stack, user: str) -> None:
    """Back-date every device of the user: it registered long ago and its app sleeps."""
    aor = f"sip:{user}@{DOMAIN}"
    for d in stack.store.devices(aor):
        stack.store.save_device(replace(d, registered_at=time.time() - 3600))


def payload_data(record: dict[str, object]) -> dict[str, object]:
    payload = record["payload"]
    assert isinstance(payload, dict)
    data = payload.get("data", payload)
    assert isinstance(data, dict)
    return data


# --------------------------------------------------------------------------- store reads and writes of the tests


def stored_device(store: SyncStore, aor: str, device_id: str) -> Device | None:
    """One device as the store holds it (None when absent or corrupt)."""
    raw = store.client.hgetall(schema.device_key(aor, device_id))
    return schema.decode_or_log(schema.decode_device, raw, aor, device_id) if raw else None


def ios(aor: str, name: str, voip: str | None = None, alert: str | None = None) -> Device:
    """A stored-form iOS device of the sandbox's APNs app (development environment), registered now."""
    now = time.time()
    return Device(aor, name, PushParams(Provider.APNS, BUNDLE, voip, alert, "TEAM000001", True),
                  registered_at=now, expires_at=now + 3600)


def android(aor: str, name: str, token: str) -> Device:
    """A stored-form Android device of the sandbox's FCM project, registered now."""
    now = time.time()
    return Device(aor, name, PushParams(Provider.FCM, FCM_PROJECT, alert_token=token),
                  registered_at=now, expires_at=now + 3600)


async def job_devices(
    store: AsyncStore, aor: str, job_id: str, device_ids: Sequence[str] = ()
) -> list[tuple[Device, bool]]:
    """`AsyncStore.job_devices_many` for one job."""
    return (await store.job_devices_many([(aor, job_id, device_ids)]))[0]


async def mark_sent(store: AsyncStore, aor: str, job_id: str, device_id: str) -> None:
    """`AsyncStore.mark_sent_many` for one (job, device)."""
    await store.mark_sent_many([(aor, job_id, device_id)])


async def record_outcome(
    store: AsyncStore, provider: str, app_id: str, outcome: Outcome, now: float | None = None
) -> bool:
    """`AsyncStore.record_outcomes` for one push outcome, as the dispatcher's flush would record it;
    True when this outcome flagged the app's environment as likely wrong."""
    now = time.time() if now is None else now
    bad = outcome is Outcome.DEVICE_SUSPECT
    app = (provider, app_id)
    flagged = await store.record_outcomes(
        {(provider, app_id, outcome.value): 1}, {app: [schema.window_entry(now, bad)]},
        check=[app] if bad else [], now=now,
    )
    return app in flagged


# --------------------------------------------------------------------------- an in-process dispatcher


def stream_done(cfg: Settings) -> bool:
    """Every entry reached its final outcome: acked entries are deleted, so nothing is left."""
    r = redis.Redis.from_url(cfg.redis_url, decode_responses=True)
    try:
        groups = {g["name"]: g for g in r.xinfo_groups(cfg.stream)} if r.exists(cfg.stream) else {}
        if cfg.group not in groups:
            return False  # no dispatcher has started consuming yet
        return bool(r.xlen(cfg.stream) == 0 and groups[cfg.group]["pending"] == 0)
    finally:
        r.close()


def run_dispatcher(cfg: Settings, until: Callable[[], bool], pool: Any = None, limit: float = 40.0,
                   **kw: Any) -> Dispatcher:
    """Run one dispatcher until `until()` holds (checked off the event loop), then stop it."""
    dispatcher = Dispatcher(cfg, pool=pool, consumer="test-" + uuid.uuid4().hex[:6], **kw)

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(dispatcher.run(stop))
        end = time.monotonic() + limit  # safety bound only; the assertions decide
        await asyncio.sleep(0.2)
        while time.monotonic() < end and not task.done() and not await asyncio.to_thread(until):
            await asyncio.sleep(0.1)
        stop.set()
        await task

    asyncio.run(main())
    return dispatcher


# Kamailio tls module configuration (the tested one; README "TLS and ports for real")
TLS_CFG = """\
[server:default]
method = TLSv1.2+
verify_certificate = no
require_certificate = no
certificate = {cert}
private_key = {key}

[client:default]
method = TLSv1.2+
verify_certificate = yes
require_certificate = yes
ca_list = {ca}
"""
