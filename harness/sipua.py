"""A tiny SIP user agent for the demo, the tests and the benchmarks: REGISTERs with digest auth
over UDP, TCP or TLS, raw requests, answering requests, response parsing, and RFC 8599 Contact
builders.

It is deliberately not a SIP stack: one socket towards the proxy, one transaction at a time,
responses matched by arrival order. That is all a simulated device's "REGISTER half" needs.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import socket
import time
import uuid
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Self

from pushlib import credentials

DOMAIN = "127.0.0.1"
BUNDLE = "com.example.phone"
TEAM = "TEAM000001"
FCM_PROJECT = "example-phone"


@dataclass
class SipResponse:
    """One parsed SIP response: status line, headers in order (name as sent), raw text."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    raw: str

    def header(self, name: str) -> list[str]:
        """Every value of header `name` (case-insensitive), in message order."""
        return [v for k, v in self.headers if k.lower() == name.lower()]


def parse_response(raw: str) -> SipResponse:
    """Parse a SIP response; raises ValueError when `raw` is not one."""
    head = raw.split("\r\n\r\n", 1)[0]
    lines = head.split("\r\n")
    m = re.match(r"SIP/2.0 (\d{3}) ?(.*)", lines[0])
    if not m:
        raise ValueError(f"not a SIP response: {lines[0]!r}")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return SipResponse(int(m.group(1)), m.group(2), headers, raw)


def digest_authorization(method: str, uri: str, user: str, password: str, challenge: str, cnonce: str) -> str:
    """The Authorization header value answering a `WWW-Authenticate: Digest ...` challenge (MD5,
    qop=auth when offered, nonce count 1: every challenge is answered once)."""
    fields = dict(re.findall(r'(\w+)="?([^",]*)"?', challenge))
    realm, nonce = fields["realm"], fields["nonce"]
    ha1 = credentials.ha1(user, realm, password)
    ha2 = hashlib.md5(f"{method}:{uri}".encode()).hexdigest()
    if "auth" in fields.get("qop", "").split(","):
        nc = "00000001"
        resp = hashlib.md5(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}".encode()).hexdigest()
        return (f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
                f'response="{resp}", algorithm=MD5, qop=auth, nc={nc}, cnonce="{cnonce}"')
    resp = hashlib.md5(f"{ha1}:{nonce}:{ha2}".encode()).hexdigest()
    return (f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
            f'response="{resp}", algorithm=MD5')


def header_values(msg: str, name: str) -> list[str]:
    """Every value of header `name` (case-insensitive) in a raw SIP request or response."""
    head = msg.split("\r\n\r\n", 1)[0]
    return [v.strip() for k, _, v in (line.partition(":") for line in head.split("\r\n")[1:])
            if k.strip().lower() == name.lower()]


def _recv_some(sock: socket.socket) -> bytes:
    chunk = sock.recv(65535)
    if not chunk:
        raise ConnectionError("the proxy closed the connection")
    return chunk


def read_sip_message(sock: socket.socket, buf: bytes) -> tuple[bytes, bytes]:
    """One SIP message from a stream socket (TCP or TLS), framed by Content-Length; `buf` holds
    bytes already read past the previous message. Returns (message, the new buffer); the socket's
    own timeout applies to each read. Raises ConnectionError when the peer closes first."""
    while b"\r\n\r\n" not in buf:
        buf += _recv_some(sock)
    head, rest = buf.split(b"\r\n\r\n", 1)
    m = re.search(rb"(?im)^(?:content-length|l)\s*:\s*(\d+)", head)
    length = int(m.group(1)) if m else 0
    while len(rest) < length:
        rest += _recv_some(sock)
    return head + b"\r\n\r\n" + rest[:length], rest[length:]


def open_sip_socket(proxy: tuple[str, int], transport: str = "udp", source: str | None = None) -> socket.socket:
    """A UDP socket bound on the proxy's host (or on `source`), or a TCP connection to the proxy
    from `source` if given (raises OSError when nothing listens); 5 s timeout. TLS callers wrap a
    "tcp" socket themselves. Another loopback `source` (127.0.0.2, ...) plays another host."""
    if transport == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((source or proxy[0], 0))
    else:
        sock = socket.create_connection(proxy, timeout=5, source_address=(source, 0) if source else None)
    sock.settimeout(5)
    return sock


