"""Role mode: a native host config (tests/native-host.cfg) including kamailio/pusher-role.cfg runs
the same Python logic through python_exec; plus `kamailio -c` for both deployment modes."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    KAMAILIO_CFG,
    NATIVE_HOST_CFG,
    SipClient,
    SipResponse,
    Stack,
    apns_token,
    asleep,
    check_config,
    fcm_token,
    push_kind,
    push_stack,
    register,
    rfc8599_apns_contact,
    rfc8599_fcm_contact,
    sipp_caller,
    sipp_device,
    sipp_events,
    stop_all_sipp,
)

WAIT = 3.0


@pytest.mark.parametrize(
    ("cfg", "defines"),
    [
        (KAMAILIO_CFG, {}),
        (KAMAILIO_CFG, {"WITH_PUSHER": None}),
        (KAMAILIO_CFG, {"WITH_PUSHER": None, "WITH_AUTH": None, "WITH_EXTERNAL_DISPATCHER": None}),
        (KAMAILIO_CFG, {"WITH_PUSHER": None, "WITH_AUTH": None, "WITH_TLS": None,
                        "TLS_CFG": '"/etc/kamailio/tls.cfg"'}),
        (NATIVE_HOST_CFG, {}),
        (NATIVE_HOST_CFG, {"WITH_EXTERNAL_DISPATCHER": None}),
    ],
    ids=["kemi-plain", "kemi-pusher", "kemi-auth-external", "kemi-tls", "role", "role-external"],
)
def test_kamailio_check_passes(cfg: Path, defines: dict[str, str | None]) -> None:
    result = check_config(cfg, {"SIP_PORT": "5999", **defines})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with push_stack(auth=False, wait_window=WAIT, awake_window=10, cfg=NATIVE_HOST_CFG) as s:
        yield s


@pytest.fixture(autouse=True)
def _no_stray_sipp() -> Iterator[None]:
    yield
    stop_all_sipp()


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_role_mode_sleeping_device_is_pushed_woken_and_answers(stack: Stack, tmp_path: Path,
                                                                transport: str) -> None:
    user, tok = "n" + uuid.uuid4().hex[:10], apns_token()
    dev = sipp_device(tmp_path, transport)
    contact = rfc8599_apns_contact(dev.port, tok, transport, instance=str(uuid.uuid4()))
    r = register(stack, user, contact, transport)
    assert r.status == 200 and r.header("Feature-Caps") == ['*;+sip.pns="apns"']
    asleep(stack, user)
    caller = sipp_caller(tmp_path, stack.kamailio.port, user, transport)
    pushes = stack.wait_pushes(tok, 1)
    assert [(p["push_type"], p["topic"], push_kind(p)) for p in pushes] == [
        ("voip", "com.example.phone.voip", "incomingCall")]
    assert register(stack, user, contact, transport).status == 200
    assert caller.wait(30) == 0 and caller.final_codes() == [200]
    assert dev.wait(15) == 0 and dev.received("INVITE") == 1


def test_role_mode_timeout_and_cancel(stack: Stack, tmp_path: Path) -> None:
    user, tok = "n" + uuid.uuid4().hex[:10], fcm_token()
    assert register(stack, user, rfc8599_fcm_contact(5960, tok), "udp").status == 200
    assert register(stack, user, rfc8599_fcm_contact(5961, "x" + tok), "udp").status == 200
    asleep(stack, user)
    caller = sipp_caller(tmp_path, stack.kamailio.port, user, "udp")
    assert caller.wait(WAIT + 10) == 0 and caller.final_codes() == [480]
    assert sorted(push_kind(p) for p in stack.wait_pushes(tok, 3)) == [
        "cancelIncomingCall", "incomingCall", "missedCall"]
    canceller = sipp_caller(tmp_path, stack.kamailio.port, user, "tcp", scenario="caller-cancel.xml",
                            args=["-d", "500"])
    assert canceller.wait(20) == 0, canceller.logs()
    got = stack.wait_pushes(tok, 6)
    assert len(got) == 6 and "Alice Caller" in json.dumps(got[-1]["payload"])


def _invite(stack: Stack, ruri: str) -> SipResponse:
    with SipClient(stack.kamailio.port, "udp") as c:
        tag, call_id = uuid.uuid4().hex[:8], uuid.uuid4().hex
        c.send(
            f"INVITE {ruri} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{c.local_port};rport;branch=z9hG4bK{uuid.uuid4().hex[:12]}\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:caller@127.0.0.1>;tag={tag}\r\n"
            f"To: <{ruri}>\r\n"
            f"Call-ID: {call_id}\r\n"
            "CSeq: 1 INVITE\r\n"
            f"Contact: <sip:caller@127.0.0.1:{c.local_port}>\r\n"
            "Content-Length: 0\r\n\r\n"
        )
        return c.response()


def test_role_mode_leaves_foreign_and_pushless_invites_to_the_host(stack: Stack) -> None:
    """Only INVITEs the push role has something to do with are answered by it; the host's own
    routing gets the rest (here: its recognisable replies from tests/native-host.cfg)."""
    foreign = _invite(stack, "sip:bob@example.org")
    assert (foreign.status, foreign.reason) == (403, "Host Outbound Route")
    nobody = _invite(stack, f"sip:n{uuid.uuid4().hex[:10]}@127.0.0.1:{stack.kamailio.port}")
    assert (nobody.status, nobody.reason) == (404, "Host Not Found")
    assert "pusher: route-error" not in stack.kamailio.log()


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_role_mode_refuses_registers_for_foreign_domains_and_keeps_domains_apart(stack: Stack,
                                                                                  transport: str) -> None:
    """PUSHER_REGISTER: a foreign domain is refused before anything is stored, and with use_domain
    a same-named user elsewhere never shares bindings."""
    user, tok = "n" + uuid.uuid4().hex[:10], apns_token()
    with SipClient(stack.kamailio.port, transport) as c:
        r = c.register(user, rfc8599_apns_contact(5962, tok, transport), domain="evil.example")
    assert (r.status, r.reason) == (403, "Domain Not Served")
    assert stack.store.devices(f"sip:{user}@evil.example") == []
    assert register(stack, user, rfc8599_apns_contact(5963, tok, transport), transport).status == 200
    with SipClient(stack.kamailio.port, transport) as c:
        r = c.register(user, "*", expires=0, domain="evil.example")
    assert r.status == 403
    assert [d.params.voip_token for d in stack.store.devices(f"sip:{user}@127.0.0.1")] == [tok]


def test_role_mode_busy_device_ends_the_call_at_once(stack: Stack, tmp_path: Path) -> None:
    """The 486 of an awake device ends a call parked for a sleeping one through the role's async
    route (PUSHER_END_NOW), not at the next tick of the window timer."""
    user, tok = "n" + uuid.uuid4().hex[:10], fcm_token()
    busy = sipp_device(tmp_path, "udp", scenario="device-reject.xml")
    assert register(stack, user, rfc8599_fcm_contact(5964, tok), "udp").status == 200
    asleep(stack, user)
    assert register(stack, user, f"<sip:desk@127.0.0.1:{busy.port}>", "udp").status == 200
    caller = sipp_caller(tmp_path, stack.kamailio.port, user, "udp")
    assert caller.wait(WAIT + 10) == 0 and caller.final_codes() == [486]
    assert busy.wait(10) == 0
    sent = next(t for t, d, f in sipp_events(busy) if d == "sent" and f.startswith("SIP/2.0 486"))
    got = next(t for t, d, f in sipp_events(caller) if d == "received" and f.startswith("SIP/2.0 486"))
    assert got - sent < 0.5, f"486 reached the caller {got - sent:.3f} s after the device sent it"


def test_role_mode_silent_push_phone_is_pushed_and_answers(stack: Stack, tmp_path: Path) -> None:
    """PUSH_ON_SILENCE in role mode: the branch-failure event route of pusher-role.cfg runs the
    same Python: an awake push phone that stays silent is pushed, wakes and answers."""
    from harness.sipua import SipPhone, open_sip_socket

    proxy = ("127.0.0.1", stack.kamailio.port)
    user, tok, instance = "r" + uuid.uuid4().hex[:8], apns_token(), str(uuid.uuid4())
    sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n"
    with SipPhone(open_sip_socket(proxy, "udp"), "udp", proxy) as silent:
        r = silent.register(user, rfc8599_apns_contact(silent.local_port, tok, "udp", instance))
        assert r.status == 200
        caller = sipp_caller(tmp_path, stack.kamailio.port, user, "udp", args=["-d", "200"])
        assert [push_kind(p) for p in stack.wait_pushes(tok, 1, timeout=10)] == ["incomingCall"]
        with SipPhone(open_sip_socket(proxy, "udp"), "udp", proxy) as woken:
            r = woken.register(user, rfc8599_apns_contact(woken.local_port, tok, "udp", instance))
            assert r.status == 200
            invite = woken.request("INVITE")
            woken.answer(invite, 200, "OK", "t1", sdp)
            woken.request("ACK")
            woken.answer(woken.request("BYE", timeout=10), 200, "OK")
    assert caller.wait(20) == 0 and caller.final_codes() == [200]
