"""Integration: edge flows of the push proxy on real Kamailio (KEMI mode, push role, auth on).

Android (RFC 8599 FCM) and legacy Kazoo-style (User-Agent mapping) devices woken by a push,
a NATed device whose REGISTER source differs from its Contact/Via, in-dialog requests after a
woken device answered (the device hangs up; re-INVITE and UPDATE from the caller), and bad
REGISTERs (each followed by a normal REGISTER of another user to prove Kamailio still serves).

One stack per module (wait window 5 s, awake window 10 s), like tests/test_kamailio_flows.py.
"""

from __future__ import annotations

import re
import secrets
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.sipua import SipPhone, digest_authorization, open_sip_socket
from harness.sipua import header_values as _header
from pushlib.models import Provider, UaMapping
from pushlib.settings import Settings
from pushlib.store import SyncStore
from tests.support import (
    BUNDLE,
    DOMAIN,
    FCM_PROJECT,
    SipClient,
    Stack,
    apns_token,
    asleep,
    fcm_token,
    payload_data,
    push_kind,
    push_stack,
    redis_server,
    register,
    rfc8599_apns_contact,
    rfc8599_fcm_contact,
    sipp_caller,
    sipp_device,
)

WAIT = 5.0
TRANSPORTS = ["udp", "tcp"]
KAZOO_UA = "KazooPhone/4.3 (iOS)"
KAZOO_MAPPING = UaMapping("kazoo-phone", r"^KazooPhone/", app_param="x-token-app",
                          type_param="x-token-type", token_param="x-token-id")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # before Kamailio starts: each worker loads the mappings at start and caches them for 10 s
    with redis_server() as srv:
        pre = SyncStore(srv.url, Settings(redis_url=srv.url))
        try:
            pre.save_ua_mapping(KAZOO_MAPPING)
        finally:
            pre.close()
        with push_stack(auth=True, wait_window=WAIT, awake_window=10, redis=srv) as s:
            yield s


def _user() -> str:
    return "e" + uuid.uuid4().hex[:10]


def _aor(user: str) -> str:
    return f"sip:{user}@{DOMAIN}"


def _call_ids(messages: str, method: str) -> list[str]:
    """Call-IDs of the `method` requests in a SIPp message trace."""
    out = []
    for block in re.split(rf"(?m)^(?={method} sip:)", messages)[1:]:
        m = re.search(r"(?mi)^Call-ID:\s*(\S+)", block)
        if m:
            out.append(m.group(1))
    return out


# --------------------------------------------------------------------------- 1. Android (FCM)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sleeping_fcm_device_is_pushed_woken_and_answers(stack: Stack, tmp: Path, transport: str) -> None:
    user, tok, instance = _user(), fcm_token(), str(uuid.uuid4())
    dev = sipp_device(tmp, transport)
    contact = rfc8599_fcm_contact(dev.port, tok, transport, instance=instance)
    r = register(stack, user, contact, transport)
    assert r.status == 200 and r.header("Feature-Caps") == ['*;+sip.pns="fcm"']
    asleep(stack, user)

    caller = sipp_caller(tmp, stack.kamailio.port, user, transport)
    started = time.time()
    [push] = stack.wait_pushes(tok, 1)
    assert push["provider"] == "fcm" and push["project_id"] == FCM_PROJECT
    message = push["payload"]
    assert isinstance(message, dict) and message["token"] == tok
    assert "notification" not in message  # a data message: the app decides how to ring
    assert message["android"]["priority"] == "high" and push["priority"] == "high"
    ttl = float(str(push["ttl"]).rstrip("s"))
    assert 0 < ttl <= WAIT
    data = payload_data(push)
    assert data["type"] == "incomingCall" and push_kind(push) == "incomingCall"
    assert all(isinstance(v, str) for v in data.values())  # FCM data values are strings
    assert float(str(data.get("deadline", started + WAIT))) <= started + WAIT + 1

    assert register(stack, user, contact, transport).status == 200  # woken
    assert caller.wait(30) == 0, caller.logs()
    assert caller.final_codes() == [200]
    assert dev.wait(15) == 0, dev.logs()
    assert dev.received("INVITE") == 1 and dev.received("BYE") == 1
    assert data["call_id"] == _call_ids(dev.messages(), "INVITE")[0]  # the push names the call
    time.sleep(0.3)
    assert len(stack.pushes(tok)) == 1  # the pushed device answered: no cancel push