class SipPhone:
    """A SIP endpoint on one socket towards the proxy: a bound UDP socket, or a connected TCP
    socket (or one the caller wrapped in TLS). It REGISTERs, sends raw messages and answers the
    requests that arrive on that socket.

    `transport` ("udp", "tcp", "tls") goes into Via and Contact; `via_port` is the port the phone
    claims there (default: its real local port; a NATed phone claims another one)."""

    # Requests arriving while a response is awaited are kept for `request()`; a client that never
    # asks for requests turns this off so that keepalives do not pile up.
    keep_requests = True

    def __init__(self, sock: socket.socket, transport: str, proxy: tuple[str, int] | None = None,
                 via_port: int | None = None) -> None:
        if proxy is None:
            if transport == "udp":
                raise ValueError("a UDP phone needs the proxy's address to send to")
            host, port = sock.getpeername()[:2]
            proxy = (str(host), int(port))
        self.sock = sock
        self.transport = transport
        self.proxy = proxy
        self.local_port = int(sock.getsockname()[1])
        self.via_port = self.local_port if via_port is None else via_port
        self._buf = b""
        self._requests: list[str] = []

    def close(self) -> None:
        with suppress(OSError):
            self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: str) -> None:
        payload = data.encode("utf-8", "surrogateescape")
        if self.transport == "udp":
            self.sock.sendto(payload, self.proxy)
        else:
            self.sock.sendall(payload)

    def _read(self, end: float) -> str:
        """The next message, by monotonic deadline `end`; raises TimeoutError / ConnectionError."""
        left = end - time.monotonic()
        if left <= 0:
            raise TimeoutError("no SIP message")
        self.sock.settimeout(left)
        if self.transport == "udp":
            data, _ = self.sock.recvfrom(65535)
        else:
            data, self._buf = read_sip_message(self.sock, self._buf)
        return data.decode("utf-8", "replace")

    def response(self, timeout: float = 5.0, skip_provisional: bool = True) -> SipResponse:
        """The next response (final only unless `skip_provisional` is False). Raises
        TimeoutError / ConnectionError."""
        end = time.monotonic() + timeout
        while True:
            text = self._read(end)
            if not text.startswith("SIP/2.0"):
                if self.keep_requests:
                    self._requests.append(text)
                continue
            resp = parse_response(text)
            if skip_provisional and resp.status < 200:
                continue
            return resp

    def request(self, method: str, timeout: float = 5.0) -> str:
        """The next `method` request (raw text), including ones kept while awaiting responses;
        other requests are kept, responses dropped."""
        end = time.monotonic() + timeout
        while True:
            for i, msg in enumerate(self._requests):
                if msg.startswith(method + " "):
                    return self._requests.pop(i)
            text = self._read(end)
            if not text.startswith("SIP/2.0"):
                self._requests.append(text)

    def answer(self, req: str, code: int, reason: str, to_tag: str = "", body: str = "") -> None:
        """Answer raw request `req`: Via and Record-Route copied, To tagged with `to_tag` unless it
        already has a tag, Contact at the phone's claimed port; a `body` is sent as SDP."""
        to = header_values(req, "To")[0]
        if to_tag and ";tag=" not in to:
            to += f";tag={to_tag}"
        lines = [f"SIP/2.0 {code} {reason}"]
        lines += [f"Via: {v}" for v in header_values(req, "Via")]
        lines += [f"Record-Route: {r}" for r in header_values(req, "Record-Route")]
        lines += [f"From: {header_values(req, 'From')[0]}", f"To: {to}",
                  f"Call-ID: {header_values(req, 'Call-ID')[0]}", f"CSeq: {header_values(req, 'CSeq')[0]}",
                  f"Contact: <sip:dev@127.0.0.1:{self.via_port};transport={self.transport}>"]
        if body:
            lines.append("Content-Type: application/sdp")
        self.send("\r\n".join(lines) + f"\r\nContent-Length: {len(body)}\r\n\r\n{body}")

    def register(
        self,
        user: str,
        contact: str,
        *,
        expires: int | None = 300,
        password: str | None = None,
        user_agent: str = "PushTest/1.0",
        call_id: str | None = None,
        domain: str = DOMAIN,
        extra_headers: Sequence[str] = (),
        timeout: float = 5.0,
    ) -> SipResponse:
        """Send a REGISTER (answering one digest challenge when a password is given); returns
        the final response (a 401 when the challenge is not answered or is repeated)."""
        call_id = call_id or uuid.uuid4().hex
        tag = secrets.token_hex(4)
        uri = f"sip:{domain}"
        auth: str | None = None
        for cseq in (1, 2):
            branch = "z9hG4bK" + secrets.token_hex(8)
            lines = [
                f"REGISTER {uri} SIP/2.0",
                f"Via: SIP/2.0/{self.transport.upper()} 127.0.0.1:{self.via_port};branch={branch};rport",
                f"From: <sip:{user}@{domain}>;tag={tag}",
                f"To: <sip:{user}@{domain}>",
                f"Call-ID: {call_id}",
                f"CSeq: {cseq} REGISTER",
                f"Contact: {contact}",
                "Max-Forwards: 70",
                f"User-Agent: {user_agent}",
            ]
            if expires is not None:
                lines.append(f"Expires: {expires}")
            if auth:
                lines.append(f"Authorization: {auth}")
            lines += list(extra_headers)
            self.send("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n")
            resp = self.response(timeout)
            if resp.status == 401 and password is not None and auth is None:
                auth = digest_authorization("REGISTER", uri, user, password,
                                            resp.header("WWW-Authenticate")[0], secrets.token_hex(4))
                continue
            return resp
        return resp


