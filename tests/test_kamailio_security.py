"""Attack suite: real Kamailio (KEMI mode, push role, auth on by default) + Redis + sandbox.

Each test plays an attacker against the running proxy, over UDP and TCP where the transport
matters: forged digest responses, other domains, nonce replay, floods, push spam, bad Expires,
apps we do not serve. The attacker sends from 127.0.0.2 (the flood from 127.0.0.4), a
legitimate user from 127.0.0.3: other hosts as far as Kamailio is concerned (it listens on
127.0.0.1 only, and only its own addresses are exempt from the flood limit).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace

import pytest

from harness.sipua import SipPhone, open_sip_socket
from pushlib import access, credentials, schema
from tests.support import (
    DOMAIN,
    KAMAILIO_CFG,
    ROOT,
    SipClient,
    SipResponse,
    Stack,
    apns_token,
    free_port,
    kamailio_process,
    push_kind,
    push_stack,
    rfc8599_apns_contact,
    wait_log,
)

TRANSPORTS = ["udp", "tcp"]
OTHER = "other.test"  # a second served domain (LOCAL_DOMAINS)
EVIL = "evil.example"  # a domain we do not serve
ATTACKER = "127.0.0.2"
LEGIT = "127.0.0.3"
FLOODER = "127.0.0.4"
MAX_PARKED = 2
MAX_PUSHES = 3
WAIT = 3.0


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    defines: dict[str, str | None] = {
        "LOCAL_DOMAINS": f'"{DOMAIN},{OTHER}"',
        "MAX_PARKED_PER_USER": str(MAX_PARKED),
        "MAX_CALL_PUSHES_PER_MINUTE": str(MAX_PUSHES),
        "PIKE_DENSITY": "60",
    }
    with push_stack(wait_window=WAIT, awake_window=10, extra_defines=defines) as s:
        yield s


@pytest.fixture(autouse=True)
def show_log_on_failure(stack: Stack) -> Iterator[None]:
    yield
    # printed by pytest only when the test failed
    print("\n".join(line for line in stack.kamailio.log().splitlines()
                    if "pusher" in line or "ERROR" in line)[-6000:])


def _user() -> str:
    return "u" + uuid.uuid4().hex[:10]


def _aor(user: str, domain: str = DOMAIN) -> str:
    return f"sip:{user}@{domain}"


class Peer(SipPhone):
    """A SIP endpoint on another loopback host: sends hand-made requests, reads what comes back."""

    keep_requests = True

    def __init__(self, port: int, transport: str = "udp", source: str = ATTACKER) -> None:
        proxy = ("127.0.0.1", port)
        super().__init__(open_sip_socket(proxy, transport, source), transport, proxy)
        self.source = source

    def request_text(self, method: str, ruri: str, from_uri: str, to_uri: str, *, call_id: str | None = None,
                     cseq: int = 1, headers: tuple[str, ...] = (), body: str = "") -> str:
        lines = [
            f"{method} {ruri} SIP/2.0",
            f"Via: SIP/2.0/{self.transport.upper()} {self.source}:{self.local_port};"
            f"branch=z9hG4bK{secrets.token_hex(8)};rport",
            f"From: <{from_uri}>;tag={secrets.token_hex(4)}",
            f"To: <{to_uri}>",
            f"Call-ID: {call_id or uuid.uuid4().hex}",
            f"CSeq: {cseq} {method}",
            "Max-Forwards: 70",
            *headers,
        ]
        if body:
            lines.append("Content-Type: application/sdp")
        return "\r\n".join(lines) + f"\r\nContent-Length: {len(body)}\r\n\r\n{body}"

    def ask(self, text: str, timeout: float = 5.0) -> SipResponse:
        self.send(text)
        return self.response(timeout)


def _fields(challenge: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="?([^",]*)"?', challenge))


def _digest(ha1: bytes, method: str, uri: str, user: str, challenge: str, nc: str = "00000001") -> str:
    """An Authorization value computed over raw HA1 bytes (what a forger controls)."""
    f = _fields(challenge)
    cnonce = secrets.token_hex(4)
    ha2 = hashlib.md5(f"{method}:{uri}".encode()).hexdigest().encode()
    if "qop" in f:
        resp = hashlib.md5(ha1 + b":" + f"{f['nonce']}:{nc}:{cnonce}:auth:".encode() + ha2).hexdigest()
        return (f'Digest username="{user}", realm="{f["realm"]}", nonce="{f["nonce"]}", uri="{uri}", '
                f'response="{resp}", algorithm=MD5, qop=auth, nc={nc}, cnonce="{cnonce}"')
    resp = hashlib.md5(ha1 + b":" + f["nonce"].encode() + b":" + ha2).hexdigest()
    return (f'Digest username="{user}", realm="{f["realm"]}", nonce="{f["nonce"]}", uri="{uri}", '
            f'response="{resp}", algorithm=MD5')


def _ha1(user: str, realm: str, password: str) -> bytes:
    return credentials.ha1(user, realm, password).encode()


def _register(peer: Peer, user: str, contact: str, *, domain: str = DOMAIN, password: str | None = None,
              ha1: bytes | None = None, expires: str = "300", call_id: str | None = None) -> SipResponse:
    """REGISTER, answering one challenge with `password` or with raw `ha1` bytes."""
    call_id = call_id or uuid.uuid4().hex
    uri = f"sip:{domain}"
    base = (f"Contact: {contact}", f"Expires: {expires}")
    r = peer.ask(peer.request_text("REGISTER", uri, _aor(user, domain), _aor(user, domain), call_id=call_id,
                                   headers=base))
    if r.status != 401 or (password is None and ha1 is None):
        return r
    challenge = r.header("WWW-Authenticate")[0]
    key = ha1 if ha1 is not None else _ha1(user, _fields(challenge)["realm"], password or "")
    auth = _digest(key, "REGISTER", uri, user, challenge)
    return peer.ask(peer.request_text("REGISTER", uri, _aor(user, domain), _aor(user, domain), call_id=call_id,
                                      cseq=2, headers=(*base, f"Authorization: {auth}")))


def _invite_text(peer: Peer, callee: str, domain: str = DOMAIN, caller: str = f"sip:c@{EVIL}") -> str:
    """An INVITE to callee@domain; the default caller is from another domain (no auth applies)."""
    return peer.request_text("INVITE", f"sip:{callee}@{domain}", caller, f"sip:{callee}@{domain}",
                             headers=(f"Contact: <sip:c@{peer.source}:{peer.local_port}>",), body="v=0\r\n")


def _invite(peer: Peer, callee: str, domain: str = DOMAIN, caller: str = f"sip:c@{EVIL}",
            timeout: float = 5.0) -> SipResponse:
    return peer.ask(_invite_text(peer, callee, domain, caller), timeout)


def _device(stack: Stack) -> SipPhone:
    """The answering half of a phone: a UDP socket the proxy sends INVITEs to."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return SipPhone(sock, "udp", ("127.0.0.1", stack.kamailio.port))