# --------------------------------------------------------------------------- 2. legacy (Kazoo UA mapping)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_legacy_ua_mapped_device_registers_is_pushed_and_answers(
    stack: Stack, tmp: Path, transport: str
) -> None:
    user, tok = _user(), apns_token()
    dev = sipp_device(tmp, transport)
    contact = (f"<sip:dev@127.0.0.1:{dev.port};transport={transport};x-token-app={BUNDLE}.voip;"
               f"x-token-type=apple;x-token-id={tok}>")
    r = register(stack, user, contact, transport, user_agent=KAZOO_UA)
    assert r.status == 200, r.raw[:300]
    assert r.header("Feature-Caps") == ['*;+sip.pns="apns"']
    [device] = stack.store.devices(_aor(user))
    assert device.params.provider is Provider.APNS and device.params.app_id == BUNDLE
    assert device.params.voip_token == tok and not device.params.sandbox
    assert device.user_agent == KAZOO_UA and f"x-token-id={tok}" in device.contact
    asleep(stack, user)

    caller = sipp_caller(tmp, stack.kamailio.port, user, transport)
    [push] = stack.wait_pushes(tok, 1)
    assert (push["provider"], push["topic"], push["push_type"], str(push["priority"])) == (
        "apns", f"{BUNDLE}.voip", "voip", "10")
    assert push_kind(push) == "incomingCall"
    assert register(stack, user, contact, transport, user_agent=KAZOO_UA).status == 200  # woken
    assert caller.wait(30) == 0 and caller.final_codes() == [200], caller.logs()
    assert dev.wait(15) == 0, dev.logs()
    assert dev.received("INVITE") == 1
    assert len(stack.store.devices(_aor(user))) == 1
    assert len(stack.pushes(tok)) == 1


# --------------------------------------------------------------------------- 3. NAT


def _nat_phone(proxy_port: int, transport: str, via_port: int) -> SipPhone:
    """A device behind NAT: its socket (UDP) or TCP connection is at local port X, but its Via and
    Contact name port `via_port` (what the phone believes is its address)."""
    proxy = ("127.0.0.1", proxy_port)
    return SipPhone(open_sip_socket(proxy, transport), transport, proxy, via_port=via_port)


def _register(phone: SipPhone, user: str, password: str, contact: str) -> str:
    return phone.register(user, contact, password=password, expires=600, user_agent="PushTest-NAT/1.0").raw


SDP = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n"


