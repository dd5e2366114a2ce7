"""Integration: the flagship flow with the phone on SIP over TLS (KEMI mode, auth on, WITH_TLS).

A CA and a server certificate for 127.0.0.1 are generated in a temp dir (pushlib's sandbox PKI,
`cryptography`), a Kamailio tls.cfg points at them, and Kamailio listens on a free SIPS port.
The phone is pushlib's small SIP UA (`SipPhone`) over `ssl` that verifies the proxy's certificate. Like an
iOS app it has no listening socket: it registers, drops its connection and sleeps; woken by the
push it opens a NEW TLS connection and re-REGISTERs, and the parked INVITE (then ACK and BYE) must
reach it over that very connection (Kamailio's TCP/TLS connection reuse towards the Contact
`127.0.0.1:<its local port>;transport=tls`). The caller is a SIPp UAC over UDP.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import ssl
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from harness.sipua import SipClient, SipPhone
from harness.sipua import header_values as _header
from pushsandbox.certs import SandboxPki
from tests.support import (
    DOMAIN,
    TLS_CFG,
    Stack,
    apns_token,
    asleep,
    free_port,
    push_kind,
    push_stack,
    rfc8599_apns_contact,
    sipp_caller,
    stop_all_sipp,
)


@pytest.fixture(scope="module")
def tls_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pn-tls-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def pki(tls_dir: Path) -> SandboxPki:
    return SandboxPki.load_or_create(tls_dir / "pki")


@pytest.fixture(scope="module")
def sips_port() -> int:
    return free_port()


@contextmanager
def tls_stack(tls_dir: Path, pki: SandboxPki, sips_port: int) -> Iterator[Stack]:
    cfg = tls_dir / "tls.cfg"
    cfg.write_text(TLS_CFG.format(cert=pki.server_cert_path, key=pki.server_key_path, ca=pki.ca_path))
    defines: dict[str, str | None] = {"WITH_TLS": None, "SIPS_PORT": str(sips_port), "TLS_CFG": f'"{cfg}"'}
    with push_stack(auth=True, wait_window=10, extra_defines=defines) as s:
        yield s


@pytest.fixture(autouse=True)
def _no_stray_sipp() -> Iterator[None]:
    yield
    stop_all_sipp()


def _tls_phone(port: int, ca_file: Path) -> SipPhone:
    """A SIP UA on a new client TLS connection: it sends requests and answers what arrives on it."""
    ctx = ssl.create_default_context(cafile=str(ca_file))  # checks the proxy's cert and IP
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return SipPhone(ctx.wrap_socket(raw, server_hostname="127.0.0.1"), "tls")


def _register(phone: SipPhone, user: str, password: str, contact: str, call_id: str) -> str:
    return phone.register(user, contact, password=password, expires=600, user_agent="PushTest-TLS/1.0",
                          call_id=call_id).raw


SDP = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n"


@pytest.fixture(scope="module")
def stack(tls_dir: Path, pki: SandboxPki, sips_port: int) -> Iterator[Stack]:
    with tls_stack(tls_dir, pki, sips_port) as s:
        yield s


def test_sleeping_tls_phone_is_pushed_woken_and_answers_over_its_own_connection(
    stack: Stack, pki: SandboxPki, sips_port: int, tmp_path: Path
) -> None:
    _flagship_over_tls(stack, pki, sips_port, tmp_path)


class _TlsServer:
    """A TLS endpoint Kamailio connects to (a contact with transport=tls): records what it got."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.port = int(self.listener.getsockname()[1])
        self.received = b""
        self.error = ""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            raw, _ = self.listener.accept()
            with self.ctx.wrap_socket(raw, server_side=True) as conn:
                conn.settimeout(3)
                phone = SipPhone(conn, "tls")
                invite = phone.request("INVITE", timeout=3)
                self.received = invite.encode()
                phone.answer(invite, 486, "Busy Here", to_tag="busy")
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            self.error = f"{type(exc).__name__}: {exc}"

    def close(self) -> None:
        self.thread.join(15)
        self.listener.close()