def _no_invite(phone: SipPhone, seconds: float) -> bool:
    try:
        phone.request("INVITE", timeout=seconds)
    except (TimeoutError, OSError):
        return True
    return False


# --------------------------------------------------------------------------- forged digest


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_placeholder_ha1_never_logs_anyone_in(stack: Stack, transport: str) -> None:
    """The old route checked a placeholder HA1 for users without credentials: a digest over "-" +
    31 NULs (fresh worker) or "-\\0" + the tail of the attacker's own last HA1 got 200."""
    victim, mallory = _user(), _user()
    password = stack.add_user(mallory)
    trap = _device(stack)
    contact = f"<sip:trap@127.0.0.1:{trap.local_port}>"
    with Peer(stack.kamailio.port, transport) as peer:
        r = _register(peer, mallory, f"<sip:m@{ATTACKER}:5999>", password=password)
        assert r.status == 200  # the attacker's own account works, and primes the worker's buffer
        realm = DOMAIN
        own = _ha1(mallory, realm, password)
        patterns = [b"-" + b"\0" * 31, b"-\0" + own[2:], b"-", b""]
        for _ in range(2):  # both workers (2 children, taken in turn) see every pattern
            for pattern in patterns:
                r = _register(peer, victim, contact, ha1=pattern)
                assert r.status == 401, f"forged HA1 {pattern!r} answered {r.status}"
    assert stack.store.devices(_aor(victim)) == []
    with Peer(stack.kamailio.port, transport, LEGIT) as caller:
        assert _invite(caller, victim).status == 404
    assert _no_invite(trap, 0.3)
    trap.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unknown_user_and_wrong_password_get_the_same_answer(stack: Stack, transport: str) -> None:
    real = _user()
    stack.add_user(real)
    with Peer(stack.kamailio.port, transport) as peer:
        wrong = _register(peer, real, f"<sip:x@{ATTACKER}:5999>", password="guess")
        ghost = _register(peer, _user(), f"<sip:x@{ATTACKER}:5999>", password="guess")
    assert (wrong.status, wrong.reason) == (ghost.status, ghost.reason) == (401, "Unauthorized")
    for r in (wrong, ghost):
        challenge = r.header("WWW-Authenticate")[0]
        assert 'qop="auth"' in challenge and "stale" not in challenge
    assert sorted(h for h, _ in wrong.headers) == sorted(h for h, _ in ghost.headers)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_replayed_digest_response_is_refused(stack: Stack, transport: str) -> None:
    user = _user()
    password = stack.add_user(user)
    contact = f"<sip:x@{ATTACKER}:5998>"
    call_id = uuid.uuid4().hex
    with Peer(stack.kamailio.port, transport) as peer:
        first = peer.ask(peer.request_text("REGISTER", f"sip:{DOMAIN}", _aor(user), _aor(user), call_id=call_id,
                                           headers=(f"Contact: {contact}",)))
        auth = _digest(_ha1(user, DOMAIN, password), "REGISTER", f"sip:{DOMAIN}", user,
                       first.header("WWW-Authenticate")[0])
        signed = (f"Contact: {contact}", f"Authorization: {auth}")
        ok = peer.ask(peer.request_text("REGISTER", f"sip:{DOMAIN}", _aor(user), _aor(user), call_id=call_id,
                                        cseq=2, headers=signed))
        assert ok.status == 200
        # the captured Authorization sent again (same nc): a new request, not a retransmission
        replay = peer.ask(peer.request_text("REGISTER", f"sip:{DOMAIN}", _aor(user), _aor(user), call_id=call_id,
                                            cseq=3, headers=signed))
        assert replay.status == 401
        assert "stale=true" in replay.header("WWW-Authenticate")[0]
        other_call = peer.ask(peer.request_text("REGISTER", f"sip:{DOMAIN}", _aor(user), _aor(user), cseq=1,
                                                headers=signed))
        assert other_call.status == 401


