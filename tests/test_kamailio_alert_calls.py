"""Integration: iOS apps that registered an alert (remote-notification) token only, on real Kamailio.

Kazoo's sample REGISTER (`app-id=org.myorg.myapp;pn-type=apple;pn-tok=<token>` read through a
User-Agent mapping; Kazoo's pusher docs) and an RFC 8599 `pn-param` without `.voip` store no
VoIP token: such a phone is rung with a visible alert push (`payloads`), repeated every second
here (`PUSHLIB_CALL_ALERT_REPEAT=1`) while the call waits for it, and the alert is replaced by
the cancel and missed-call alerts of the same `apns-collapse-id`.

One stack per module (KEMI mode, push role, auth on; wait window 4 s, awake window 10 s), like
tests/test_kamailio_flows.py. The UA mapping is stored before Kamailio starts (the workers load
the mappings at start); the app `org.myorg.myapp` is registered with the sandbox and stored
(the proxy refuses REGISTERs for apps it does not serve).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pushlib.models import Provider, UaMapping
from pushlib.settings import Settings
from pushlib.store import SyncStore
from tests.support import (
    BUNDLE,
    DOMAIN,
    TEAM,
    Stack,
    apns_token,
    asleep,
    push_kind,
    push_stack,
    redis_server,
    register,
    sipp_caller,
    sipp_device,
)

WAIT = 4.0
REPEAT = 1.0
KAZOO_APP = "org.myorg.myapp"
KAZOO_UA = "MyApp iOS 1.0"
# Kazoo: `User-Agents.MyApp = {"regex": "^MyApp", "properties": {"Token-App": "app-id",
# "Token-Type": "pn-type", "Token-ID": "pn-tok"}}` (the mapping's defaults)
KAZOO_MAPPING = UaMapping("MyApp", "^MyApp")


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables for what starts inside the block (Kamailio copies them)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with redis_server() as srv:
        pre = SyncStore(srv.url, Settings(redis_url=srv.url))
        try:
            pre.save_ua_mapping(KAZOO_MAPPING)
        finally:
            pre.close()
        with contextlib.ExitStack() as es:
            with _environ(PUSHLIB_CALL_ALERT_REPEAT=str(REPEAT)):
                s = es.enter_context(push_stack(auth=True, wait_window=WAIT, awake_window=10, redis=srv))
            s.store.save_app(s.handle.control.apns_token_app(KAZOO_APP, TEAM))
            yield s


def _user() -> str:
    return "a" + uuid.uuid4().hex[:10]


def _call_pushes(stack: Stack, token: str, call_id: object) -> list[dict[str, Any]]:
    return [p for p in stack.pushes(token) if p["payload"].get("call_id") == call_id]


def _assert_ringing_alert(push: dict[str, Any], topic: str, aor: str) -> None:
    assert (push["provider"], push["topic"], push["push_type"], int(push["priority"])) == (
        "apns", topic, "alert", 10)
    assert push_kind(push) == "incomingCall"
    payload = push["payload"]
    assert payload["aps"]["alert"]["title"] == "Incoming call"
    assert "Alice Caller" in payload["aps"]["alert"]["body"]
    assert payload["aps"]["sound"] == "default" and payload["aps"]["interruption-level"] == "time-sensitive"
    assert payload["callee"] == aor and payload["caller_name"] == "Alice Caller"
    assert push["collapse_id"] == payload["call_id"]  # a SIPp Call-ID is short printable ASCII
    # expires at the wait window's end, which the payload's deadline names too
    assert push["expiration"] == int(payload["deadline"])
    assert 0 < payload["deadline"] - push["time"] <= WAIT + 1


def test_kazoo_alert_only_iphone_is_rung_by_alert_answers_and_then_misses_a_call(
    stack: Stack, tmp: Path
) -> None:
    user, tok = _user(), apns_token()
    aor = f"sip:{user}@{DOMAIN}"
    dev = sipp_device(tmp, "udp")
    contact = f"<sip:{user}@127.0.0.1:{dev.port};app-id={KAZOO_APP};pn-type=apple;pn-tok={tok}>;reg-id=1"
    r = register(stack, user, contact, "udp", user_agent=KAZOO_UA)
    assert r.status == 200, r.raw[:300]
    assert r.header("Feature-Caps") == ['*;+sip.pns="apns"']
    [device] = stack.store.devices(aor)
    assert (device.params.provider, device.params.app_id) == (Provider.APNS, KAZOO_APP)
    assert device.params.alert_token == tok and device.params.voip_token is None
    asleep(stack, user)

    # 1. a call: the phone rings by alert, wakes (re-REGISTERs) and answers
    caller = sipp_caller(tmp, stack.kamailio.port, user, "udp")
    [ring] = stack.wait_pushes(tok, 1, kind="incomingCall")
    _assert_ringing_alert(ring, KAZOO_APP, aor)
    assert register(stack, user, contact, "udp", user_agent=KAZOO_UA).status == 200  # woken
    assert caller.wait(30) == 0, caller.logs()
    assert caller.final_codes() == [200]
    assert dev.wait(15) == 0, dev.logs()
    assert dev.received("INVITE") == 1
    time.sleep(REPEAT + 0.5)  # a repeat would have come by now: the woken phone gets none, nor a cancel
    assert [push_kind(p) for p in stack.pushes(tok)] == ["incomingCall"]

    # 2. a call nobody answers: the ringing alert is repeated, then replaced by the cancel and the
    # missed-call alerts of the same collapse id
    asleep(stack, user)
    caller = sipp_caller(tmp, stack.kamailio.port, user, "udp")
    assert caller.wait(WAIT + 10) == 0, caller.logs()
    assert caller.final_codes() == [480]
    [missed] = stack.wait_pushes(tok, 1, kind="missedCall")
    call_id = missed["payload"]["call_id"]
    assert call_id != ring["payload"]["call_id"]
    pushes = _call_pushes(stack, tok, call_id)
    kinds = [push_kind(p) for p in pushes]
    rings = [p for p in pushes if push_kind(p) == "incomingCall"]
    assert len(rings) >= 2 and kinds[:len(rings)] == ["incomingCall"] * len(rings), kinds  # repeated
    assert kinds[len(rings):] == ["cancelIncomingCall", "missedCall"], kinds  # the missed call last
    for p in rings:
        _assert_ringing_alert(p, KAZOO_APP, aor)
    assert {p["collapse_id"] for p in pushes} == {call_id} != {ring["collapse_id"]}
    cancel = pushes[len(rings)]
    assert (cancel["push_type"], int(cancel["priority"]), cancel["topic"]) == ("alert", 10, KAZOO_APP)
    assert cancel["payload"]["aps"] == {"alert": {"title": "Call ended", "body": "Not answered"},
                                        "interruption-level": "passive"}
    assert missed["push_type"] == "alert" and missed["payload"]["aps"]["alert"]["title"] == "Missed Call"
    assert "Alice Caller" in missed["payload"]["aps"]["alert"]["body"]


def test_rfc8599_remote_only_iphone_caller_hangs_up(stack: Stack, tmp: Path) -> None:
    user, tok = _user(), apns_token()
    aor = f"sip:{user}@{DOMAIN}"
    contact = (f"<sip:dev@127.0.0.1:5988;transport=udp;pn-provider=apns;pn-param={TEAM}.{BUNDLE};"
               f"pn-prid={tok}>")
    assert register(stack, user, contact, "udp").status == 200
    [device] = stack.store.devices(aor)
    assert device.params.alert_token == tok and device.params.voip_token is None
    asleep(stack, user)
    caller = sipp_caller(tmp, stack.kamailio.port, user, "udp", scenario="caller-cancel.xml",
                         args=["-d", "800"])
    assert caller.wait(20) == 0, caller.logs() + caller.messages()[-3000:]
    [missed] = stack.wait_pushes(tok, 1, kind="missedCall")
    pushes = _call_pushes(stack, tok, missed["payload"]["call_id"])
    kinds = [push_kind(p) for p in pushes]
    assert kinds[0] == "incomingCall" and kinds[-2:] == ["cancelIncomingCall", "missedCall"], kinds
    _assert_ringing_alert(pushes[0], BUNDLE, aor)
    assert len({p["collapse_id"] for p in pushes}) == 1
    assert pushes[-2]["payload"]["aps"]["alert"] == {"title": "Call ended", "body": "The caller hung up"}
    assert "sound" not in pushes[-2]["payload"]["aps"]
    assert "Alice Caller" in json.dumps(missed["payload"]["aps"])


def test_kazoo_docs_sample_with_push_params_as_contact_header_params(stack: Stack, tmp_path: Path) -> None:
    """Kazoo's docs sample, verbatim in form: the legacy push params after the `>`."""
    user, tok = _user(), apns_token()
    contact = f"<sip:{user}@127.0.0.1:5987>;reg-id=1;app-id={KAZOO_APP};pn-tok={tok};pn-type=apple"
    assert register(stack, user, contact, "udp", user_agent=KAZOO_UA).status == 200
    [device] = stack.store.devices(f"sip:{user}@{DOMAIN}")
    assert device.params.alert_token == tok
    asleep(stack, user)
    caller = sipp_caller(tmp_path, stack.kamailio.port, user, "udp")
    [push] = stack.wait_pushes(tok, 1, kind="incomingCall")
    _assert_ringing_alert(push, KAZOO_APP, f"sip:{user}@{DOMAIN}")
    assert caller.wait(WAIT + 10) == 0 and caller.final_codes() == [480]