def _unused_udp_socket() -> socket.socket:
    """A bound loopback UDP socket nobody reads: the NATed phone's 'private' port Y."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


def _closed_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again at once: nothing listens there


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_natted_device_is_reached_where_its_new_register_came_from(
    stack: Stack, tmp: Path, transport: str
) -> None:
    user, tok, instance = _user(), apns_token(), str(uuid.uuid4())
    password = stack.add_user(user)
    decoy = _unused_udp_socket() if transport == "udp" else None
    via_port = int(decoy.getsockname()[1]) if decoy else _closed_tcp_port()
    contact = rfc8599_apns_contact(via_port, tok, transport, instance=instance)
    try:
        first = _nat_phone(stack.kamailio.port, transport, via_port)
        try:
            r = _register(first, user, password, contact)
        finally:
            first.close()  # the app sleeps; its NAT mapping is gone
        assert r.startswith("SIP/2.0 200"), r
        asleep(stack, user)

        caller = sipp_caller(tmp, stack.kamailio.port, user, transport, args=["-d", "300"])
        [push] = stack.wait_pushes(tok, 1)
        assert push_kind(push) == "incomingCall" and push["push_type"] == "voip"
        phone = _nat_phone(stack.kamailio.port, transport, via_port)  # woken: new NAT port X
        try:
            assert phone.local_port != via_port
            r = _register(phone, user, password, contact)
            assert r.startswith("SIP/2.0 200"), r
            invite = phone.request("INVITE")  # on X (UDP) / over the REGISTER's connection (TCP)
            assert invite.startswith(f"INVITE sip:dev@127.0.0.1:{via_port};transport={transport}")
            tag = secrets.token_hex(4)
            phone.answer(invite, 180, "Ringing", tag)
            phone.answer(invite, 200, "OK", tag, SDP)
            phone.request("ACK")  # in-dialog requests reach the NATed phone too
            bye = phone.request("BYE", timeout=10)
            phone.answer(bye, 200, "OK")
        finally:
            phone.close()
        assert caller.wait(20) == 0, caller.logs()
        assert caller.final_codes() == [200]
        if decoy is not None:
            decoy.setblocking(False)
            with pytest.raises(BlockingIOError):
                decoy.recv(65535)  # nothing was ever sent to the address the phone claimed
        [device] = stack.store.devices(_aor(user))
        assert device.params.voip_token == tok
        assert len(stack.pushes(tok)) == 1
    finally:
        if decoy is not None:
            decoy.close()


# --------------------------------------------------------------------------- 4. in-dialog requests


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_woken_device_hangs_up_and_caller_gets_the_bye(stack: Stack, tmp: Path, transport: str) -> None:
    user, tok = _user(), apns_token()
    dev = sipp_device(tmp, transport, scenario="device-answer-hangup.xml")
    contact = rfc8599_apns_contact(dev.port, tok, transport, instance=str(uuid.uuid4()))
    assert register(stack, user, contact, transport).status == 200
    asleep(stack, user)
    caller = sipp_caller(tmp, stack.kamailio.port, user, transport, scenario="caller-callee-hangup.xml")
    assert [push_kind(p) for p in stack.wait_pushes(tok, 1)] == ["incomingCall"]
    assert register(stack, user, contact, transport).status == 200
    assert dev.wait(20) == 0, dev.logs() + dev.messages()[-3000:]
    assert caller.wait(20) == 0, caller.logs() + caller.messages()[-3000:]
    assert caller.final_codes() == [200] and "callee-bye=received" in caller.logs()
    assert "device-bye=200" in dev.logs()
    # the device's BYE followed the Record-Route: it went to the proxy, which relayed it
    bye = caller.messages().split("BYE sip:", 1)[1]
    assert re.search(rf"(?mi)^Via:.*127\.0\.0\.1:{stack.kamailio.port}", bye), bye[:800]
    assert len(stack.pushes(tok)) == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_reinvite_and_update_reach_the_woken_device(stack: Stack, tmp: Path, transport: str) -> None:
    user, tok = _user(), fcm_token()
    dev = sipp_device(tmp, transport, scenario="device-answer-reinvite.xml")
    contact = rfc8599_fcm_contact(dev.port, tok, transport, instance=str(uuid.uuid4()))
    assert register(stack, user, contact, transport).status == 200
    asleep(stack, user)
    caller = sipp_caller(tmp, stack.kamailio.port, user, transport, scenario="caller-reinvite-update.xml",
                         args=["-d", "300"])
    assert [push_kind(p) for p in stack.wait_pushes(tok, 1)] == ["incomingCall"]
    assert register(stack, user, contact, transport).status == 200
    assert caller.wait(20) == 0, caller.logs() + caller.messages()[-3000:]
    assert dev.wait(20) == 0, dev.logs() + dev.messages()[-3000:]
    logs = caller.logs()
    assert caller.final_codes() == [200]
    assert all(s in logs for s in ("reinvite=200", "update=200", "bye=200")), logs
    assert dev.received("INVITE") == 2 and dev.received("UPDATE") == 1 and dev.received("BYE") == 1
    # a re-INVITE is a new transaction in the dialog, never a new call: still one push
    time.sleep(0.3)
    assert [push_kind(p) for p in stack.pushes(tok)] == ["incomingCall"]


# --------------------------------------------------------------------------- 5. bad input


def _assert_still_serving(stack: Stack) -> None:
    other = _user()
    r = register(stack, other, f"<sip:desk@127.0.0.1:{5900 + secrets.randbelow(50)}>", "udp")
    assert r.status == 200, r.raw[:300]


def _raw_register(stack: Stack, user: str, contact_lines: list[bytes], transport: str = "udp") -> str:
    """An authenticated REGISTER whose Contact header lines are sent as given (raw bytes);
    returns the final response text ("" when none came)."""
    password = stack.passwords.get(user) or stack.add_user(user)
    uri, tag, call_id, auth = f"sip:{DOMAIN}", secrets.token_hex(4), uuid.uuid4().hex, ""
    with SipClient(stack.kamailio.port, transport) as c:
        for cseq in (1, 2):
            head = "\r\n".join([
                f"REGISTER {uri} SIP/2.0",
                f"Via: SIP/2.0/{transport.upper()} 127.0.0.1:{c.local_port};"
                f"branch=z9hG4bK{secrets.token_hex(8)};rport",
                f"From: <sip:{user}@{DOMAIN}>;tag={tag}",
                f"To: <sip:{user}@{DOMAIN}>",
                f"Call-ID: {call_id}",
                f"CSeq: {cseq} REGISTER",
                "Max-Forwards: 70",
                "Expires: 300",
                "User-Agent: PushTest/1.0",
            ] + ([f"Authorization: {auth}"] if auth else [])).encode()
            data = head + b"".join(b"\r\n" + line for line in contact_lines) + b"\r\nContent-Length: 0\r\n\r\n"
            if transport == "udp":
                c.sock.sendto(data, c.proxy)
            else:
                c.sock.sendall(data)
            try:
                resp = c.response(timeout=3)
            except TimeoutError:
                return ""
            if resp.status != 401 or auth:
                return resp.raw
            auth = digest_authorization("REGISTER", uri, user, password,
                                        resp.header("WWW-Authenticate")[0], secrets.token_hex(4))
    return ""


_TEAM_PARAM = f"pn-param=TEAM000001.{BUNDLE}.voip"
_TOK = "ab" * 32


@pytest.mark.parametrize(
    ("contact", "status", "reason_part"),
    [
        (f"<sip:d@127.0.0.1:5950;pn-provider=apns;pn-prid=%zz;{_TEAM_PARAM}>".encode(), 400, "percent"),
        (f"<sip:d@127.0.0.1:5950;pn-provider=apns;{_TEAM_PARAM};pn-prid={_TOK}".encode(), 400, ""),
        (f"<sip:d@127.0.0.1:5950;pn-provider=apns;{_TEAM_PARAM};pn-prid=>".encode(), 400, "pn-prid"),
        (f"<sip:d@127.0.0.1:5950;pn-provider=apns;{_TEAM_PARAM};pn-prid={_TOK};x-pad={'p' * 8192}>".encode(),
         400, ""),
        (f"<sip:d@127.0.0.1:5950;pn-provider=apns;{_TEAM_PARAM};pn-prid={_TOK};x-name=".encode()
         + b"\xff\xfe\xc3(>", 400, ""),
        (f"<sip:d@127.0.0.1:5950;pn-provider=apns;{_TEAM_PARAM};pn-prid=\xe9\xe9>".encode("latin-1"), 400, ""),
        (f"<sip:d@127.0.0.1:5950;pn-provider=gcm-web;pn-param=x;pn-prid={_TOK}>".encode(), 555, "Not Supported"),
    ],
    ids=["bad-percent", "unterminated-angle", "empty-prid", "8kb-contact", "invalid-utf8-param",
         "invalid-utf8-prid", "unknown-provider"],
)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_malformed_contact_rejected_nothing_stored_and_service_goes_on(
    stack: Stack, tmp: Path, contact: bytes, status: int, reason_part: str, transport: str
) -> None:
    user = _user()
    raw = _raw_register(stack, user, [b"Contact: " + contact], transport)
    assert raw, "no answer to the REGISTER"
    first = raw.split("\r\n", 1)[0]
    code, reason = int(first[8:11]), first[12:]
    assert code == status, first
    assert reason_part in reason and reason.isascii() and 0 < len(reason) <= 80, first
    if code == 400:
        assert reason.lower() != "bad request", "the reason phrase must say what is wrong"
    assert stack.store.devices(_aor(user)) == []
    _assert_still_serving(stack)


@pytest.mark.parametrize("push_first", [True, False])
def test_register_with_two_contacts_one_with_push_params(stack: Stack, tmp: Path, push_first: bool) -> None:
    """Documented outcome: the FIRST Contact decides. Push params first: a push registration
    (device stored for that contact); plain first: a plain registration, nothing in Redis.
    Both bindings are saved either way."""
    user, tok = _user(), apns_token()
    push = f"<sip:dev@127.0.0.1:5951;pn-provider=apns;{_TEAM_PARAM};pn-prid={tok}>".encode()
    plain = b"<sip:desk@127.0.0.1:5952>"
    lines = [b"Contact: " + c for c in ((push, plain) if push_first else (plain, push))]
    raw = _raw_register(stack, user, lines)
    assert raw.startswith("SIP/2.0 200"), raw[:300]
    bound = ",".join(_header(raw, "Contact"))
    assert "127.0.0.1:5951" in bound and "127.0.0.1:5952" in bound
    devices = stack.store.devices(_aor(user))
    if push_first:
        assert _header(raw, "Feature-Caps") == ['*;+sip.pns="apns"']
        [device] = devices
        assert device.params.voip_token == tok and ":5951;" in device.contact
    else:
        assert _header(raw, "Feature-Caps") == ['*;+sip.pns="apns,fcm"']
        assert devices == []
    _assert_still_serving(stack)