# --------------------------------------------------------------------------- domains


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_register_for_a_foreign_domain_is_refused_before_anything_is_stored(stack: Stack, transport: str) -> None:
    user = _user()
    stack.subscribers.set_password(user, EVIL, "pw")  # even with credentials for that domain
    with Peer(stack.kamailio.port, transport) as peer:
        r = _register(peer, user, rfc8599_apns_contact(5990, apns_token()), domain=EVIL, password="pw")
        assert (r.status, r.reason) == (403, "Domain Not Served")
        # To ours, request URI foreign (and the other way round): refused too
        for ruri, to in ((f"sip:{EVIL}", _aor(user)), (f"sip:{DOMAIN}", _aor(user, EVIL))):
            r = peer.ask(peer.request_text("REGISTER", ruri, to, to, headers=("Contact: <sip:x@127.0.0.2:1>",)))
            assert r.status == 403
    assert stack.store.devices(_aor(user, EVIL)) == []
    assert "foreign-domain" in wait_log(stack.kamailio, "reason=foreign-domain")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_same_user_name_in_two_domains_shares_nothing(stack: Stack, transport: str) -> None:
    """alice@127.0.0.1 and alice@other.test are two users: registering, listing, wiping or
    calling one never touches the other (the old usrloc had no use_domain)."""
    alice, tok = _user(), apns_token()
    phone = _device(stack)
    pw_real = stack.add_user(alice)
    stack.subscribers.set_password(alice, OTHER, "other-pw")
    contact = rfc8599_apns_contact(phone.local_port, tok)
    with Peer(stack.kamailio.port, transport, LEGIT) as real:
        assert _register(real, alice, contact, password=pw_real).status == 200
    with Peer(stack.kamailio.port, transport) as evil:
        r = _register(evil, alice, f"<sip:evil@{ATTACKER}:5991>", domain=OTHER, password="other-pw")
        assert r.status == 200
        assert tok not in r.raw and "5991" in r.raw  # its own binding only
        # a query REGISTER (no Contact) lists the other domain's bindings only: no pn-prid leak
        call_id = uuid.uuid4().hex
        q = evil.ask(evil.request_text("REGISTER", f"sip:{OTHER}", _aor(alice, OTHER), _aor(alice, OTHER),
                                       call_id=call_id))
        auth = _digest(_ha1(alice, OTHER, "other-pw"), "REGISTER", f"sip:{OTHER}", alice,
                       q.header("WWW-Authenticate")[0])
        q = evil.ask(evil.request_text("REGISTER", f"sip:{OTHER}", _aor(alice, OTHER), _aor(alice, OTHER),
                                       call_id=call_id, cseq=2, headers=(f"Authorization: {auth}",)))
        assert q.status == 200 and tok not in q.raw and "pn-prid" not in q.raw
        # Contact: * wipes the other domain's bindings, not the real alice's
        r = _register(evil, alice, "*", domain=OTHER, password="other-pw", expires="0")
        assert r.status == 200
    assert [d.params.voip_token for d in stack.store.devices(_aor(alice))] == [tok]
    # the real alice's calls reach her phone only (she is awake: rung at once)
    with Peer(stack.kamailio.port, "udp", LEGIT) as caller:
        caller.send(_invite_text(caller, alice))
        invite = phone.request("INVITE", timeout=5)
        assert invite.startswith(f"INVITE sip:dev@127.0.0.1:{phone.local_port}")
        phone.answer(invite, 486, "Busy Here", to_tag="t1")
        assert caller.response(5).status == 486
    phone.close()


