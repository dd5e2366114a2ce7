"""Integration: SIP MESSAGE to users whose devices sleep (issue 13), on real Kamailio (KEMI mode,
auth on) + redis-server + the sandbox providers.

A device is harness.sipua.SipPhone over TCP: its Contact names its own connection's port, so what
the proxy sends it arrives on that connection; closing the socket is the phone going to sleep (or
dropping mid-way). It "sleeps" once its socket is closed and its REGISTER back-dated. Senders are
from another domain (no digest needed, as for INVITEs from outside) unless a test says otherwise.
Limits are lowered for the module so that the queue-full cases stay quick.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterator

import pytest

from harness.sipua import SipPhone, header_values, message_request, open_sip_socket
from pushlib.messages import MessageLimits
from pushlib.msgstore import MessageStore
from tests.support import (
    DOMAIN,
    NATIVE_HOST_CFG,
    SipResponse,
    Stack,
    asleep,
    fcm_token,
    payload_data,
    push_stack,
    rfc8599_fcm_contact,
    wait_log,
)

QUEUE_MAX = 120
QUEUE_BYTES = 64_000
MAX_BODY = 4000
PUSHES_PER_MINUTE = 10
COMPOSING = ('<?xml version="1.0"?><isComposing xmlns="urn:ietf:params:xml:ns:im-iscomposing">'
             "<state>active</state></isComposing>")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    extra: dict[str, str | None] = {
        "MESSAGE_QUEUE_MAX": str(QUEUE_MAX), "MESSAGE_QUEUE_BYTES": str(QUEUE_BYTES),
        "MESSAGE_MAX_BODY": str(MAX_BODY), "MESSAGE_PUSHES_PER_MINUTE": str(PUSHES_PER_MINUTE),
    }
    with push_stack(auth=True, wait_window=4, awake_window=10, extra_defines=extra) as s:
        yield s


@pytest.fixture(scope="module")
def role_stack(stack: Stack) -> Iterator[Stack]:
    """Role mode: tests/native-host.cfg including kamailio/pusher-role.cfg (route(PUSHER_MESSAGE))."""
    with push_stack(auth=False, wait_window=4, awake_window=10, cfg=NATIVE_HOST_CFG) as s:
        yield s


def _user() -> str:
    return "m" + uuid.uuid4().hex[:10]


def _aor(user: str) -> str:
    return f"sip:{user}@{DOMAIN}"


def _queued(stack: Stack, user: str) -> int:
    return MessageStore(stack.store.client, MessageLimits(MAX_BODY, QUEUE_MAX, QUEUE_BYTES)).queued(_aor(user))[0]


class Sender(SipPhone):
    """Sends MESSAGEs over UDP from `from_uri`, one transaction at a time."""

    def __init__(self, stack: Stack, from_uri: str = "sip:friend@example.net", name: str = "Friend") -> None:
        proxy = ("127.0.0.1", stack.kamailio.port)
        super().__init__(open_sip_socket(proxy, "udp"), "udp", proxy)
        self.from_uri, self.name = from_uri, name
        self.call_id = uuid.uuid4().hex
        self.cseq = 0

    def text(self, to_user: str, body: str, ctype: str = "text/plain;charset=UTF-8") -> str:
        self.cseq += 1
        return message_request(to_user, body, self.local_port, self.call_id, self.cseq, ctype, self.from_uri,
                               self.name)

    def message(self, to_user: str, body: str, ctype: str = "text/plain;charset=UTF-8") -> SipResponse:
        self.send(self.text(to_user, body, ctype))
        return self.response(5)


def _phone(stack: Stack) -> SipPhone:
    return SipPhone(open_sip_socket(("127.0.0.1", stack.kamailio.port), "tcp"), "tcp")


def _register(stack: Stack, phone: SipPhone, user: str, tok: str, instance: str) -> None:
    password = stack.passwords.get(user) or stack.add_user(user)
    r = phone.register(user, rfc8599_fcm_contact(phone.local_port, tok, "tcp", instance), password=password)
    assert r.status == 200, r.raw[:300]


def _sleeping_device(stack: Stack, user: str) -> tuple[str, str]:
    """An Android phone that registered, then slept (connection closed, REGISTER long ago)."""
    tok, instance = fcm_token(), str(uuid.uuid4())
    with _phone(stack) as phone:
        _register(stack, phone, user, tok, instance)
    asleep(stack, user)
    return tok, instance


def _receive(phone: SipPhone, count: int, timeout: float = 10.0) -> list[str]:
    """Answer `count` MESSAGEs 200 as they come; their bodies, in arrival order."""
    bodies = []
    for _ in range(count):
        req = phone.request("MESSAGE", timeout=timeout)
        phone.answer(req, 200, "OK", "d" + secrets.token_hex(3))
        bodies.append(req.split("\r\n\r\n", 1)[1])
    return bodies


def _nothing_more(phone: SipPhone, seconds: float) -> bool:
    try:
        phone.request("MESSAGE", timeout=seconds)
    except (TimeoutError, ConnectionError, OSError):
        return True
    return False


def _wait_queued(stack: Stack, user: str, count: int, timeout: float = 5.0) -> int:
    end = time.monotonic() + timeout
    while (n := _queued(stack, user)) != count and time.monotonic() < end:
        time.sleep(0.05)
    return n


# --------------------------------------------------------------------------- the flows


def test_hundred_messages_wait_and_come_in_order_after_register_even_across_a_drop(stack: Stack) -> None:
    """100 MESSAGEs for a sleeping phone: each 202 and queued, pushed (within the per-minute cap).
    The phone wakes and takes 50 then drops its connection: the other 50 stay queued and come, in
    order, at its next REGISTER; nothing twice."""
    user = _user()
    tok, instance = _sleeping_device(stack, user)
    with Sender(stack) as sender:
        for i in range(100):
            r = sender.message(user, f"m{i:03d} héllo")
            assert (r.status, r.reason) == (202, "Accepted"), r.raw[:300]
    assert _queued(stack, user) == 100
    pushes = stack.wait_pushes(tok, PUSHES_PER_MINUTE, kind="messageReceived")
    # (pushes of jobs the dispatcher works on together reach the provider in any order)
    data = next(d for d in map(payload_data, pushes) if d["body"] == "m000 héllo")
    assert data["title"] == "Friend" and data["sender"] == "Friend"
    assert data["message_id"]
    time.sleep(0.3)
    assert len(stack.pushes(tok)) == PUSHES_PER_MINUTE  # the rest queued without a push

    with _phone(stack) as phone:
        _register(stack, phone, user, tok, instance)
        first = _receive(phone, 50)
    # (closed after its 50th 200 OK: the 51st, if already sent, is never answered)
    assert first == [f"m{i:03d} héllo" for i in range(50)]
    assert _wait_queued(stack, user, 50) == 50

    with _phone(stack) as phone:
        _register(stack, phone, user, tok, instance)
        rest = _receive(phone, 50)
        assert _nothing_more(phone, 0.5)
    assert rest == [f"m{i:03d} héllo" for i in range(50, 100)]
    assert _wait_queued(stack, user, 0) == 0


def test_delivered_message_keeps_sender_type_and_date(stack: Stack) -> None:
    """What the woken phone receives: the original From (display name and URI), Content-Type and
    a Date; a message/cpim body is pushed with its inner text, another type with a generic text."""
    user = _user()
    tok, instance = _sleeping_device(stack, user)
    cpim = ("From: <sip:friend@example.net>\r\nTo: <sip:x@y>\r\n\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n\r\ninner text")
    with Sender(stack, name="Zoë") as sender:
        assert sender.message(user, cpim, "message/cpim").status == 202
        assert sender.message(user, '{"lat": 1}', "application/vnd.example.location+json").status == 202
    pushes = stack.wait_pushes(tok, 2, kind="messageReceived")
    by_body = {str(payload_data(p)["body"]): payload_data(p) for p in pushes}
    assert sorted(by_body) == ["New message", "inner text"]
    assert by_body["inner text"]["title"] == "Zoë"
    with _phone(stack) as phone:
        _register(stack, phone, user, tok, instance)
        reqs = []
        for _ in range(2):
            req = phone.request("MESSAGE", timeout=10)
            phone.answer(req, 200, "OK", "t1")
            reqs.append(req)
    assert header_values(reqs[0], "From")[0].startswith('"Zoë" <sip:friend@example.net>;tag=')
    assert header_values(reqs[0], "Content-Type") == ["message/cpim"]
    assert header_values(reqs[1], "Content-Type") == ["application/vnd.example.location+json"]
    assert reqs[0].endswith("inner text") and header_values(reqs[0], "Date")


def test_two_sleeping_devices_each_get_every_message_once(stack: Stack) -> None:
    user = _user()
    tok_a, inst_a = _sleeping_device(stack, user)
    tok_b, inst_b = _sleeping_device(stack, user)
    with Sender(stack) as sender:
        for i in range(5):
            assert sender.message(user, f"hi {i}").status == 202
    assert len(stack.wait_pushes(tok_a, 5, kind="messageReceived")) == 5
    assert len(stack.wait_pushes(tok_b, 5, kind="messageReceived")) == 5
    with _phone(stack) as phone:
        _register(stack, phone, user, tok_a, inst_a)
        assert _receive(phone, 5) == [f"hi {i}" for i in range(5)]
        assert _nothing_more(phone, 0.3)
        _register(stack, phone, user, tok_a, inst_a)  # registers again: nothing twice
        assert _nothing_more(phone, 0.5)
    assert _queued(stack, user) == 5  # still waiting for the other phone
    with _phone(stack) as phone:
        _register(stack, phone, user, tok_b, inst_b)
        assert _receive(phone, 5) == [f"hi {i}" for i in range(5)]
    assert _wait_queued(stack, user, 0) == 0


def test_awake_phone_gets_the_message_directly(stack: Stack) -> None:
    """A phone registered a moment ago and still connected answers the MESSAGE itself: its own
    reply reaches the sender; nothing is queued or pushed."""
    user, tok = _user(), fcm_token()
    with _phone(stack) as phone:
        _register(stack, phone, user, tok, str(uuid.uuid4()))
        with Sender(stack) as sender:
            sender.send(sender.text(user, "are you there?"))
            req = phone.request("MESSAGE", timeout=5)
            assert req.endswith("are you there?")
            phone.answer(req, 200, "Got It", "a1")
            r = sender.response(5)
    assert (r.status, r.reason) == (200, "Got It")
    assert _queued(stack, user) == 0 and stack.pushes(tok) == []


def test_is_composing_is_never_queued_nor_pushed(stack: Stack) -> None:
    user = _user()
    tok, _ = _sleeping_device(stack, user)
    with Sender(stack) as sender:
        r = sender.message(user, COMPOSING, "application/im-iscomposing+xml")
    assert r.status == 480
    time.sleep(0.5)
    assert stack.pushes(tok) == [] and _queued(stack, user) == 0


def test_oversized_body_413_and_queue_full_486_keep_what_was_stored(stack: Stack) -> None:
    user = _user()
    tok, instance = _sleeping_device(stack, user)
    with Sender(stack) as sender:
        r = sender.message(user, "x" * (MAX_BODY + 1))
        assert (r.status, r.reason) == (413, "Message Too Large")
        assert _queued(stack, user) == 0
        for i in range(QUEUE_BYTES // MAX_BODY):  # the bytes limit: 16 full-size bodies
            assert sender.message(user, f"{i:02d}" + "y" * (MAX_BODY - 2)).status == 202
        r = sender.message(user, "one more")
        assert (r.status, r.reason) == (486, "Message Queue Full")
    wait_log(stack.kamailio, f"message-queue-full aor=sip:{user}@{DOMAIN} limit=full-bytes")
    assert _queued(stack, user) == QUEUE_BYTES // MAX_BODY
    with _phone(stack) as phone:  # what was stored is intact and comes in order
        _register(stack, phone, user, tok, instance)
        got = _receive(phone, QUEUE_BYTES // MAX_BODY)
    assert [b[:2] for b in got] == [f"{i:02d}" for i in range(QUEUE_BYTES // MAX_BODY)]


def test_message_count_limit(stack: Stack) -> None:
    user = _user()
    _sleeping_device(stack, user)
    with Sender(stack) as sender:
        for i in range(QUEUE_MAX):
            assert sender.message(user, f"n{i}").status == 202
        r = sender.message(user, "too many")
    assert (r.status, r.reason) == (486, "Message Queue Full")
    assert _queued(stack, user) == QUEUE_MAX


def test_message_from_a_local_user_is_authenticated_and_unknown_users_404(stack: Stack) -> None:
    """Auth as for INVITE: a MESSAGE claiming one of our users must carry that user's digest (407
    without it, nothing queued); a MESSAGE for nobody gets 404."""
    user = _user()
    tok, _ = _sleeping_device(stack, user)
    victim = _user()
    stack.add_user(victim)
    with Sender(stack, from_uri=f"sip:{victim}@{DOMAIN}") as impostor:
        r = impostor.message(user, "it is me, your bank")
    assert r.status == 407 and r.header("Proxy-Authenticate")
    with Sender(stack) as sender:
        assert sender.message(_user(), "anyone?").status == 404
    time.sleep(0.3)
    assert _queued(stack, user) == 0 and stack.pushes(tok) == []


def test_role_mode_queues_pushes_and_delivers(role_stack: Stack) -> None:
    """The same through the role of a native host config: 202 + push while the phone sleeps, the
    queued MESSAGEs in order at its REGISTER; a user with nobody asleep is the host's (its 404)."""
    user = _user()
    tok, instance = _sleeping_device(role_stack, user)
    with Sender(role_stack) as sender:
        for i in range(3):
            assert sender.message(user, f"role {i}").status == 202
        r = sender.message(_user(), "nobody")
    assert (r.status, r.reason) == (404, "Host Not Found")
    # (pushes of jobs the dispatcher works on together reach the provider in any order)
    assert sorted(str(payload_data(p)["body"]) for p in role_stack.wait_pushes(tok, 3, kind="messageReceived")) == [
        f"role {i}" for i in range(3)]
    with _phone(role_stack) as phone:
        _register(role_stack, phone, user, tok, instance)
        assert _receive(phone, 3) == [f"role {i}" for i in range(3)]
    assert _wait_queued(role_stack, user, 0) == 0
