"""Integration: Redis outage and Kamailio restart (wait window 30 s, as in production)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.support import (
    DOMAIN,
    SipClient,
    Stack,
    apns_token,
    fcm_token,
    push_kind,
    push_stack,
    redis_server,
    rfc8599_apns_contact,
    rfc8599_fcm_contact,
    sipp_caller,
    sipp_device,
    stop_all_sipp,
    wait_log,
)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # AUTH_FAIL_OPEN_INVITE: SIPp's caller claims our domain; the default (503 while Redis is down)
    # is tested in test_kamailio_security.py
    with redis_server() as srv, push_stack(auth=True, wait_window=30, awake_window=2, redis=srv,
                                           extra_defines={"AUTH_FAIL_OPEN_INVITE": None}) as s:
        yield s


@pytest.fixture(autouse=True)
def keep_log(stack: Stack, tmp_path: Path) -> Iterator[None]:
    yield
    stop_all_sipp()
    (tmp_path / "kamailio.log").write_text(stack.kamailio.log())


def _user() -> str:
    return "r" + uuid.uuid4().hex[:10]


def register(stack: Stack, user: str, contact: str, transport: str = "udp") -> int:
    password = stack.passwords.get(user) or stack.add_user(user)
    with SipClient(stack.kamailio.port, transport) as c:
        return c.register(user, contact, password=password).status


def asleep(stack: Stack, user: str) -> None:
    for d in stack.store.devices(f"sip:{user}@{DOMAIN}"):
        stack.store.save_device(replace(d, registered_at=time.time() - 3600))


def test_redis_down_480_at_once_plain_contacts_still_called_then_recovery(stack: Stack, tmp_path: Path) -> None:
    pushed_user, desk_user, tok = _user(), _user(), fcm_token()
    assert register(stack, pushed_user, rfc8599_fcm_contact(5970, tok)) == 200
    desk = sipp_device(tmp_path, "udp")
    assert register(stack, desk_user, f"<sip:desk@127.0.0.1:{desk.port}>") == 200
    time.sleep(2.5)  # past the awake window: the phone's app sleeps

    stack.redis.stop()
    try:
        started = time.monotonic()
        caller = sipp_caller(tmp_path, stack.kamailio.port, pushed_user, "udp")
        assert caller.wait(25) == 0, caller.logs()
        elapsed = time.monotonic() - started
        assert caller.final_codes() == [480]
        assert elapsed < 5.0, f"480 took {elapsed:.1f}s with Redis down"  # the explicit bound
        call_desk = sipp_caller(tmp_path, stack.kamailio.port, desk_user, "tcp")
        assert call_desk.wait(30) == 0 and call_desk.final_codes() == [200]
        assert desk.wait(10) == 0
        with SipClient(stack.kamailio.port) as c:
            r = c.register(pushed_user, rfc8599_fcm_contact(5971, tok), password=stack.passwords[pushed_user])
        # A worker without the credentials cached cannot check them: 503. One with them cached saves
        # the binding (Redis degrades push, never SIP) and logs that the device record waits.
        assert (r.status, r.reason) in ((503, "Credentials Store Unavailable"), (200, "OK")), r
        if r.status == 200:
            wait_log(stack.kamailio, "device-store-unavailable")
    finally:
        stack.redis.start_again()

    # Redis is back (empty: no persistence in tests): service recovers without a Kamailio restart
    stack.store.save_app(stack.apns_app)
    stack.store.save_app(stack.fcm_app)
    for user, password in list(stack.passwords.items()):
        stack.add_user(user, password)
    assert register(stack, pushed_user, rfc8599_fcm_contact(5970, tok)) == 200
    asleep(stack, pushed_user)
    stack.sandbox.control.clear()  # type: ignore[attr-defined]
    caller = sipp_caller(tmp_path, stack.kamailio.port, pushed_user, "udp", scenario="caller-cancel.xml",
                         args=["-d", "1000"])
    assert caller.wait(20) == 0, caller.logs()
    kinds = sorted(push_kind(p) for p in stack.wait_pushes(tok, 3, timeout=15))
    assert kinds == ["cancelIncomingCall", "incomingCall", "missedCall"]


def test_redis_down_while_parked_caller_cancel_still_gets_487(stack: Stack, tmp_path: Path) -> None:
    """Ending a parked call needs no Redis: Call-ID and CSeq are in the shared-memory entry."""
    stack.store.save_app(stack.fcm_app)  # (again: the Redis of this module may have been restarted)
    user, tok = _user(), fcm_token()
    assert register(stack, user, rfc8599_fcm_contact(5972, tok)) == 200
    asleep(stack, user)
    caller = sipp_caller(tmp_path, stack.kamailio.port, user, "udp", scenario="caller-cancel.xml",
                         args=["-d", "2500"])
    assert [push_kind(p) for p in stack.wait_pushes(tok, 1)] == ["incomingCall"]  # parked
    stack.redis.stop()
    try:
        assert caller.wait(15) == 0, caller.logs() + caller.messages()[-3000:]  # 200 + 487
        wait_log(stack.kamailio, "end-state-unavailable")
    finally:
        stack.redis.start_again()


def test_sleeping_phone_survives_kamailio_restart(stack: Stack, tmp_path: Path) -> None:
    stack.store.save_app(stack.apns_app)  # (again: the Redis of this module may have been restarted)
    user, tok = _user(), apns_token()
    phone = sipp_device(tmp_path, "tcp")
    contact = rfc8599_apns_contact(phone.port, tok, "tcp", instance=str(uuid.uuid4()))
    assert register(stack, user, contact, "tcp") == 200
    asleep(stack, user)
    stack.kamailio.restart()  # usrloc is empty now; the Redis device store still knows the phone
    wait_log(stack.kamailio, "pusher: dispatcher-start", since=stack.kamailio.starts)
    caller = sipp_caller(tmp_path, stack.kamailio.port, user, "tcp")
    pushes = stack.wait_pushes(tok, 1)
    assert [p["push_type"] for p in pushes] == ["voip"]
    assert register(stack, user, contact, "tcp") == 200
    assert caller.wait(30) == 0 and caller.final_codes() == [200]
    assert phone.wait(15) == 0 and phone.received("INVITE") == 1