def test_initial_request_for_a_foreign_domain_is_not_relayed(stack: Stack) -> None:
    with Peer(stack.kamailio.port, "udp") as peer:
        r = _invite(peer, "bob", domain=EVIL)
        assert (r.status, r.reason) == (403, "Relaying Forbidden")


# --------------------------------------------------------------------------- abuse limits


def _sleeping_push_user(stack: Stack) -> tuple[str, str]:
    user, tok = _user(), apns_token()
    with SipClient(stack.kamailio.port) as c:
        r = c.register(user, rfc8599_apns_contact(5980, tok), password=stack.add_user(user))
    assert r.status == 200
    for d in stack.store.devices(_aor(user)):
        stack.store.save_device(replace(d, registered_at=time.time() - 3600))
    return user, tok


def test_parked_calls_per_callee_are_bounded(stack: Stack) -> None:
    user, tok = _sleeping_push_user(stack)
    stack.handle.control.clear()
    peers = [Peer(stack.kamailio.port, "udp", LEGIT) for _ in range(MAX_PARKED + 1)]
    try:
        for p in peers[:MAX_PARKED]:
            p.send(_invite_text(p, user))
            assert p.response(5, skip_provisional=False).status == 100  # parked
        started = time.monotonic()
        extra = _invite(peers[-1], user)
        assert (extra.status, extra.reason) == (486, "Busy Here")
        assert time.monotonic() - started < 1.0  # at once, without a push
        assert len(stack.wait_pushes(tok, MAX_PARKED, timeout=5)) == MAX_PARKED
        for p in peers[:MAX_PARKED]:  # the parked calls end at their window, as usual
            assert p.response(WAIT + 5).status == 480
    finally:
        for p in peers:
            p.close()
    assert [push_kind(x) for x in stack.pushes(tok)].count("incomingCall") == MAX_PARKED
    with Peer(stack.kamailio.port, "udp", LEGIT) as p:  # the slots came back
        p.send(_invite_text(p, user))
        assert p.response(5, skip_provisional=False).status == 100
        assert p.response(WAIT + 5).status == 480


def test_call_pushes_per_device_per_minute_are_bounded(stack: Stack) -> None:
    user, tok = _sleeping_push_user(stack)
    stack.handle.control.clear()
    if time.time() % 60 > 60 - 4 * MAX_PUSHES:  # keep the calls inside one minute's bucket
        time.sleep(61 - time.time() % 60)
    with Peer(stack.kamailio.port, "udp", LEGIT) as p:
        for i in range(MAX_PUSHES):
            call = _invite_text(p, user)
            p.send(call)
            assert p.response(5, skip_provisional=False).status == 100
            assert len(stack.wait_pushes(tok, i + 1, kind="incomingCall")) == i + 1
            p.send(call.replace("INVITE sip:", "CANCEL sip:", 1).replace(" INVITE\r\n", " CANCEL\r\n")
                   .replace("Content-Type: application/sdp\r\nContent-Length: 5\r\n\r\nv=0\r\n",
                            "Content-Length: 0\r\n\r\n"))
            codes = {p.response(5).status, p.response(5).status}
            assert codes == {200, 487}
        over = _invite(p, user)
        assert over.status == 480  # not pushed again, so nobody can be reached
    assert sorted(push_kind(x) for x in stack.pushes(tok)).count("incomingCall") == MAX_PUSHES
    assert wait_log(stack.kamailio, "push-rate-limited")