class SipClient(SipPhone):
    """One SIP endpoint socket (UDP or TCP) towards the proxy, for REGISTERs and raw requests;
    requests the proxy sends (keepalives) are dropped.

    A TCP client connects in the constructor (raises OSError when nothing listens) and keeps
    that one connection until `close()`."""

    keep_requests = False

    def __init__(self, proxy_port: int, transport: str = "udp", host: str = "127.0.0.1",
                 source: str | None = None) -> None:
        proxy = (host, proxy_port)
        super().__init__(open_sip_socket(proxy, transport, source), transport, proxy)


def rfc8599_apns_contact(port: int, token: str, transport: str = "udp", instance: str | None = None,
                         user: str = "dev", bundle: str = BUNDLE, team: str = TEAM) -> str:
    """An iOS VoIP app's Contact (RFC 8599 APNs params, optional +sip.instance) at 127.0.0.1:port."""
    c = (f"<sip:{user}@127.0.0.1:{port};transport={transport};pn-provider=apns;"
         f"pn-param={team}.{bundle}.voip;pn-prid={token}>")
    if instance:
        c += f';+sip.instance="<urn:uuid:{instance}>"'
    return c


def rfc8599_fcm_contact(port: int, token: str, transport: str = "udp", instance: str | None = None,
                        user: str = "dev", project: str = FCM_PROJECT) -> str:
    """An Android app's Contact (RFC 8599 FCM params, optional +sip.instance) at 127.0.0.1:port."""
    c = f"<sip:{user}@127.0.0.1:{port};transport={transport};pn-provider=fcm;pn-param={project};pn-prid={token}>"
    if instance:
        c += f';+sip.instance="<urn:uuid:{instance}>"'
    return c


def apns_token() -> str:
    """A random APNs device token (64 hex digits, like a real one)."""
    return secrets.token_hex(32)


def fcm_token() -> str:
    """A random FCM registration token (URL-safe alphabet, no '-'/'_' so it never looks like a param)."""
    return "fcm" + secrets.token_urlsafe(40).replace("-", "A").replace("_", "B")


def message_request(to_user: str, body: str, local_port: int, call_id: str, cseq: int,
                    ctype: str = "text/plain;charset=UTF-8", from_uri: str = "sip:friend@example.net",
                    from_name: str = "Friend", transport: str = "udp", domain: str = DOMAIN) -> str:
    """A SIP MESSAGE (RFC 3428) to `to_user`@`domain` from `from_name` <`from_uri`> (one From tag
    per Call-ID), ready to send from `local_port`."""
    raw = body.encode("utf-8")
    return (
        f"MESSAGE sip:{to_user}@{domain} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport.upper()} 127.0.0.1:{local_port};branch=z9hG4bK{secrets.token_hex(8)};rport\r\n"
        f'From: "{from_name}" <{from_uri}>;tag=s{call_id[:8]}\r\n'
        f"To: <sip:{to_user}@{domain}>\r\nCall-ID: {call_id}\r\nCSeq: {cseq} MESSAGE\r\n"
        f"Max-Forwards: 70\r\nContent-Type: {ctype}\r\nContent-Length: {len(raw)}\r\n\r\n{body}"
    )
