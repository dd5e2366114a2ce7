"""Integration: Redis goes away while a pushed phone wakes (issue "Faults and crowds", item 5).

The rule the README states: Redis degrades push, never SIP. The woken phone's REGISTER keeps its
binding and gets 200 (it has just been given the call), the call goes on, and what the call's end
owes Redis (its record, the cancel push to the device that never woke) waits in shared memory and
is sent once Redis is back, with the deadlines of the moment the call ended.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    DOMAIN,
    SipClient,
    Stack,
    apns_token,
    asleep,
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
    # without auth: with auth a woken REGISTER needs the credentials in Redis, or in the cache of
    # the worker it lands on (503 otherwise: test_kamailio_resilience.py)
    with redis_server() as srv, push_stack(auth=False, wait_window=30, awake_window=2, redis=srv) as s:
        yield s


@pytest.fixture(autouse=True)
def keep_log(stack: Stack, tmp_path: Path) -> Iterator[None]:
    yield
    stop_all_sipp()
    (tmp_path / "kamailio.log").write_text(stack.kamailio.log())


def test_phone_woken_while_redis_is_down_keeps_its_call_and_the_end_pushes_follow(
        stack: Stack, tmp_path: Path) -> None:
    user = "w" + uuid.uuid4().hex[:10]
    phone_tok, tablet_tok = apns_token(), fcm_token()
    phone = sipp_device(tmp_path, "tcp")
    phone_contact = rfc8599_apns_contact(phone.port, phone_tok, "tcp", instance=str(uuid.uuid4()))
    with SipClient(stack.kamailio.port, "tcp") as c:
        assert c.register(user, phone_contact).status == 200
    with SipClient(stack.kamailio.port, "udp") as c:  # a second device that never wakes
        assert c.register(user, rfc8599_fcm_contact(5990, tablet_tok)).status == 200
    asleep(stack, user)

    caller = sipp_caller(tmp_path, stack.kamailio.port, user, "udp", args=["-d", "500"])
    assert [push_kind(p) for p in stack.wait_pushes(phone_tok, 1)] == ["incomingCall"]
    assert [push_kind(p) for p in stack.wait_pushes(tablet_tok, 1)] == ["incomingCall"]
    since = len(stack.kamailio.log())
    stack.store.client.save()  # (a restarted Redis reloads it: the call record survives)
    stack.redis.stop()
    try:
        with SipClient(stack.kamailio.port, "tcp") as c:
            r = c.register(user, phone_contact)
        assert (r.status, r.reason) == (200, "OK"), r  # the binding stands: the phone has the call
        assert caller.wait(20) == 0 and caller.final_codes() == [200], caller.logs()[-2000:]
        assert phone.wait(10) == 0, phone.logs()[-2000:]
        log = stack.kamailio.log()[since:]
        assert "device-store-unavailable" in log and "kept=binding" in log
        wait_log(stack.kamailio, "end-state-unavailable")
        time.sleep(3)  # a retry or two while Redis is still away
    finally:
        stack.redis.start_again()

    # the tablet never woke: its cancel push arrives once Redis is back; the phone, which answered,
    # gets none, and an answered call owes nobody a missed-call push
    pushes = stack.wait_pushes(tablet_tok, 2, timeout=15)
    assert [push_kind(p) for p in pushes] == ["incomingCall", "cancelIncomingCall"]
    time.sleep(1)
    assert [push_kind(p) for p in stack.pushes(phone_tok)] == ["incomingCall"]
    ended = wait_log(stack.kamailio, "jobs=cancelIncomingCall attempt=")
    assert f"aor=sip:{user}@{DOMAIN}" in ended and "attempt=0" not in ended, ended  # settled by a retry