@pytest.mark.parametrize(
    ("expires", "lifetime"),
    [("99999999", 3600), ("5", 60), ("300", 300), ("\u0661\u0662\u0660", None), ("+120", None), ("1_200", None)],
    ids=["huge", "tiny", "normal", "arabic-digits", "signed", "underscore"],
)
def test_expires_header_is_clamped_before_it_becomes_a_ttl(stack: Stack, expires: str, lifetime: int | None) -> None:
    user, tok = _user(), apns_token()
    with Peer(stack.kamailio.port, "tcp", LEGIT) as peer:
        r = _register(peer, user, rfc8599_apns_contact(5975, tok), password=stack.add_user(user), expires=expires)
    if lifetime is None:  # not a number: refused by the SIP sanity checks, nothing stored
        assert r.status == 400
        assert stack.store.devices(_aor(user)) == []
        return
    assert r.status == 200
    (device,) = stack.store.devices(_aor(user))
    assert abs(device.expires_at - device.registered_at - lifetime) < 2


@pytest.mark.parametrize("param", ["\u0661\u0662\u0660", "+120", "1_200", "99999999999999999999", "-5"])
def test_bad_contact_expires_param_gets_the_default_lifetime(stack: Stack, param: str) -> None:
    """Like the registrar: a contact `expires` that is not ASCII digits counts as the default
    (3600), never as a number Python's int() would read (Unicode digits, signs, underscores)."""
    user, tok = _user(), apns_token()
    contact = rfc8599_apns_contact(5974, tok) + f";expires={param}"
    with Peer(stack.kamailio.port, "tcp", LEGIT) as peer:
        r = _register(peer, user, contact, password=stack.add_user(user), expires="300")
    assert r.status == 200
    (device,) = stack.store.devices(_aor(user))
    assert abs(device.expires_at - device.registered_at - 3600) < 2


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_register_for_an_app_we_do_not_serve_is_refused(stack: Stack, transport: str) -> None:
    user = _user()
    password = stack.add_user(user)
    contact = rfc8599_apns_contact(5976, apns_token(), bundle="com.attacker.app")
    with Peer(stack.kamailio.port, transport, LEGIT) as peer:
        r = _register(peer, user, contact, password=password)
        assert r.status == 555 and "App Not Configured" in r.reason
        stack.store.save_app(replace(stack.apns_app, app_id="com.disabled.app", enabled=False))
        r = _register(peer, user, rfc8599_apns_contact(5976, apns_token(), bundle="com.disabled.app"),
                      password=password)
        assert r.status == 555 and "App Disabled" in r.reason
    assert stack.store.devices(_aor(user)) == []


def test_call_push_names_the_callee(stack: Stack) -> None:
    user, tok = _sleeping_push_user(stack)
    with Peer(stack.kamailio.port, "udp", LEGIT) as p:
        p.send(_invite_text(p, user))
        (push,) = stack.wait_pushes(tok, 1, kind="incomingCall")
        payload = push["payload"]
        assert isinstance(payload, dict) and payload["callee"] == _aor(user)
        assert p.response(WAIT + 5).status == 480


def test_flood_is_cut_off_and_a_legitimate_user_is_still_served(stack: Stack) -> None:
    user = _user()
    password = stack.add_user(user)
    flood = Peer(stack.kamailio.port, "udp", FLOODER)
    answered = 0
    try:
        flood.sock.setblocking(False)
        for i in range(600):  # 600 requests in well under a second: far above 60 per 2 s
            flood.send(flood.request_text("OPTIONS", f"sip:{user}@{DOMAIN}", f"sip:f@{EVIL}", _aor(user), cseq=i + 1))
        time.sleep(0.5)
        while True:
            try:
                flood.sock.recv(65535)
                answered += 1
            except BlockingIOError:
                break
        # still flooding: the source stays banned
        flood.sock.setblocking(True)
        flood.send(flood.request_text("OPTIONS", f"sip:{user}@{DOMAIN}", f"sip:f@{EVIL}", _aor(user)))
        with pytest.raises(TimeoutError):
            flood.response(1.0)
        # meanwhile, a user on another address registers and is called as usual
        phone = _device(stack)
        with Peer(stack.kamailio.port, "udp", LEGIT) as legit:
            r = _register(legit, user, f"<sip:desk@127.0.0.1:{phone.local_port}>", password=password)
            assert r.status == 200
            legit.send(_invite_text(legit, user))
            invite = phone.request("INVITE", timeout=5)
            phone.answer(invite, 603, "Decline", to_tag="t2")
            assert legit.response(5).status == 603
        phone.close()
    finally:
        flood.close()
    assert answered < 120, f"{answered} replies to a 600-request flood"
    assert f"src={FLOODER}" in wait_log(stack.kamailio, "source-banned")