def _call(stack: Stack, callee: str) -> int:
    with SipClient(stack.kamailio.port) as c:
        c.send(
            f"INVITE sip:{callee}@{DOMAIN} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{c.local_port};branch=z9hG4bK{secrets.token_hex(8)};rport\r\n"
            f"From: <sip:caller@elsewhere.example>;tag={secrets.token_hex(4)}\r\n"
            f"To: <sip:{callee}@{DOMAIN}>\r\nCall-ID: {uuid.uuid4().hex}\r\nCSeq: 1 INVITE\r\n"
            f"Contact: <sip:caller@127.0.0.1:{c.local_port}>\r\nMax-Forwards: 70\r\n"
            f"Content-Type: application/sdp\r\nContent-Length: {len(SDP)}\r\n\r\n{SDP}")
        return c.response(timeout=15).status


def test_outgoing_tls_connections_verify_the_peer_certificate(stack: Stack, pki: SandboxPki, tls_dir: Path) -> None:
    """The README's tls.cfg: Kamailio, as a TLS client (towards a contact with transport=tls),
    accepts a peer whose certificate chains to its CA list and refuses any other."""
    rogue = SandboxPki.load_or_create(tls_dir / "rogue")  # another CA, same names
    for cert, key, trusted in ((pki.server_cert_path, pki.server_key_path, True),
                               (rogue.server_cert_path, rogue.server_key_path, False)):
        server = _TlsServer(cert, key)
        user = "v" + uuid.uuid4().hex[:10]
        with SipClient(stack.kamailio.port) as c:
            r = c.register(user, f"<sip:desk@127.0.0.1:{server.port};transport=tls>", password=stack.add_user(user))
        assert r.status == 200
        status = _call(stack, user)
        server.close()
        if trusted:
            assert status == 486 and server.received.startswith(b"INVITE sip:desk@127.0.0.1"), server.error
        else:
            assert status >= 400 and status != 486 and not server.received, (status, server.error)


def _flagship_over_tls(stack: Stack, pki: SandboxPki, sips_port: int, tmp_path: Path) -> None:
    user, tok, instance = "t" + uuid.uuid4().hex[:10], apns_token(), str(uuid.uuid4())
    password = stack.add_user(user)

    first = _tls_phone(sips_port, pki.ca_path)
    try:
        r = _register(first, user, password, rfc8599_apns_contact(first.local_port, tok, "tls", instance),
                      uuid.uuid4().hex)
    finally:
        first.close()  # the app goes to sleep: its connection is gone
    assert r.startswith("SIP/2.0 200"), r
    assert _header(r, "Feature-Caps") == ['*;+sip.pns="apns"']
    asleep(stack, user)

    caller = sipp_caller(tmp_path, stack.kamailio.port, user, "udp", args=["-d", "300"])
    pushes = stack.wait_pushes(tok, 1)
    assert [(p["push_type"], p["topic"], push_kind(p)) for p in pushes] == [
        ("voip", "com.example.phone.voip", "incomingCall")]

    phone = _tls_phone(sips_port, pki.ca_path)  # woken: a new connection from a new port
    try:
        r = _register(phone, user, password, rfc8599_apns_contact(phone.local_port, tok, "tls", instance),
                      uuid.uuid4().hex)
        assert r.startswith("SIP/2.0 200"), r
        invite = phone.request("INVITE")
        assert invite.startswith(f"INVITE sip:dev@127.0.0.1:{phone.local_port};transport=tls")
        assert _header(invite, "Via")[0].startswith(f"SIP/2.0/TLS 127.0.0.1:{sips_port}")
        # double Record-Route (UDP in, TLS out): the phone's side names the TLS listener
        route = ",".join(_header(invite, "Record-Route"))
        assert f"127.0.0.1:{sips_port};transport=tls" in route, route
        tag = secrets.token_hex(4)
        phone.answer(invite, 180, "Ringing", tag)
        phone.answer(invite, 200, "OK", tag, SDP)
        ack = phone.request("ACK")  # in-dialog requests come over the same TLS connection
        assert ack.startswith(f"ACK sip:dev@127.0.0.1:{phone.local_port};transport=tls")
        bye = phone.request("BYE", timeout=10)
        phone.answer(bye, 200, "OK")
    finally:
        phone.close()
    assert caller.wait(20) == 0, caller.logs()
    assert caller.final_codes() == [200]
    assert len(stack.pushes(tok)) == 1  # answered by the pushed phone: no cancel push
    [device] = stack.store.devices(f"sip:{user}@{DOMAIN}")  # the new binding replaced the old one
    assert f":{phone.local_port};transport=tls" in device.contact
