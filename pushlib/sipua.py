"""A tiny SIP user agent for the demo, the tests and the benchmarks: REGISTERs with digest auth
over UDP or TCP, raw requests, response parsing, and RFC 8599 Contact builders.

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
    ha1 = hashlib.md5(f"{user}:{realm}:{password}".encode()).hexdigest()
    ha2 = hashlib.md5(f"{method}:{uri}".encode()).hexdigest()
    if "auth" in fields.get("qop", "").split(","):
        nc = "00000001"
        resp = hashlib.md5(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}".encode()).hexdigest()
        return (f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
                f'response="{resp}", algorithm=MD5, qop=auth, nc={nc}, cnonce="{cnonce}"')
    resp = hashlib.md5(f"{ha1}:{nonce}:{ha2}".encode()).hexdigest()
    return (f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
            f'response="{resp}", algorithm=MD5')


class SipClient:
    """One SIP endpoint socket (UDP or TCP) towards the proxy, for REGISTERs and raw requests.

    A TCP client connects in the constructor (raises OSError when nothing listens) and keeps
    that one connection until `close()`."""

    def __init__(self, proxy_port: int, transport: str = "udp", host: str = "127.0.0.1") -> None:
        self.transport = transport
        self.proxy = (host, proxy_port)
        if transport == "udp":
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind((host, 0))
        else:
            self.sock = socket.create_connection(self.proxy, timeout=5)
        self.sock.settimeout(5)
        self.local_port = int(self.sock.getsockname()[1])
        self._buf = b""

    def close(self) -> None:
        with suppress(OSError):
            self.sock.close()

    def __enter__(self) -> SipClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_raw(self, data: str) -> None:
        payload = data.encode("utf-8", "surrogateescape")
        if self.transport == "udp":
            self.sock.sendto(payload, self.proxy)
        else:
            self.sock.sendall(payload)

    def recv_response(self, timeout: float = 5.0, skip_provisional: bool = True) -> SipResponse:
        """The next response (final only unless `skip_provisional` is False); requests the
        proxy sends meanwhile (keepalives) are dropped. Raises TimeoutError / ConnectionError."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError("no SIP response")
            self.sock.settimeout(left)
            if self.transport == "udp":
                data, _ = self.sock.recvfrom(65535)
                text = data.decode("utf-8", "replace")
            else:
                while b"\r\n\r\n" not in self._buf:
                    chunk = self.sock.recv(65535)
                    if not chunk:
                        raise ConnectionError("proxy closed the TCP connection")
                    self._buf += chunk
                head, rest = self._buf.split(b"\r\n\r\n", 1)
                m = re.search(rb"(?im)^(?:content-length|l)\s*:\s*(\d+)", head)
                length = int(m.group(1)) if m else 0
                while len(rest) < length:
                    rest += self.sock.recv(65535)
                self._buf = rest[length:]
                text = (head + b"\r\n\r\n" + rest[:length]).decode("utf-8", "replace")
            if not text.startswith("SIP/2.0"):
                continue  # a request (e.g. OPTIONS keepalive): ignore
            resp = parse_response(text)
            if skip_provisional and resp.status < 200:
                continue
            return resp

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
                f"Via: SIP/2.0/{self.transport.upper()} 127.0.0.1:{self.local_port};branch={branch};rport",
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
            self.send_raw("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n")
            resp = self.recv_response(timeout)
            if resp.status == 401 and password is not None and auth is None:
                auth = digest_authorization("REGISTER", uri, user, password,
                                            resp.header("WWW-Authenticate")[0], secrets.token_hex(4))
                continue
            return resp
        return resp


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