# --------------------------------------------------------------------------- safe defaults


def _start(defines: dict[str, str | None]) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="pn-refuse-") as rundir:
        argv = ["kamailio", "-f", str(KAMAILIO_CFG), "-DD", "-E", "-Y", rundir, "-w", str(ROOT)]
        for name, value in defines.items():
            argv += ["-A", name if value is None else f"{name}={value}"]
        return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)


def test_auth_off_on_a_public_address_refuses_to_start() -> None:
    # 192.0.2.1 (TEST-NET-1) is on no interface here: the refusal comes before any bind
    base: dict[str, str | None] = {"WITH_PUSHER": None, "WITHOUT_AUTH": None, "LISTEN_IP": "192.0.2.1",
                                   "SIP_PORT": str(free_port())}
    refused = _start(base)
    assert refused.returncode != 0
    lines = [line for line in refused.stderr.splitlines() if "refusing to start" in line]
    assert len(lines) == 1 and "not loopback" in lines[0] and "ALLOW_INSECURE" in lines[0]
    insecure = _start({**base, "ALLOW_INSECURE": None})  # explicit: passes our check (then the bind fails)
    assert "refusing to start" not in insecure.stderr


def test_register_tls_only_refuses_plain_transports(stack: Stack) -> None:
    defines: dict[str, str | None] = {"WITH_PUSHER": None, "REGISTER_TLS_ONLY": None, "CHILDREN": "1",
                                      "REDIS_URL": f'"{stack.redis.url}"'}
    with kamailio_process(defines) as k:
        for transport in TRANSPORTS:
            with Peer(k.port, transport, LEGIT) as peer:
                r = peer.ask(peer.request_text("REGISTER", f"sip:{DOMAIN}", _aor("bob"), _aor("bob"),
                                               headers=("Contact: <sip:b@127.0.0.3:1>",)))
                assert (r.status, r.reason) == (403, "REGISTER Requires TLS")


def test_default_config_has_auth_on(stack: Stack) -> None:
    """kamailio.cfg with nothing but the push role: a REGISTER is challenged, even for a user
    without credentials, and nothing is stored."""
    user = _user()
    k_defines: dict[str, str | None] = {"WITH_PUSHER": None, "CHILDREN": "1", "REDIS_URL": f'"{stack.redis.url}"'}
    with kamailio_process(k_defines) as k, Peer(k.port, "udp", LEGIT) as peer:
        r = peer.ask(peer.request_text("REGISTER", f"sip:{DOMAIN}", _aor(user), _aor(user),
                                       headers=(f"Contact: {rfc8599_apns_contact(5977, apns_token())}",)))
        assert r.status == 401
    assert stack.store.devices(_aor(user)) == []


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_folded_headers_cannot_forge_log_lines(stack: Stack, transport: str) -> None:
    """A Call-ID (in every log line's prefix) or a User-Agent folded over two lines must not start
    a line of its own in Kamailio's log."""
    marker = "FORGED" + uuid.uuid4().hex[:8]
    user = _user()
    stack.add_user(user)
    with Peer(stack.kamailio.port, transport) as peer:
        text = peer.request_text("REGISTER", f"sip:{DOMAIN}", _aor(user), _aor(user),
                                 call_id=f"inj{uuid.uuid4().hex[:6]}\r\n {marker} ERROR: fake",
                                 headers=(f"User-Agent: x\r\n {marker} ua", "Contact: <sip:x@127.0.0.2:5999>",
                                          'Authorization: Digest username="' + user + '", realm="127.0.0.1", '
                                          'nonce="bad", uri="sip:127.0.0.1", response="00"'))
        peer.send(text)
        with pytest.raises((TimeoutError, ConnectionError, OSError)):
            while True:
                peer.response(1.0)
    log = stack.kamailio.log()
    assert marker in log  # the request was logged...
    for line in log.splitlines():
        assert not line.lstrip().startswith(marker), line  # ...never as a line of its own


