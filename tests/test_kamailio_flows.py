"""Integration: real Kamailio (KEMI mode, push role, auth on) + redis-server + sandbox + SIPp.

One stack per module (wait window 4 s so timeouts are quick; awake window 10 s). A device is a
SIPp UAS on port P plus a Python REGISTER sender whose Contact points at P. A device "goes to
sleep" by back-dating its last REGISTER in the store (as if it registered long ago).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.sipua import SipPhone, open_sip_socket
from tests.support import (
    DOMAIN,
    SipClient,
    Stack,
    apns_token,
    asleep,
    fcm_token,
    payload_data,
    push_kind,
    push_stack,
    register,
    rfc8599_apns_contact,
    rfc8599_fcm_contact,
    sipp_caller,
    sipp_device,
    sipp_events,
    wait_log,
)

WAIT = 4.0
TRANSPORTS = ["udp", "tcp"]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with push_stack(auth=True, wait_window=WAIT, awake_window=10) as s:
        yield s


def _user() -> str:
    return "u" + uuid.uuid4().hex[:10]


# --------------------------------------------------------------------------- REGISTER


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_register_saves_device_and_answers_feature_caps(stack: Stack, transport: str) -> None:
    user, tok = _user(), apns_token()
    r = register(stack, user, rfc8599_apns_contact(5999, tok, transport, instance=str(uuid.uuid4())), transport)
    assert r.status == 200
    assert r.header("Feature-Caps") == ['*;+sip.pns="apns"']
    devices = stack.store.devices(f"sip:{user}@{DOMAIN}")
    assert len(devices) == 1 and devices[0].params.voip_token == tok
    assert "pn-prid=" + tok in devices[0].contact


def test_register_fcm_and_plain(stack: Stack) -> None:
    user, tok = _user(), fcm_token()
    r = register(stack, user, rfc8599_fcm_contact(5998, tok), "udp")
    assert r.status == 200 and r.header("Feature-Caps") == ['*;+sip.pns="fcm"']
    r = register(stack, user, "<sip:desk@127.0.0.1:5997>", "udp")
    assert r.status == 200 and r.header("Feature-Caps") == ['*;+sip.pns="apns,fcm"']
    assert [d.params.alert_token for d in stack.store.devices(f"sip:{user}@{DOMAIN}")] == [tok]


def test_challenged_register_stores_nothing(stack: Stack) -> None:
    user = _user()
    stack.add_user(user)
    with SipClient(stack.kamailio.port) as c:
        r = c.register(user, rfc8599_apns_contact(5996, apns_token()))  # no password: challenge only
    assert r.status == 401
    with SipClient(stack.kamailio.port) as c:
        r = c.register(user, rfc8599_apns_contact(5996, apns_token()), password="wrong")
    assert r.status == 401
    assert stack.store.devices(f"sip:{user}@{DOMAIN}") == []


@pytest.mark.parametrize(
    ("contact", "status", "reason_part"),
    [
        ("<sip:d@127.0.0.1:5995;pn-provider=webpush;pn-param=x;pn-prid=abc>", 555, "Not Supported"),
        ("<sip:d@127.0.0.1:5995;pn-provider=apns;pn-param=TEAM000001.com.example.phone.voip;pn-prid=zz-not-hex>",
         400, ""),
        ("<sip:d@127.0.0.1:5995;pn-provider=apns;pn-param=TEAM000001.com.example.phone.voip;pn-prid="
         + "ab" * 2600 + ">", 400, ""),
        ("<sip:d@127.0.0.1:5995;pn-provider=apns;pn-prid=" + "ab" * 32 + ">", 400, ""),
    ],
    ids=["unknown-provider", "non-hex-token", "5kb-token", "missing-pn-param"],
)
def test_bad_push_params_rejected_and_nothing_stored(
    stack: Stack, contact: str, status: int, reason_part: str
) -> None:
    user = _user()
    r = register(stack, user, contact, "tcp")
    assert r.status == status, r.raw[:300]
    assert reason_part in r.reason
    assert r.reason.isascii() and 0 < len(r.reason) <= 80
    assert stack.store.devices(f"sip:{user}@{DOMAIN}") == []


def test_legacy_params_without_ua_mapping_register_as_plain_contact(stack: Stack) -> None:
    user = _user()
    contact = "<sip:d@127.0.0.1:5994;app-id=com.example.phone;pn-type=apple;pn-tok=" + "cd" * 32 + ">"
    r = register(stack, user, contact, "udp", user_agent="UnknownPhone/9")
    assert r.status == 200
    assert stack.store.devices(f"sip:{user}@{DOMAIN}") == []
    wait_log(stack.kamailio, f"legacy-params-no-ua-mapping aor=sip:{user}@")


def test_unregister_removes_device(stack: Stack) -> None:
    user, tok = _user(), apns_token()
    contact = rfc8599_apns_contact(5993, tok)
    assert register(stack, user, contact, "udp").status == 200
    assert len(stack.store.devices(f"sip:{user}@{DOMAIN}")) == 1
    assert register(stack, user, contact, "udp", expires=0).status == 200
    assert stack.store.devices(f"sip:{user}@{DOMAIN}") == []


# --------------------------------------------------------------------------- calls


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sleeping_device_is_pushed_woken_and_answers(stack: Stack, tmp: Path, transport: str) -> None:
    user, tok, instance = _user(), apns_token(), str(uuid.uuid4())
    dev = sipp_device(tmp, transport)
    contact = rfc8599_apns_contact(dev.port, tok, transport, instance=instance)
    assert register(stack, user, contact, transport).status == 200
    asleep(stack, user)

    caller = sipp_caller(tmp, stack.kamailio.port, user, transport)
    pushes = stack.wait_pushes(tok, 1)
    assert len(pushes) == 1
    push = pushes[0]
    assert push["provider"] == "apns" and push["push_type"] == "voip"
    assert push["topic"] == "com.example.phone.voip" and str(push["priority"]) == "10"
    assert push_kind(push) == "incomingCall"
    assert "Alice Caller" in json.dumps(push["payload"])
    # the app wakes and re-registers from a new socket: the parked INVITE follows
    assert register(stack, user, contact, transport).status == 200
    assert caller.wait(30) == 0, caller.logs()
    assert caller.final_codes() == [200]
    assert dev.wait(15) == 0, dev.logs()
    assert dev.received("INVITE") == 1 and dev.received("BYE") == 1
    time.sleep(0.3)
    assert len(stack.pushes(tok)) == 1  # no cancel push: the pushed device itself answered
    # the in-process dispatcher's Python logging reaches Kamailio's log, without the token
    line = wait_log(stack.kamailio, f"sip:{user}@{DOMAIN} device=")
    assert "outcome=delivered" in line and "kind=incomingCall" in line
    assert tok not in stack.kamailio.log()


def test_awake_device_rings_at_once_without_push(stack: Stack, tmp: Path) -> None:
    user, tok = _user(), apns_token()
    dev = sipp_device(tmp, "udp")
    assert register(stack, user, rfc8599_apns_contact(dev.port, tok), "udp").status == 200
    caller = sipp_caller(tmp, stack.kamailio.port, user, "udp")
    assert caller.wait(30) == 0 and caller.final_codes() == [200]
    assert dev.wait(15) == 0
    assert stack.pushes(tok) == []


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_no_answer_within_wait_window_480_missed_call_and_cancel(
    stack: Stack, tmp: Path, transport: str
) -> None:
    user, tok = _user(), fcm_token()
    assert register(stack, user, rfc8599_fcm_contact(5990, tok, transport), transport).status == 200
    asleep(stack, user)
    caller = sipp_caller(tmp, stack.kamailio.port, user, transport)
    assert caller.wait(WAIT + 10) == 0, caller.logs() + caller.messages()[-3000:]
    assert caller.final_codes() == [480]
    got = stack.wait_pushes(tok, 3)
    kinds = [push_kind(p) for p in got]
    assert kinds[0] == "incomingCall"
    assert sorted(kinds[1:]) == ["cancelIncomingCall", "missedCall"]
    missed = next(p for p in got if push_kind(p) == "missedCall")
    assert "Alice Caller" in json.dumps(payload_data(missed))
    assert all(p["provider"] == "fcm" for p in got)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_caller_cancel_while_parked_487(stack: Stack, tmp: Path, transport: str) -> None:
    user, tok = _user(), fcm_token()
    assert register(stack, user, rfc8599_fcm_contact(5989, tok, transport), transport).status == 200
    asleep(stack, user)
    caller = sipp_caller(tmp, stack.kamailio.port, user, transport, scenario="caller-cancel.xml",
                         args=["-d", "800"])
    assert caller.wait(20) == 0, caller.logs() + caller.messages()[-3000:]
    got = stack.wait_pushes(tok, 3)
    assert sorted(push_kind(p) for p in got) == ["cancelIncomingCall", "incomingCall", "missedCall"]


# --------------------------------------------------------------------------- several devices, several calls


def test_parallel_ringing_first_200_wins_cancel_push_to_the_rest(stack: Stack, tmp: Path) -> None:
    user = _user()
    awake = sipp_device(tmp, "udp", scenario="device-ring.xml")  # rings, then gets CANCEL
    sleeper_tok, silent_tok = apns_token(), fcm_token()
    sleeper = sipp_device(tmp, "tcp")
    sleeper_contact = rfc8599_apns_contact(sleeper.port, sleeper_tok, "tcp", instance=str(uuid.uuid4()))
    assert register(stack, user, sleeper_contact, "tcp").status == 200
    assert register(stack, user, rfc8599_fcm_contact(5980, silent_tok, instance=str(uuid.uuid4())),
                    "udp").status == 200
    asleep(stack, user)
    assert register(stack, user, f"<sip:desk@127.0.0.1:{awake.port}>", "udp").status == 200

    caller = sipp_caller(tmp, stack.kamailio.port, user, "udp")
    assert len(stack.wait_pushes(sleeper_tok, 1)) == 1 and len(stack.wait_pushes(silent_tok, 1)) == 1
    assert register(stack, user, sleeper_contact, "tcp").status == 200  # the iPhone wakes
    assert caller.wait(30) == 0 and caller.final_codes() == [200]
    assert sleeper.wait(15) == 0
    assert awake.wait(15) == 0, awake.logs()  # got INVITE, rang, got CANCEL
    silent = stack.wait_pushes(silent_tok, 2)
    assert [push_kind(p) for p in silent] == ["incomingCall", "cancelIncomingCall"]
    assert [push_kind(p) for p in stack.pushes(sleeper_tok)] == ["incomingCall"]


def test_busy_device_ends_the_call_for_everyone(stack: Stack, tmp: Path) -> None:
    user, tok = _user(), fcm_token()
    busy = sipp_device(tmp, "udp", scenario="device-reject.xml")
    assert register(stack, user, rfc8599_fcm_contact(5981, tok), "udp").status == 200
    asleep(stack, user)
    assert register(stack, user, f"<sip:desk@127.0.0.1:{busy.port}>", "udp").status == 200
    caller = sipp_caller(tmp, stack.kamailio.port, user, "udp")
    assert caller.wait(WAIT + 10) == 0 and caller.final_codes() == [486]
    assert busy.wait(10) == 0
    # the 486 ends the call at once (not at the next tick of the window timer)
    sent = next(t for t, d, f in sipp_events(busy) if d == "sent" and f.startswith("SIP/2.0 486"))
    got = next(t for t, d, f in sipp_events(caller) if d == "received" and f.startswith("SIP/2.0 486"))
    assert got - sent < 0.5, f"486 reached the caller {got - sent:.3f} s after the device sent it"
    kinds = [push_kind(p) for p in stack.wait_pushes(tok, 3)]
    assert kinds[0] == "incomingCall" and sorted(kinds[1:]) == ["cancelIncomingCall", "missedCall"]


def test_failed_awake_branch_keeps_waiting_for_pushed_device(stack: Stack, tmp: Path) -> None:
    user, tok = _user(), apns_token()
    unavailable = sipp_device(tmp, "udp", scenario="device-unavailable.xml")
    phone = sipp_device(tmp, "udp")
    contact = rfc8599_apns_contact(phone.port, tok)
    assert register(stack, user, contact, "udp").status == 200
    asleep(stack, user)
    assert register(stack, user, f"<sip:desk@127.0.0.1:{unavailable.port}>", "udp").status == 200
    caller = sipp_caller(tmp, stack.kamailio.port, user, "udp")
    assert unavailable.wait(10) == 0  # the desk phone said 480 ...
    assert len(stack.wait_pushes(tok, 1)) == 1
    assert register(stack, user, contact, "udp").status == 200  # ... but the pushed phone wakes
    assert caller.wait(30) == 0 and caller.final_codes() == [200]
    assert phone.wait(15) == 0


def test_second_call_is_parked_and_resumed_on_its_own(stack: Stack, tmp: Path) -> None:
    user, tok = _user(), fcm_token()
    phone = sipp_device(tmp, "udp")
    contact = rfc8599_fcm_contact(phone.port, tok)
    assert register(stack, user, contact, "udp").status == 200
    asleep(stack, user)
    first = sipp_caller(tmp, stack.kamailio.port, user, "udp", scenario="caller-cancel.xml",
                        args=["-d", "1500"])
    assert len(stack.wait_pushes(tok, 1)) == 1
    second = sipp_caller(tmp, stack.kamailio.port, user, "tcp")
    got = stack.wait_pushes(tok, 2, kind="incomingCall")
    assert len(got) == 2, [(push_kind(p), p.get("time")) for p in stack.pushes(tok)]
    assert first.wait(15) == 0  # the first caller gave up: 487 for it only
    time.sleep(0.3)
    assert register(stack, user, contact, "udp").status == 200
    assert second.wait(30) == 0 and second.final_codes() == [200]
    assert phone.wait(15) == 0 and phone.received("INVITE") == 1
    pushes = stack.pushes(tok)
    incoming = [payload_data(p)["call_id"] for p in pushes if push_kind(p) == "incomingCall"]
    assert len(set(incoming)) == 2
    cancelled = [payload_data(p)["call_id"] for p in pushes if push_kind(p) == "cancelIncomingCall"]
    assert cancelled == [incoming[0]]


def test_newer_call_canceled_device_still_joins_the_older_one(stack: Stack, tmp: Path) -> None:
    """Two calls parked for one device: ending the newer one must not forget the older one's
    pending wake (one shared-memory entry per device and call)."""
    user, tok = _user(), fcm_token()
    phone = sipp_device(tmp, "udp")
    contact = rfc8599_fcm_contact(phone.port, tok)
    assert register(stack, user, contact, "udp").status == 200
    asleep(stack, user)
    first = sipp_caller(tmp, stack.kamailio.port, user, "udp")
    assert len(stack.wait_pushes(tok, 1)) == 1
    second = sipp_caller(tmp, stack.kamailio.port, user, "tcp", scenario="caller-cancel.xml",
                         args=["-d", "300"])
    assert len(stack.wait_pushes(tok, 2, kind="incomingCall")) == 2
    assert second.wait(15) == 0, second.logs()  # the newer caller gave up: 487 for it only
    assert register(stack, user, contact, "udp").status == 200
    assert first.wait(30) == 0 and first.final_codes() == [200], first.logs()
    assert phone.wait(15) == 0 and phone.received("INVITE") == 1


def test_retransmitted_invite_pushes_once(stack: Stack) -> None:
    user, tok = _user(), fcm_token()
    assert register(stack, user, rfc8599_fcm_contact(5982, tok), "udp").status == 200
    asleep(stack, user)
    with SipClient(stack.kamailio.port) as c:
        invite = "\r\n".join([
            f"INVITE sip:{user}@{DOMAIN} SIP/2.0",
            f"Via: SIP/2.0/UDP 127.0.0.1:{c.local_port};branch=z9hG4bK{uuid.uuid4().hex};rport",
            f"From: <sip:alice@{DOMAIN}>;tag=a1",
            f"To: <sip:{user}@{DOMAIN}>",
            f"Call-ID: {uuid.uuid4().hex}",
            "CSeq: 1 INVITE",
            f"Contact: <sip:alice@127.0.0.1:{c.local_port}>",
            "Max-Forwards: 70",
            "Content-Length: 0",
            "", "",
        ])
        for _ in range(3):
            c.send(invite)
            time.sleep(0.2)
        final = c.response(timeout=WAIT + 5)
        assert final.status == 480
    assert [push_kind(p) for p in stack.wait_pushes(tok, 3)].count("incomingCall") == 1


@pytest.mark.parametrize("with_instance", [True, False])
def test_reregister_from_new_port_replaces_binding(stack: Stack, tmp: Path, with_instance: bool) -> None:
    user, tok = _user(), apns_token()
    instance = str(uuid.uuid4()) if with_instance else None
    old = sipp_device(tmp, "udp")
    new = sipp_device(tmp, "udp")
    assert register(stack, user, rfc8599_apns_contact(old.port, tok, instance=instance), "udp").status == 200
    assert register(stack, user, rfc8599_apns_contact(new.port, tok, instance=instance), "udp",
                    call_id=uuid.uuid4().hex).status == 200
    assert len(stack.store.devices(f"sip:{user}@{DOMAIN}")) == 1
    caller = sipp_caller(tmp, stack.kamailio.port, user, "udp")  # awake: rings at once
    assert caller.wait(30) == 0 and caller.final_codes() == [200]
    assert new.wait(15) == 0
    old.stop()
    assert old.received("INVITE") == 0


def test_register_storm_from_one_address_does_not_stop_service(stack: Stack, tmp: Path) -> None:
    stormer = _user()
    password = stack.add_user(stormer)
    with SipClient(stack.kamailio.port, "tcp") as c:
        for i in range(150):
            r = c.register(stormer, rfc8599_apns_contact(6000 + i % 7, apns_token()), password=password)
            assert r.status == 200
    assert len(stack.store.devices(f"sip:{stormer}@{DOMAIN}")) <= stack.settings.max_devices_per_user
    user = _user()
    dev = sipp_device(tmp, "udp")
    assert register(stack, user, f"<sip:desk@127.0.0.1:{dev.port}>", "udp").status == 200
    caller = sipp_caller(tmp, stack.kamailio.port, user, "udp")
    assert caller.wait(30) == 0 and caller.final_codes() == [200]


def test_invite_from_local_subscriber_must_authenticate(stack: Stack) -> None:
    caller, callee = _user(), _user()
    stack.add_user(caller)
    assert register(stack, callee, "<sip:desk@127.0.0.1:5979>", "udp").status == 200
    with SipClient(stack.kamailio.port) as c:
        c.send("\r\n".join([
            f"INVITE sip:{callee}@{DOMAIN} SIP/2.0",
            f"Via: SIP/2.0/UDP 127.0.0.1:{c.local_port};branch=z9hG4bK{uuid.uuid4().hex};rport",
            f"From: <sip:{caller}@{DOMAIN}>;tag=a1",
            f"To: <sip:{callee}@{DOMAIN}>",
            f"Call-ID: {uuid.uuid4().hex}",
            "CSeq: 1 INVITE",
            f"Contact: <sip:{caller}@127.0.0.1:{c.local_port}>",
            "Max-Forwards: 70",
            "Content-Length: 0",
            "", "",
        ]))
        r = c.response()
    assert r.status == 407 and r.header("Proxy-Authenticate")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sipp_register_scenario_with_auth_and_unregister(stack: Stack, tmp: Path, transport: str) -> None:
    user, tok, instance = _user(), apns_token(), str(uuid.uuid4())
    password = stack.add_user(user)
    keys = ["-au", user, "-ap", password, "-key", "device_port", "5978", "-key", "instance", instance,
            "-key", "pn", f"pn-provider=apns;pn-param=TEAM000001.com.example.phone.voip;pn-prid={tok}"]
    reg = sipp_caller(tmp, stack.kamailio.port, user, transport, scenario="device-register.xml",
                      args=[*keys, "-key", "expires", "600"])
    assert reg.wait(20) == 0, reg.logs()
    assert "Feature-Caps: *;+sip.pns=\"apns\"" in reg.messages()
    [device] = stack.store.devices(f"sip:{user}@{DOMAIN}")
    assert device.params.voip_token == tok and device.device_id.endswith(instance)
    unreg = sipp_caller(tmp, stack.kamailio.port, user, transport, scenario="device-register.xml",
                        args=[*keys, "-key", "expires", "0"])
    assert unreg.wait(20) == 0, unreg.logs()
    assert stack.store.devices(f"sip:{user}@{DOMAIN}") == []


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_one_record_per_phone_whatever_its_instance_history(stack: Stack, tmp: Path, transport: str) -> None:
    """A client registered once without +sip.instance, then with one (same token): one device record,
    one binding, one push, one fork."""
    user, tok, instance = _user(), apns_token(), str(uuid.uuid4())
    dev = sipp_device(tmp, transport)
    assert register(stack, user, rfc8599_apns_contact(dev.port, tok, transport), transport).status == 200
    with_instance = rfc8599_apns_contact(dev.port, tok, transport, instance=instance)
    r = register(stack, user, with_instance, transport, call_id=uuid.uuid4().hex)
    assert r.status == 200
    assert len(r.header("Contact")) == 1, r.header("Contact")  # the registrar lists one binding
    devices = stack.store.devices(f"sip:{user}@{DOMAIN}")
    assert len(devices) == 1 and devices[0].params.voip_token == tok
    asleep(stack, user)
    caller = sipp_caller(tmp, stack.kamailio.port, user, transport)
    assert len(stack.wait_pushes(tok, 1, kind="incomingCall")) == 1
    assert register(stack, user, with_instance, transport).status == 200  # woken
    assert caller.wait(30) == 0 and caller.final_codes() == [200]
    assert dev.wait(15) == 0 and dev.received("INVITE") == 1
    assert [push_kind(p) for p in stack.pushes(tok)].count("incomingCall") == 1


def test_unparked_call_nobody_answers_owes_one_missed_call_push(stack: Stack, tmp: Path) -> None:
    """An awake push phone that is busy (no park, no incomingCall push) still gets the missed-call
    push, once; an answered call gets none."""
    user, tok = _user(), fcm_token()
    busy = sipp_device(tmp, "udp", scenario="device-reject.xml")
    assert register(stack, user, rfc8599_fcm_contact(busy.port, tok), "udp").status == 200  # awake
    caller = sipp_caller(tmp, stack.kamailio.port, user, "udp")
    assert caller.wait(WAIT + 10) == 0 and caller.final_codes() == [486]
    assert [push_kind(p) for p in stack.wait_pushes(tok, 1, timeout=5)] == ["missedCall"]
    answering = sipp_device(tmp, "udp")
    assert register(stack, user, rfc8599_fcm_contact(answering.port, tok), "udp").status == 200
    caller = sipp_caller(tmp, stack.kamailio.port, user, "udp")
    assert caller.wait(30) == 0 and caller.final_codes() == [200]
    time.sleep(0.5)
    assert [push_kind(p) for p in stack.pushes(tok)] == ["missedCall"]  # still only the first one


def test_phone_suspended_inside_the_awake_window_is_pushed_not_rung(stack: Stack, tmp: Path) -> None:
    """A TCP phone registered a second ago and was then suspended (its connection dropped): calling
    its contact would ring nothing, so it is pushed, wakes over a new connection and answers."""
    from harness.sipua import SipPhone, header_values, open_sip_socket

    user, tok, instance = _user(), apns_token(), str(uuid.uuid4())
    password = stack.add_user(user)
    proxy = ("127.0.0.1", stack.kamailio.port)
    first = SipPhone(open_sip_socket(proxy, "tcp"), "tcp")
    with first:
        r = first.register(user, rfc8599_apns_contact(first.local_port, tok, "tcp", instance), password=password)
    assert r.status == 200  # ... and the connection is gone at once: well inside the 10 s awake window
    time.sleep(0.3)
    caller = sipp_caller(tmp, stack.kamailio.port, user, "udp", args=["-d", "200"])
    assert [push_kind(p) for p in stack.wait_pushes(tok, 1, timeout=5)] == ["incomingCall"]
    phone = SipPhone(open_sip_socket(proxy, "tcp"), "tcp")
    with phone:
        r = phone.register(user, rfc8599_apns_contact(phone.local_port, tok, "tcp", instance), password=password)
        assert r.status == 200
        invite = phone.request("INVITE")
        assert invite.startswith(f"INVITE sip:dev@127.0.0.1:{phone.local_port};transport=tcp")
        phone.answer(invite, 200, "OK", "t1", "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n"
                     "t=0 0\r\nm=audio 40000 RTP/AVP 0\r\n")
        phone.request("ACK")
        bye = phone.request("BYE", timeout=10)
        assert header_values(bye, "Call-ID") == header_values(invite, "Call-ID")
        phone.answer(bye, 200, "OK")
    assert caller.wait(20) == 0 and caller.final_codes() == [200]


_SDP = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n"


def _phone(stack: Stack, transport: str) -> SipPhone:
    proxy = ("127.0.0.1", stack.kamailio.port)
    return SipPhone(open_sip_socket(proxy, transport), transport, proxy)


def _wake_and_answer(stack: Stack, user: str, password: str, tok: str, instance: str, transport: str) -> None:
    """The pushed phone re-registers from a new socket, gets the call there, answers, is hung up on."""
    from harness.sipua import header_values

    phone = _phone(stack, transport)
    with phone:
        r = phone.register(user, rfc8599_apns_contact(phone.local_port, tok, transport, instance), password=password)
        assert r.status == 200
        invite = phone.request("INVITE")
        assert invite.startswith(f"INVITE sip:dev@127.0.0.1:{phone.local_port}")
        phone.answer(invite, 200, "OK", "t1", _SDP)
        phone.request("ACK")
        bye = phone.request("BYE", timeout=10)
        assert header_values(bye, "Call-ID") == header_values(invite, "Call-ID")
        phone.answer(bye, 200, "OK")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_phone_silent_inside_the_awake_window_is_pushed_after_push_on_silence(
    stack: Stack, tmp: Path, transport: str
) -> None:
    """A phone registered a second ago, then suspended with its socket still open: it is rung
    directly, answers nothing, and after PUSH_ON_SILENCE (3 s) it is pushed and the call waits
    for its REGISTER instead of ending in 408 with no push."""
    user, tok, instance = _user(), apns_token(), str(uuid.uuid4())
    password = stack.add_user(user)
    asleep_phone = _phone(stack, transport)
    with asleep_phone:  # (never read again: the INVITE sits unanswered in its socket)
        r = asleep_phone.register(
            user, rfc8599_apns_contact(asleep_phone.local_port, tok, transport, instance), password=password
        )
        assert r.status == 200
        started = time.monotonic()
        caller = sipp_caller(tmp, stack.kamailio.port, user, "udp", args=["-d", "200"])
        assert [push_kind(p) for p in stack.wait_pushes(tok, 1, timeout=10)] == ["incomingCall"]
        assert time.monotonic() - started >= 2.5  # it was rung first: pushed only once silent
        _wake_and_answer(stack, user, password, tok, instance, transport)
    assert caller.wait(20) == 0 and caller.final_codes() == [200]
    assert [push_kind(p) for p in stack.pushes(tok)] == ["incomingCall"]  # answered: nothing owed


def test_phone_answering_503_inside_the_awake_window_is_pushed(stack: Stack, tmp: Path) -> None:
    """An awake push phone that answers 503 (an app that cannot take the call now) is pushed and
    the call waits for it; its 503 is not relayed to the caller."""
    user, tok, instance = _user(), apns_token(), str(uuid.uuid4())
    password = stack.add_user(user)
    busy_app = _phone(stack, "udp")
    with busy_app:
        r = busy_app.register(user, rfc8599_apns_contact(busy_app.local_port, tok, "udp", instance),
                              password=password)
        assert r.status == 200
        caller = sipp_caller(tmp, stack.kamailio.port, user, "udp", args=["-d", "200"])
        invite = busy_app.request("INVITE")
        busy_app.answer(invite, 503, "Service Unavailable", "b1")
        assert [push_kind(p) for p in stack.wait_pushes(tok, 1, timeout=5)] == ["incomingCall"]
        _wake_and_answer(stack, user, password, tok, instance, "udp")
    assert caller.wait(20) == 0 and caller.final_codes() == [200]


def test_silent_phone_that_never_wakes_ends_in_480_and_a_missed_call(stack: Stack, tmp: Path) -> None:
    """Rung, silent, pushed, never re-registers: the wait window ends the call with 480 (not the
    silent branch's 408), and the phone gets its cancel and missed-call pushes once each."""
    user, tok = _user(), fcm_token()
    password = stack.add_user(user)
    phone = _phone(stack, "udp")
    with phone:
        r = phone.register(user, rfc8599_fcm_contact(phone.local_port, tok), password=password)
        assert r.status == 200
        caller = sipp_caller(tmp, stack.kamailio.port, user, "udp")
        caller.wait(WAIT + 15)
        assert caller.final_codes() == [480]
    kinds = [push_kind(p) for p in stack.wait_pushes(tok, 3)]
    assert sorted(kinds) == ["cancelIncomingCall", "incomingCall", "missedCall"] and kinds[0] == "incomingCall"


def test_phone_that_wakes_under_a_new_instance_gets_its_call(stack: Stack, tmp: Path) -> None:
    """A client that lost its +sip.instance (killed before it saved it) wakes with a new one and
    the same token: it is the same phone, and the call it was pushed for reaches it."""
    user, tok = _user(), apns_token()
    password = stack.add_user(user)
    with _phone(stack, "udp") as first:
        r = first.register(user, rfc8599_apns_contact(first.local_port, tok, "udp", str(uuid.uuid4())),
                           password=password)
        assert r.status == 200
    asleep(stack, user)
    caller = sipp_caller(tmp, stack.kamailio.port, user, "udp", args=["-d", "200"])
    assert [push_kind(p) for p in stack.wait_pushes(tok, 1, timeout=5)] == ["incomingCall"]
    _wake_and_answer(stack, user, password, tok, str(uuid.uuid4()), "udp")
    assert caller.wait(20) == 0 and caller.final_codes() == [200]
    assert len(stack.store.devices(f"sip:{user}@{DOMAIN}")) == 1  # one record for the one phone


@pytest.mark.parametrize("code", [503, 480])
def test_woken_phone_failing_with_nobody_left_ends_the_call_at_once(stack: Stack, tmp: Path, code: int) -> None:
    """The only pushed phone woke and then answered 5xx/480: nobody else can answer, so the caller
    gets that answer at once (not the window's 480 seconds later) and the user a missed-call push."""
    user, tok, instance = _user(), fcm_token(), str(uuid.uuid4())
    password = stack.add_user(user)
    with _phone(stack, "udp") as first:
        assert first.register(user, rfc8599_fcm_contact(first.local_port, tok, "udp", instance),
                              password=password).status == 200
    asleep(stack, user)
    caller = sipp_caller(tmp, stack.kamailio.port, user, "udp")
    assert [push_kind(p) for p in stack.wait_pushes(tok, 1, timeout=5)] == ["incomingCall"]
    with _phone(stack, "udp") as woken:
        assert woken.register(user, rfc8599_fcm_contact(woken.local_port, tok, "udp", instance),
                              password=password).status == 200
        invite = woken.request("INVITE")
        woken.answer(invite, code, "Not Now", "w1")
        answered_at = time.monotonic()
        caller.wait(WAIT + 10)
    assert caller.final_codes() == [code]  # the window's end would have been 480 from the proxy
    assert time.monotonic() - answered_at < 2.0  # (a functional bound: the window ends ~3.5 s after it)
    kinds = [push_kind(p) for p in stack.wait_pushes(tok, 2)]
    assert "missedCall" in kinds


def test_a_dead_token_drops_the_binding_and_the_next_call_ends_at_once(stack: Stack, tmp: Path) -> None:
    """APNs said 410 for the phone's only token: the call it was pushed for ends at once (nobody
    is left who could join it), and the dispatcher marks the device dead; the next call does not
    ring the dead contact (that was 408 after 10 s, or a stranger now listening there): the
    binding and the record go, and the caller gets 480 at once."""
    user, tok = _user(), apns_token()
    password = stack.add_user(user)
    with _phone(stack, "udp") as phone:
        assert phone.register(user, rfc8599_apns_contact(phone.local_port, tok, "udp", str(uuid.uuid4())),
                              password=password).status == 200
    asleep(stack, user)
    stack.handle.control.set_behaviour(tok, 410, "Unregistered")
    started = time.monotonic()
    first = sipp_caller(tmp, stack.kamailio.port, user, "udp")
    aor = f"sip:{user}@{DOMAIN}"
    deadline = time.monotonic() + 10
    while not any(d.dead for d in stack.store.devices(aor)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [d.dead for d in stack.store.devices(aor)] == [True]
    first.wait(WAIT + 10)
    assert first.final_codes() == [480] and time.monotonic() - started < WAIT, first.logs()[-2000:]  # not its window
    wait_log(stack.kamailio, "pusher: nobody-reachable")
    started = time.monotonic()
    second = sipp_caller(tmp, stack.kamailio.port, user, "udp")
    second.wait(15)
    assert second.final_codes() == [480] and time.monotonic() - started < 3  # (not the 10 s of a dead contact)
    wait_log(stack.kamailio, "pusher: dead-binding-removed")
    assert stack.store.devices(aor) == []
