"""A tour of every push kind: Redis + sandbox providers + one dispatcher, on loopback.

An iPhone (APNs, VoIP + alert tokens) and an Android phone (FCM) of one user get one job of
each push kind through the real path (job stream → dispatcher → HTTP/2 → sandbox); the tour
prints what the sandbox received. Run: `python -m harness.demo_pushes`.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
import uuid
from typing import Any

from harness.localrun import redis_server
from harness.sipua import BUNDLE, TEAM
from harness.sipua import FCM_PROJECT as PROJECT
from pushlib.aor import aor_of
from pushlib.dispatcher import Dispatcher
from pushlib.models import Device, Provider, PushJob, PushKind, PushParams
from pushlib.settings import Settings
from pushlib.store import SyncStore
from pushsandbox.process import SandboxHandle, sandbox_process

AOR = aor_of("alice", "example.com")
SAMPLE_DATA: dict[PushKind, dict[str, str]] = {
    PushKind.INCOMING_CALL: {
        "call_id": "demo-call-1", "caller_name": "Bob \"the builder\" 🛠", "caller_number": "+15550100",
    },
    PushKind.CANCEL_INCOMING_CALL: {"call_id": "demo-call-1"},
    PushKind.MISSED_CALL: {"call_id": "demo-call-1", "caller_name": "Bob", "caller_number": "+15550100"},
    PushKind.VOICEMAIL: {"caller_name": "Bob", "caller_number": "+15550100"},
    PushKind.MESSAGE: {"sender": "Bob", "message": "Are you there? " * 3},
    PushKind.REGISTRATION_REFRESH: {},
    PushKind.CUSTOM: {"title": "Maintenance", "body": "Service restarts at 02:00", "ticket": "42"},
}


def _devices(now: float) -> list[Device]:
    iphone = PushParams(Provider.APNS, BUNDLE, voip_token=secrets.token_hex(32), alert_token=secrets.token_hex(32),
                        team_id=TEAM)
    android = PushParams(Provider.FCM, PROJECT, alert_token="fcm-" + secrets.token_urlsafe(100))
    return [
        Device(AOR, "iphone", iphone, registered_at=now, expires_at=now + 3600, user_agent="Demo iOS"),
        Device(AOR, "android", android, registered_at=now, expires_at=now + 3600, user_agent="Demo Android"),
    ]


def _describe(record: dict[str, Any]) -> str:
    payload = record.get("payload") or {}
    if record["provider"] == "apns":
        kind = payload.get("type", "?")
        return (f"apns  {kind:<20} topic={record['topic']} push-type={record['push_type']} "
                f"priority={record['priority']} expiration={record['expiration']}")
    data = payload.get("data", {})
    android = payload.get("android", {})
    return (f"fcm   {data.get('type', '?'):<20} project={record['project_id']} "
            f"priority={android.get('priority')} ttl={android.get('ttl')}")


async def _dispatch_until(settings: Settings, sandbox: SandboxHandle, expected: int, timeout: float) -> int:
    stop = asyncio.Event()
    task = asyncio.create_task(Dispatcher(settings).run(stop))
    end = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < end:
        seen = len(await asyncio.to_thread(sandbox.control.pushes))
        if seen >= expected:
            break
        await asyncio.sleep(0.1)
    stop.set()
    await task
    return seen


def main() -> int:
    now = time.time()
    with redis_server() as redis, sandbox_process() as sandbox:
        settings = Settings(redis_url=redis.url)
        store = SyncStore(redis.url, settings)
        store.save_app(sandbox.control.apns_token_app(BUNDLE))
        store.save_app(sandbox.control.fcm_app(PROJECT))
        for device in _devices(now):
            store.save_device(device)
        for kind, data in SAMPLE_DATA.items():
            store.enqueue(PushJob(str(uuid.uuid4()), kind, AOR, deadline=now + 30, data=data, created_at=now))
        # iOS gets no VoIP push for anything but a call; every kind reaches both phones otherwise.
        expected = 2 * len(SAMPLE_DATA)
        seen = asyncio.run(_dispatch_until(settings, sandbox, expected, timeout=20))
        for line in sorted(_describe(record) for record in sandbox.control.pushes()):
            print(line)
        store.close()
    if seen < expected:
        print(f"demo: only {seen} of {expected} pushes arrived", file=sys.stderr)
        return 1
    print(f"demo: {seen} pushes delivered through the dispatcher to the sandbox")
    return 0


if __name__ == "__main__":
    sys.exit(main())