_NOT_UTF8 = [
    b"REGISTER sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.2:{p};rport;branch=z9hG4bK1{n}\r\n"
    b"From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:\xff@127.0.0.1>\r\nCall-ID: r1{n}\r\nCSeq: 1 REGISTER\r\n"
    b"Max-Forwards: 70\r\nContact: <sip:a@127.0.0.2:20000>\r\nContent-Length: 0\r\n\r\n",
    b"INVITE sip:bob@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.2:{p};rport;branch=z9hG4bK2{n}\r\n"
    b"From: <sip:\xff@127.0.0.1>;tag=1\r\nTo: <sip:bob@127.0.0.1>\r\nCall-ID: r2{n}\r\nCSeq: 1 INVITE\r\n"
    b"Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
    b"INVITE sip:\xff@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.2:{p};rport;branch=z9hG4bK3{n}\r\n"
    b"From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:b@127.0.0.1>\r\nCall-ID: r3{n}\r\nCSeq: 1 INVITE\r\n"
    b"Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
    b"REGISTER sip:\xff127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.2:{p};rport;branch=z9hG4bK4{n}\r\n"
    b"From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:a@127.0.0.1>\r\nCall-ID: r4{n}\r\nCSeq: 1 REGISTER\r\n"
    b"Contact: <sip:a@127.0.0.2:20000>\r\nContent-Length: 0\r\n\r\n",
    b"BYE sip:dev@127.0.0.1:20000 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.2:{p};rport;branch=z9hG4bK5{n}\r\n"
    b"From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:\xff@127.0.0.1>;tag=2\r\nCall-ID: r5{n}\r\nCSeq: 2 BYE\r\n"
    b"Route: <sip:example.invalid;lr>\r\nContent-Length: 0\r\n\r\n",
    b"INVITE sip:\x00u1@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.2:{p};rport;branch=z9hG4bK6{n}\r\n"
    b"From: <sip:a@example.invalid>;tag=1\r\nTo: <sip:u1@127.0.0.1>\r\nCall-ID: r6{n}\r\nCSeq: 1 INVITE\r\n"
    b"Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
    b"INVITE sip:u1@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.2:{p};rport;branch=z9hG4bK7{n}\r\n"
    b"From: <sip:a@example.invalid>;tag=1\r\nTo: <sip:u1@127.0.0.1>\r\nCall-ID: r7\xff{n}\r\nCSeq: 1 INVITE\r\n"
    b"Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
]


@pytest.mark.parametrize("index", range(len(_NOT_UTF8)), ids=["to-user", "from-user", "ruri-user", "ruri-host",
                                                              "in-dialog-to-user", "ruri-nul", "call-id"])
def test_uris_with_bytes_no_uri_holds_get_400_not_a_router_error(stack: Stack, index: int) -> None:
    """Found by the fuzzer: such bytes reached Redis keys and KSR calls and ended in route-error."""
    before = stack.kamailio.log().count("route-error")
    with Peer(stack.kamailio.port, "udp") as peer:
        peer.sock.sendto(_NOT_UTF8[index].replace(b"{p}", str(peer.local_port).encode())
                         .replace(b"{n}", uuid.uuid4().hex[:8].encode()), peer.proxy)
        r = peer.response(5)
    assert (r.status, r.reason) == (400, "Bad Request (Invalid URI Bytes)")
    assert stack.kamailio.log().count("route-error") == before


def test_caller_name_that_is_not_utf8_still_parks_and_pushes(stack: Stack) -> None:
    """A From display name with bytes that are not UTF-8 never reaches the job stream (the fuzzer,
    seed 3, found the same kind of bytes in a Call-ID reaching it: now a 400, case "call-id")."""
    user, tok = _sleeping_push_user(stack)
    before = stack.kamailio.log().count("route-error")
    with Peer(stack.kamailio.port, "udp", LEGIT) as p:
        text = _invite_text(p, user).replace(f"From: <sip:c@{EVIL}>", 'From: "Bob \udcff" <sip:c@example.invalid>')
        p.sock.sendto(text.encode("utf-8", "surrogateescape"), p.proxy)
        assert p.response(5, skip_provisional=False).status == 100
        (push,) = stack.wait_pushes(tok, 1, kind="incomingCall")
        payload = push["payload"]  # (the unreadable display name gives way to the From user)
        assert isinstance(payload, dict) and payload["caller_name"] == "c"
        assert p.response(WAIT + 5).status == 480
    assert stack.kamailio.log().count("route-error") == before


@pytest.mark.parametrize("method", ["BYE", "INVITE", "MESSAGE"])
def test_forged_in_dialog_request_is_not_relayed(stack: Stack, method: str) -> None:
    """A To tag and a Route naming the proxy do not make a dialog it record-routed: without the
    proxy's signature in that Route the request is refused, never relayed (an open relay else)."""
    trap = _device(stack)
    with Peer(stack.kamailio.port, "udp") as peer:
        text = peer.request_text(
            method, f"sip:victim@127.0.0.1:{trap.local_port}", f"sip:a@{EVIL}", "sip:victim@elsewhere.example",
            headers=(f"Route: <sip:127.0.0.1:{stack.kamailio.port};lr>",),
        ).replace("To: <sip:victim@elsewhere.example>", "To: <sip:victim@elsewhere.example>;tag=forged")
        r = peer.ask(text)
        assert (r.status, r.reason) == (403, "Dialog Not Recognized")
        # the same with a made-up signature
        r = peer.ask(text.replace(";lr>", ";lr;pnd=000000000000000000000000>").replace("z9hG4bK", "z9hG4bKx"))
        assert r.status == 403
        # a valid signature of this Call-ID (as a real dialog's Record-Route would show it) on a
        # Route that names another host: loose routing would send it there, so it is refused too
        call_id = next(line.split(":", 1)[1].strip() for line in text.split("\r\n") if line.startswith("Call-ID:"))
        sig = access.dialog_signature(str(stack.store.client.get(schema.ROUTE_SECRET_KEY)).encode(), call_id)
        r = peer.ask(text.replace(f"<sip:127.0.0.1:{stack.kamailio.port};lr>",
                                  f"<sip:127.0.0.1:{trap.local_port};lr;pnd={sig}>").replace("z9hG4bK", "z9hG4bKy"))
        assert (r.status, r.reason) == (403, "Dialog Not Recognized")
        # a signature that is not ASCII is refused as any wrong one is, not an error of the route
        before = stack.kamailio.log().count("route-error")
        r = peer.ask(text.replace(";lr>", ";lr;pnd=é00000000000000000000000>").replace("z9hG4bK", "z9hG4bKz"))
        assert (r.status, r.reason) == (403, "Dialog Not Recognized")
        assert stack.kamailio.log().count("route-error") == before
    assert _no_invite(trap, 0.3) and not _got_any(trap, 0.2)
    trap.close()


def _got_any(phone: SipPhone, seconds: float) -> bool:
    try:
        phone.sock.settimeout(seconds)
        phone.sock.recv(65535)
    except (TimeoutError, OSError):
        return False
    return True


# --------------------------------------------------------------------------- Redis down (last: the
# restart empties Redis; the first push after it is issue 10's known loss)


def test_redis_down_invite_claiming_a_local_caller_gets_503(stack: Stack) -> None:
    """While Redis is down nobody's credentials can be checked: an INVITE whose From claims one of
    our domains gets 503 (it could be an impersonation); a caller from another domain is routed."""
    callee = _user()
    password = stack.add_user(callee)
    phone = _device(stack)
    with Peer(stack.kamailio.port, "udp", LEGIT) as legit:
        assert _register(legit, callee, f"<sip:desk@127.0.0.1:{phone.local_port}>", password=password).status == 200
    stack.redis.stop()
    try:
        time.sleep(0.2)
        with Peer(stack.kamailio.port, "udp", LEGIT) as caller:
            r = _invite(caller, callee, caller=_aor("someone"))
            assert (r.status, r.reason) == (503, "Credentials Store Unavailable")
            assert r.header("Retry-After") == ["5"]
            caller.send(_invite_text(caller, callee))
            invite = phone.request("INVITE", timeout=5)
            phone.answer(invite, 486, "Busy Here", to_tag="t3")
            assert caller.response(5).status == 486
    finally:
        stack.redis.start_again()
        phone.close()
        stack.store.save_app(stack.apns_app)
        stack.store.save_app(stack.fcm_app)
        for user, pw in list(stack.passwords.items()):
            stack.add_user(user, pw)
