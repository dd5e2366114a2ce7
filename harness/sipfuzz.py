"""A seeded SIP request fuzzer for the push proxy, and the checks a fuzz run ends with.

Generation: `SipFuzzer(seed, target).message(i)` builds request number `i` from its own
`random.Random(f"{seed}:{transport}:{i}")`, so any single request of a run can be rebuilt from
(seed, transport, index) alone; its Call-ID (`fz<seed><u|t><index>@fuzz`, unless a mutation broke
it) is what Kamailio's log prefix shows, which maps a log line back to the request. A request is a
well-formed template (REGISTER with RFC 8599 / legacy push params, INVITE with SDP, CANCEL and ACK
of an earlier INVITE of the run, in-dialog requests with To tag and Route headers, OPTIONS, MESSAGE,
other methods, raw bytes) plus, most of the time, mutations: structured ones (huge and many and
duplicate headers, missing mandatory headers, broken Content-Length, bad UTF-8 and NULs, folded
lines, bad start lines / URIs / Via, `Contact: *` variants, unicode digits, ...) and byte-level
ones (flips, truncations, insertions, deletions).

Sending: `run(host, port, transport, count, seed, rate, deadline)` sends over one UDP socket
(send and don't wait, paced to `rate`, replies drained without blocking and counted by class) or
a few TCP connections (messages back to back, reconnecting when the proxy closes one, replies
read and counted). It stops at `count` or at `deadline`, whichever comes first, and refuses any
host that is not a loopback address.

Where the proxy may forward or answer fuzzed traffic, the generator keeps it on loopback:
Via sent-by is 127.0.0.1 at the sender's own port (`rport` first), contacts and in-dialog targets
are 127.0.0.1 ports in 20000-20999 (outside Linux's ephemeral range: nothing listens there) or
the sender's own UDP socket, and foreign domains are reserved names that never resolve
(`.invalid`, `.test`).

Checks: `scan_log()` (CRITICAL/BUG/ALERT lines, Python errors of the router), `options_ping()`
and `legit_call()` (a device registers, a SIPp caller calls it, the call completes).
"""

from __future__ import annotations

import ipaddress
import random
import re
import select
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass, field
from typing import Any

from harness.localstack import Stack, sipp_caller, sipp_device
from harness.sipua import BUNDLE, FCM_PROJECT, TEAM, SipClient, apns_token, digest_authorization, rfc8599_apns_contact

__all__ = [
    "CallResult", "Credentials", "FuzzStats", "Generated", "LogReport", "Request", "SipFuzzer", "Target",
    "fetch_challenge", "leaves_loopback", "legit_call", "locate", "options_ping", "require_loopback", "run", "scan_log",
    "split_counts",
]

UDP_MAX = 65_507  # the largest IPv4 UDP payload
TCP_MAX = 128 * 1024
AUTH_SHARE = 0.3  # share of REGISTERs / INVITEs that carry valid credentials (when given)
DEAD_PORTS = (20_000, 20_999)  # loopback ports nobody listens on (below the ephemeral range)
FOREIGN = ("example.invalid", "sip.fuzz.invalid", "voip.test", "EXAMPLE.INVALID")
TEAM_BUNDLE = f"{TEAM}.{BUNDLE}"

EXPIRES = (
    "3600", "0", "60", "99999999999999999999", "-1", "-3600", "4294967296", "2147483648",
    "３６００", "٣٦٠٠", "३६००", "3600abc", "", " 60 ", "1e3", "0x10", "+60", "60.5",
)
BAD_BYTES = (
    b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xc0\xaf", b"\xed\xa0\x80", b"\x80", b"\xf4\x90\x80\x80",
    b"\xe2\x82", b"\x00", b"a\x00b", b"\xf0\x9f\x98", b"%00", b"%ff", b"\x1b[31m", b"\x7f",
)
DIGITS = ("０１２３４５６７８９", "٠١٢٣٤٥٦٧٨٩", "०१२३४५६७८९", "𝟎𝟏𝟐𝟑𝟒𝟓𝟔𝟕𝟖𝟗", "〇一二三四五六七八九")
USER_AGENTS = (
    "PushTest/1.0", "Linphone/5.2.0 (iPhone) LinphoneSDK/5.2.0", "Zoiper rv2.10", "Bria iOS 6.5",
    "fuzz", "", "Ünïcödé-Phone/1.0 📞",
)
COMPACT = {b"v": b"via", b"f": b"from", b"t": b"to", b"i": b"call-id", b"m": b"contact", b"l": b"content-length",
           b"c": b"content-type", b"k": b"supported", b"s": b"subject", b"e": b"content-encoding"}
MANDATORY = (b"Via", b"From", b"To", b"Call-ID", b"CSeq", b"Max-Forwards", b"Contact")


def require_loopback(host: str) -> None:
    """Raise ValueError unless every address `host` stands for is a loopback address."""
    try:
        addrs = {ipaddress.ip_address(host.strip("[]"))}
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError as exc:
            raise ValueError(f"cannot resolve {host!r}: {exc}") from None
        addrs = {ipaddress.ip_address(str(info[4][0])) for info in infos}
    if not addrs or not all(a.is_loopback for a in addrs):
        raise ValueError(f"refusing to fuzz {host!r}: not a loopback address")


# --------------------------------------------------------------------------- the message model


@dataclass
class Request:
    """A SIP request as parts that mutations edit; `to_bytes()` assembles it.

    A header named b"" is a raw line (its value is written as is). `start` replaces the start
    line; `length` is the Content-Length value as written (None: the body's real length) and
    `with_length` False leaves Content-Length out."""

    method: bytes
    uri: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    version: bytes = b"SIP/2.0"
    start: bytes | None = None
    length: bytes | None = None
    with_length: bool = True
    eol: bytes = b"\r\n"

    def find(self, *names: bytes) -> list[int]:
        """Positions of the headers called any of `names` (case-insensitive, compact forms too)."""
        wanted = {n.lower() for n in names}
        return [i for i, (n, _) in enumerate(self.headers)
                if n and (n.lower() in wanted or COMPACT.get(n.lower()) in wanted)]

    def get(self, name: bytes) -> bytes | None:
        found = self.find(name)
        return self.headers[found[0]][1] if found else None

    def remove(self, name: bytes) -> None:
        gone = set(self.find(name))
        self.headers = [h for i, h in enumerate(self.headers) if i not in gone]

    def to_bytes(self) -> bytes:
        start = self.start if self.start is not None else b" ".join((self.method, self.uri, self.version))
        lines = [start, *(value if not name else name + b": " + value for name, value in self.headers)]
        if self.with_length:
            lines.append(b"Content-Length: " + (str(len(self.body)).encode() if self.length is None else self.length))
        return self.eol.join(lines) + self.eol + self.eol + self.body


@dataclass(frozen=True)
class Target:
    """Where the requests go and what they claim: the proxy (`host`:`port`, its served domain is
    `host`), the transport, the sender's own port (claimed in Via) and `sink_port`, a loopback
    port in-dialog requests are addressed to (the UDP sender's own socket, or a dead port)."""

    host: str
    port: int
    transport: str
    local_port: int
    sink_port: int = DEAD_PORTS[0]

    @property
    def domain(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def max_size(self) -> int:
        return UDP_MAX if self.transport == "udp" else TCP_MAX


@dataclass(frozen=True)
class Credentials:
    """A subscriber of the proxy: a share of the REGISTERs and INVITEs authenticate as it."""

    user: str
    password: str
    domain: str = "127.0.0.1"


@dataclass(frozen=True)
class Generated:
    index: int
    kind: str
    mutations: tuple[str, ...]
    data: bytes


_CALL_ID = re.compile(r"fz(-?\d+)([ut])(\d+)@fuzz")


def locate(text: str) -> list[tuple[int, str, int]]:
    """(seed, transport, index) of every fuzz Call-ID in `text` (e.g. a Kamailio log line)."""
    return [(int(s), "udp" if t == "u" else "tcp", int(i)) for s, t, i in _CALL_ID.findall(text)]


# --------------------------------------------------------------------------- the generator

Mutation = Callable[[random.Random, Request], None]


class SipFuzzer:
    """Request number `i` of a run is `message(i)`: a pure function of (seed, target, i) and of
    the challenge the authenticated share answers."""

    def __init__(self, seed: int, target: Target, credentials: Credentials | None = None,
                 challenge: str | None = None) -> None:
        self.seed = seed
        self.target = target
        self.credentials = credentials
        self.challenge = challenge  # a WWW-Authenticate value of the proxy (for the credentials)
        self._templates: list[tuple[str, int, Callable[[random.Random, int, int], Request | bytes]]] = [
            ("register", 24, self._register),
            ("invite", 18, self._invite),
            ("cancel", 8, self._cancel),
            ("ack", 6, self._ack),
            ("in-dialog", 12, self._in_dialog),
            ("options", 8, self._options),
            ("message", 8, self._message),
            ("other", 8, self._other),
            ("raw", 3, self._raw),
        ]
        self._mutations: list[tuple[str, Mutation]] = [
            ("huge-header", self._m_huge_header),
            ("many-headers", self._m_many_headers),
            ("duplicate-headers", self._m_duplicate_headers),
            ("missing-mandatory", self._m_missing_mandatory),
            ("content-length", self._m_content_length),
            ("bad-utf8", self._m_bad_utf8),
            ("folded-lines", self._m_folded_lines),
            ("bad-start-line", self._m_bad_start_line),
            ("bad-uri", self._m_bad_uri),
            ("bad-via", self._m_bad_via),
            ("contact-star", self._m_contact_star),
            ("unicode-digits", self._m_unicode_digits),
            ("bad-cseq", self._m_bad_cseq),
            ("max-forwards", self._m_max_forwards),
            ("header-syntax", self._m_header_syntax),
            ("push-params", self._m_push_params),
            ("body", self._m_body),
        ]
        self._byte_mutations: list[tuple[str, Callable[[random.Random, bytes], bytes]]] = [
            ("flip", _b_flip), ("truncate", _b_truncate), ("insert", _b_insert),
            ("delete", _b_delete), ("duplicate", _b_duplicate), ("crlf", _b_crlf),
        ]

    @property
    def mutation_names(self) -> list[str]:
        return [n for n, _ in self._mutations] + [n for n, _ in self._byte_mutations]

    @property
    def kind_names(self) -> list[str]:
        return [n for n, _, _ in self._templates]

    # ------------------------------------------------------------------ public

    def message(self, index: int) -> Generated:
        rng = self._rng(index)
        kind, made = self._template(rng, index, depth=0)
        if isinstance(made, bytes):
            return Generated(index, kind, (), made[: self.target.max_size])
        template = made.to_bytes()
        applied: list[str] = []
        roll = rng.random()
        structured = 0 if roll < 0.2 else rng.choice((1, 1, 1, 2, 2, 3)) if roll < 0.85 else rng.choice((0, 1))
        for _ in range(structured):
            name, mutate = rng.choice(self._mutations)
            mutate(rng, made)
            applied.append(name)
        data = made.to_bytes()
        if roll >= 0.85:
            for _ in range(rng.randint(1, 3)):
                name, bmutate = rng.choice(self._byte_mutations)
                data = bmutate(rng, data)
                applied.append(name)
        data = data[: self.target.max_size]
        if leaves_loopback(data):  # e.g. a flip made 127.0.0.1 into 137.0.0.1: send the template instead
            return Generated(index, kind, (), template[: self.target.max_size])
        return Generated(index, kind, tuple(applied), data)

    def call_id(self, index: int) -> str:
        return f"fz{self.seed}{self.target.transport[0]}{index}@fuzz"

    # ------------------------------------------------------------------ helpers

    def _rng(self, index: int) -> random.Random:
        return random.Random(f"{self.seed}:{self.target.transport}:{index}")

    def _template(self, rng: random.Random, index: int, depth: int) -> tuple[str, Request | bytes]:
        weights = [w for _, w, _ in self._templates]
        kind, _, build = rng.choices(self._templates, weights)[0]
        return kind, build(rng, index, depth)

    def _ids(self, index: int) -> tuple[str, str, str]:
        """Call-ID, From tag and Via branch of request `index`."""
        t = self.target.transport[0]
        return self.call_id(index), f"ft{index}", f"z9hG4bKfz{self.seed}{t}{index}"

    def _via(self, branch: str) -> bytes:
        tp = self.target.transport.upper()
        return f"SIP/2.0/{tp} {self.target.domain}:{self.target.local_port};rport;branch={branch}".encode()

    def _user(self, rng: random.Random) -> str:
        pick = rng.random()
        if self.credentials and pick < 0.1:
            return self.credentials.user
        if pick < 0.5:
            return "u" + format(rng.getrandbits(40), "010x")
        return rng.choice(("alice", "bob", "+15551234567", "0049301234567", "jürgen", "a.b-c_d!~*'()", "x"))

    def _domain(self, rng: random.Random) -> str:
        return rng.choice(FOREIGN) if rng.random() < 0.15 else self.target.domain

    def _dead_contact(self, rng: random.Random, user: str = "dev") -> str:
        port = rng.randint(*DEAD_PORTS)
        return f"<sip:{user}@{self.target.domain}:{port};transport={self.target.transport}>"

    def _authorize(self, req: Request, header: bytes) -> None:
        if self.credentials is None or self.challenge is None:
            return
        value = digest_authorization(req.method.decode(), req.uri.decode(), self.credentials.user,
                                     self.credentials.password, self.challenge, "fuzzc")
        req.headers.append((header, value.encode()))

    def _basic(self, rng: random.Random, method: str, uri: str, from_uri: str, to_uri: str, index: int,
               to_tag: str = "", cseq: int = 1, branch: str | None = None) -> Request:
        call_id, from_tag, own_branch = self._ids(index)
        display = rng.choice(("", '"Alice Caller" ', '"Jürgen 📞" ', "Bob ", '"" '))
        to = f"<{to_uri}>" + (f";tag={to_tag}" if to_tag else "")
        headers = [
            (b"Via", self._via(branch or own_branch)),
            (b"Max-Forwards", b"70"),
            (b"From", f"{display}<{from_uri}>;tag={from_tag}".encode()),
            (b"To", to.encode()),
            (b"Call-ID", call_id.encode()),
            (b"CSeq", f"{cseq} {method}".encode()),
        ]
        if rng.random() < 0.5:
            headers.append((b"User-Agent", rng.choice(USER_AGENTS).encode()))
        return Request(method.encode(), uri.encode(), headers)

    # ------------------------------------------------------------------ templates

    def _register(self, rng: random.Random, index: int, depth: int) -> Request:
        cred = self.credentials
        authed = cred is not None and self.challenge is not None and rng.random() < AUTH_SHARE
        user = cred.user if authed and cred else self._user(rng)
        domain = cred.domain if authed and cred else self._domain(rng)
        aor = f"sip:{user}@{domain}"
        req = self._basic(rng, "REGISTER", f"sip:{domain}", aor, aor, index, cseq=rng.randint(1, 5))
        req.headers.append((b"Contact", self._register_contact(rng).encode()))
        if rng.random() < 0.6:
            req.headers.append((b"Expires", rng.choice(EXPIRES).encode()))
        if rng.random() < 0.3:
            req.headers.append((b"Supported", b"path, gruu, outbound"))
        if authed:
            self._authorize(req, b"Authorization")
        return req

    def _register_contact(self, rng: random.Random) -> str:
        port = rng.randint(*DEAD_PORTS)
        tp = self.target.transport
        host = self.target.domain
        tok = format(rng.getrandbits(256), "064x")
        instance = f';+sip.instance="<urn:uuid:{uuid.UUID(int=rng.getrandbits(128), version=4)}>"'
        variant = rng.choice(("apns", "apns", "fcm", "linphone", "legacy", "plain", "star", "multi", "odd"))
        if variant == "apns":
            provider = rng.choice(("apns", "apns", "apns.dev", "APNS", "apns "))
            c = (f"<sip:dev@{host}:{port};transport={tp};pn-provider={provider};"
                 f"pn-param={TEAM_BUNDLE}.voip;pn-prid={tok}>")
        elif variant == "fcm":
            c = f"<sip:dev@{host}:{port};transport={tp};pn-provider=fcm;pn-param={FCM_PROJECT};pn-prid=fcm{tok[:40]}>"
        elif variant == "linphone":
            c = (f"<sip:dev@{host}:{port};transport={tp};pn-provider=apns;pn-param={TEAM_BUNDLE}.voip&remote;"
                 f"pn-prid={tok}:voip&{tok[::-1]}:remote;pn-timeout=0;pn-silent=1>")
        elif variant == "legacy":
            app = rng.choice((BUNDLE, f"{BUNDLE}.dev", f"{BUNDLE}.voip", ""))
            kind = rng.choice(("apple", "firebase", "google", "android", "bogus", ""))
            c = f"<sip:dev@{host}:{port};app-id={app};pn-type={kind};pn-tok={tok}>"
        elif variant == "plain":
            c = f"<sip:dev@{host}:{port};transport={tp}>"
        elif variant == "star":
            return "*"
        elif variant == "multi":
            c = (f"<sip:a@{host}:{port}>;q=0.5, <sip:b@{host}:{port + 1};pn-provider=apns;"
                 f"pn-param={TEAM_BUNDLE}.voip;pn-prid={tok}>")
        else:
            provider = rng.choice(("webpush", "", "fcm", "apns", "аpns"))  # the last one starts with a Cyrillic а
            prid = rng.choice(("zz-not-hex", "", tok * 80, tok + "%00", "ab" * 2600, tok))
            param = rng.choice((f"{TEAM_BUNDLE}.voip", "", "x" * 3000, "TEAM.b", "a&b&c&d"))
            c = f"<sip:dev@{host}:{port};pn-provider={provider};pn-param={param};pn-prid={prid}>"
        if rng.random() < 0.5:
            c += instance
        if rng.random() < 0.3:
            c += f";expires={rng.choice(EXPIRES)}"
        return c

    def _invite(self, rng: random.Random, index: int, depth: int) -> Request:
        cred = self.credentials
        authed = cred is not None and self.challenge is not None and rng.random() < AUTH_SHARE
        caller = f"sip:{cred.user}@{cred.domain}" if authed and cred else f"sip:{self._user(rng)}@{self._domain(rng)}"
        callee = f"sip:{self._user(rng)}@{self._domain(rng)}"
        req = self._basic(rng, "INVITE", callee, caller, callee, index)
        req.headers += [
            (b"Contact", f"<sip:caller@{self.target.domain}:{self.target.local_port};"
                         f"transport={self.target.transport}>".encode()),
            (b"Allow", b"INVITE, ACK, CANCEL, BYE, OPTIONS, MESSAGE, INFO, UPDATE"),
            (b"Content-Type", b"application/sdp"),
        ]
        if rng.random() < 0.3:
            req.headers.append((b"Subject", rng.choice(("hi", "Grüße 👋", "")).encode()))
        req.body = _sdp(rng)
        if authed:
            self._authorize(req, b"Proxy-Authorization")
        return req

    def _earlier_invite(self, index: int, depth: int) -> Request | None:
        """Request `index` of this run if it was an (unmutated) INVITE template, else None."""
        if depth > 0 or index < 0:
            return None
        kind, made = self._template(self._rng(index), index, depth + 1)
        return made if kind == "invite" and isinstance(made, Request) else None

    def _cancel(self, rng: random.Random, index: int, depth: int) -> Request:
        earlier = index - rng.randint(1, 6)
        invite = self._earlier_invite(earlier, depth)
        if invite is None:  # a CANCEL that matches nothing
            uri = f"sip:{self._user(rng)}@{self._domain(rng)}"
            return self._basic(rng, "CANCEL", uri, f"sip:x@{self.target.domain}", uri, index)
        keep = (b"via", b"from", b"to", b"call-id", b"max-forwards")
        headers = [h for h in invite.headers if h[0].lower() in keep]
        headers.append((b"CSeq", b"1 CANCEL"))
        if rng.random() < 0.2:
            headers.append((b"Reason", b'SIP;cause=200;text="Call completed elsewhere"'))
        return Request(b"CANCEL", invite.uri, headers)

    def _ack(self, rng: random.Random, index: int, depth: int) -> Request:
        earlier = index - rng.randint(1, 6)
        invite = self._earlier_invite(earlier, depth)
        to_tag = format(rng.getrandbits(32), "x")
        if invite is None:
            uri = f"sip:dev@{self.target.domain}:{self.target.sink_port}"
            req = self._basic(rng, "ACK", uri, f"sip:x@{self.target.domain}", uri, index, to_tag=to_tag)
            if rng.random() < 0.5:
                req.headers.append((b"Route", self._self_route().encode()))
            return req
        keep = (b"via", b"from", b"call-id", b"max-forwards")
        headers = [h for h in invite.headers if h[0].lower() in keep]
        to = invite.get(b"To") or b""
        headers += [(b"To", to + f";tag={to_tag}".encode()), (b"CSeq", b"1 ACK")]
        return Request(b"ACK", invite.uri, headers)

    def _self_route(self) -> str:
        return f"<sip:{self.target.domain}:{self.target.port};transport={self.target.transport};lr>"

    def _in_dialog(self, rng: random.Random, index: int, depth: int) -> Request:
        method = rng.choice(("BYE", "BYE", "INFO", "UPDATE", "INVITE", "NOTIFY", "PRACK", "REFER", "MESSAGE"))
        host = self.target.domain
        uri = rng.choice((
            f"sip:dev@{host}:{self.target.sink_port}",
            f"sip:dev@{host}:{rng.randint(*DEAD_PORTS)};transport={self.target.transport}",
            f"sip:dev@{rng.choice(FOREIGN)}",
            f"sip:{host}:{self.target.port}",
        ))
        me = self._self_route()
        routes = rng.choice((
            [me], [me], [me, f"<sip:{rng.choice(FOREIGN)};lr>"], [f"<sip:{rng.choice(FOREIGN)};lr>"],
            [me.replace(";lr", "")], [], [me.replace(";lr", ";lr;ftag=ft1;r2=on"), me],
        ))
        req = self._basic(rng, method, uri, f"sip:caller@{host}", f"sip:{self._user(rng)}@{host}", index,
                          to_tag=format(rng.getrandbits(32), "x"), cseq=rng.randint(2, 100))
        req.headers += [(b"Route", r.encode()) for r in routes]
        req.headers.append((b"Contact", self._dead_contact(rng).encode()))
        if method == "INVITE":
            req.headers.append((b"Content-Type", b"application/sdp"))
            req.body = _sdp(rng)
        elif method == "NOTIFY":
            req.headers += [(b"Event", b"refer"), (b"Subscription-State", b"active;expires=60"),
                            (b"Content-Type", b"message/sipfrag")]
            req.body = b"SIP/2.0 200 OK\r\n"
        elif method == "REFER":
            req.headers.append((b"Refer-To", f"<sip:{self._user(rng)}@{host}>".encode()))
        elif method == "PRACK":
            req.headers.append((b"RAck", b"1 1 INVITE"))
        return req

    def _options(self, rng: random.Random, index: int, depth: int) -> Request:
        host = self.target.domain
        uri = rng.choice((f"sip:{host}", f"sip:{host}:{self.target.port}", f"sip:{self._user(rng)}@{host}",
                          f"sip:{rng.choice(FOREIGN)}"))
        req = self._basic(rng, "OPTIONS", uri, f"sip:probe@{host}", uri, index)
        if rng.random() < 0.5:
            req.headers.append((b"Accept", b"application/sdp"))
        return req

    def _message(self, rng: random.Random, index: int, depth: int) -> Request:
        uri = f"sip:{self._user(rng)}@{self._domain(rng)}"
        req = self._basic(rng, "MESSAGE", uri, f"sip:{self._user(rng)}@{self.target.domain}", uri, index)
        req.headers.append((b"Content-Type", rng.choice((b"text/plain;charset=utf-8", b"text/plain",
                                                         b"application/im-iscomposing+xml", b"message/cpim"))))
        req.body = rng.choice(("hello", "Grüße aus Köln 👋", "x" * rng.randint(0, 1300), "")).encode()
        return req

    def _other(self, rng: random.Random, index: int, depth: int) -> Request:
        method = rng.choice(("SUBSCRIBE", "PUBLISH", "NOTIFY", "REFER", "INFO", "UPDATE", "PRACK", "BYE",
                             "FOOBAR", "register", "INVITE2", "Z" * rng.randint(1, 40)))
        uri = f"sip:{self._user(rng)}@{self._domain(rng)}"
        req = self._basic(rng, method, uri, f"sip:{self._user(rng)}@{self.target.domain}", uri, index)
        if method in ("SUBSCRIBE", "PUBLISH", "NOTIFY"):
            req.headers += [(b"Event", rng.choice((b"presence", b"reg", b"message-summary", b"x;id=1"))),
                            (b"Expires", rng.choice(EXPIRES).encode())]
        req.headers.append((b"Contact", self._dead_contact(rng).encode()))
        return req

    def _raw(self, rng: random.Random, index: int, depth: int) -> bytes:
        kind = rng.randrange(6)
        if kind == 0:
            return rng.choice((b"\r\n\r\n", b"\r\n", b"\r\n\r\n\r\n\r\n", b" ", b"\x00"))
        if kind == 1:
            return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 2000)))
        if kind == 2:
            alphabet = b"SIP/2.0 INVITE sip:@;<>:\r\n \t,=\"0123456789abcdef"
            return bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 2000)))
        if kind == 3:  # a response nobody asked for: its second Via is the sender itself
            call_id, _, branch = self._ids(index)
            return ("SIP/2.0 200 OK\r\n"
                    f"Via: SIP/2.0/{self.target.transport.upper()} {self.target.domain}:{self.target.port};"
                    f"branch=z9hG4bKnone{index}\r\n"
                    f"Via: {self._via(branch).decode()}\r\n"
                    f"From: <sip:a@{self.target.domain}>;tag=x\r\nTo: <sip:b@{self.target.domain}>;tag=y\r\n"
                    f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n").encode()
        if kind == 4:
            return b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        return b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(rng.getrandbits(8) for _ in range(64))

    # ------------------------------------------------------------------ structured mutations

    def _budget(self, req: Request) -> int:
        return max(0, self.target.max_size - len(req.to_bytes()) - 64)

    def _m_huge_header(self, rng: random.Random, req: Request) -> None:
        size = min(rng.choice((4096, 16384, 65536)), self._budget(req))
        filler = rng.choice((b"a", b";p=1", b",", b"%41", b"\xc3\xa9", b" "))
        blob = (filler * (size // len(filler) + 1))[:size]
        where = rng.choice(("x-header", "user-agent", "subject", "contact-param", "display", "call-id", "via",
                            "to-user", "ruri-user"))
        if where == "x-header":
            req.headers.append((b"X-Huge", blob))
        elif where in ("user-agent", "subject"):
            req.headers.append((b"User-Agent" if where == "user-agent" else b"Subject", blob))
        elif where == "ruri-user":
            req.uri = req.uri.replace(b"sip:", b"sip:" + blob.replace(b" ", b"x"), 1)
        else:
            name = {"contact-param": b"Contact", "display": b"From", "call-id": b"Call-ID", "via": b"Via",
                    "to-user": b"To"}[where]
            found = req.find(name)
            if not found:
                req.headers.append((name, blob))
                return
            i = found[0]
            value = req.headers[i][1]
            if where == "contact-param":
                value = value.replace(b">", b";x=" + blob + b">", 1) if b">" in value else value + b";x=" + blob
            elif where == "display":
                value = b'"' + blob + b'" ' + value
            elif where == "via":
                value = value + b";x=" + blob
            elif where == "to-user":
                value = value.replace(b"sip:", b"sip:" + blob.replace(b" ", b"x"), 1)
            else:
                value = blob
            req.headers[i] = (req.headers[i][0], value)

    def _m_many_headers(self, rng: random.Random, req: Request) -> None:
        budget = self._budget(req)
        count = min(rng.choice((100, 500, 2000, 5000)), budget // 14)
        name = rng.choice((b"X-F", b"Route", b"Record-Route", b"Via", b"Contact", b"P-Asserted-Identity"))
        for k in range(count):
            if name == b"X-F":
                req.headers.append((b"X-F%d" % k, b"v"))
            elif name == b"Via":
                req.headers.append((name, b"SIP/2.0/UDP 127.0.0.1:%d;branch=z9hG4bK%d" % (DEAD_PORTS[0], k)))
            else:
                req.headers.append((name, b"<sip:h%d@127.0.0.1:%d;lr>" % (k, DEAD_PORTS[0])))

    def _m_duplicate_headers(self, rng: random.Random, req: Request) -> None:
        for name in rng.sample((b"Via", b"From", b"To", b"Call-ID", b"CSeq", b"Contact", b"Expires",
                                b"Max-Forwards", b"Content-Length", b"Authorization", b"Route"), rng.randint(1, 3)):
            found = req.find(name)
            if name == b"Content-Length":
                req.headers.append((name, str(rng.randint(0, 500)).encode()))
                continue
            value = req.headers[found[0]][1] if found else b"<sip:dup@127.0.0.1>"
            variant = rng.choice((value, value + b"x", value.replace(b"tag=", b"tag=dup"), b"2 " + value))
            req.headers.insert(rng.randint(min(1, len(req.headers)), len(req.headers)), (name, variant))

    def _m_missing_mandatory(self, rng: random.Random, req: Request) -> None:
        gone = set(MANDATORY) if rng.random() < 0.1 else set(rng.sample(MANDATORY, rng.randint(1, 3)))
        for name in gone:
            req.remove(name)

    def _m_content_length(self, rng: random.Random, req: Request) -> None:
        n = len(req.body)
        choice = rng.randrange(11)
        if choice == 0:
            req.length = str(n + rng.choice((1, 10, 1000, 100_000))).encode()
        elif choice == 1:
            req.length = str(max(0, n - rng.randint(1, 50))).encode() if n else b"0"
        elif choice == 2:
            req.length = str(-rng.randint(1, 100)).encode()
        elif choice == 3:
            req.length = rng.choice((b"abc", b"0x10", b"1e3", b"five", b"1.5"))
        elif choice == 4:
            req.length = b"99999999999999999999"
        elif choice == 5:
            req.length = _unicode_digits(rng, str(n))
        elif choice == 6:
            req.length = rng.choice((b"", b" ", b"\t"))
        elif choice == 7:
            req.with_length = False
        elif choice == 8:
            req.headers.append((b"Content-Length", str(n + 5).encode()))
        elif choice == 9:
            req.with_length = False
            req.headers.append((b"l", str(n).encode()))
        else:
            req.length = f" {n} ".encode()
        if rng.random() < 0.3 and not req.body:
            req.body = b"v=0\r\n" * rng.randint(1, 20)

    def _m_bad_utf8(self, rng: random.Random, req: Request) -> None:
        bad = rng.choice(BAD_BYTES) * rng.choice((1, 1, 2, 16))
        where = rng.choice(("ruri-user", "from-user", "to-user", "display", "contact", "push-param", "call-id",
                            "user-agent", "header-name", "via", "body"))
        if where == "ruri-user":
            req.uri = _after(req.uri, b"sip:", bad, rng)
            return
        if where == "body":
            req.body = _insert_at(rng, req.body, bad)
            return
        if where == "header-name":
            i = rng.randrange(len(req.headers)) if req.headers else None
            if i is not None:
                name, value = req.headers[i]
                req.headers[i] = (name + bad, value)
            return
        name = {"from-user": b"From", "to-user": b"To", "display": b"From", "contact": b"Contact",
                "push-param": b"Contact", "call-id": b"Call-ID", "user-agent": b"User-Agent", "via": b"Via"}[where]
        found = req.find(name)
        if not found:
            req.headers.append((name, bad))
            return
        i = found[0]
        value = req.headers[i][1]
        if where == "display":
            value = b'"' + bad + b'" ' + value
        elif where == "push-param" and b"pn-prid=" in value:
            value = value.replace(b"pn-prid=", b"pn-prid=" + bad, 1)
        elif b"sip:" in value and where in ("from-user", "to-user", "contact"):
            value = _after(value, b"sip:", bad, rng)
        else:
            value = _insert_at(rng, value, bad)
        req.headers[i] = (req.headers[i][0], value)

    def _m_folded_lines(self, rng: random.Random, req: Request) -> None:
        fold = rng.choice((b"\r\n ", b"\r\n\t", b"\r\n    ", b"\r\n \r\n "))
        odd = rng.random()
        if odd < 0.1 and req.headers:  # a continuation line before any header
            req.headers.insert(0, (b"", b" continued-from-nowhere"))
            return
        if odd < 0.15:  # a fold inside the start line
            req.start = b" ".join((req.method, req.uri)) + fold + req.version
            return
        for i in rng.sample(range(len(req.headers)), min(len(req.headers), rng.randint(1, 3))):
            name, value = req.headers[i]
            if not name:
                continue
            cuts = [k for k, c in enumerate(value) if c in b" ;,"] or ([len(value) // 2] if value else [0])
            k = rng.choice(cuts)
            value = value[:k] + fold + value[k:].lstrip(b" ")
            if rng.random() < 0.2:  # fold right after the colon: an empty first line
                value = fold + value
            req.headers[i] = (name, value)

    def _m_bad_start_line(self, rng: random.Random, req: Request) -> None:
        m, u, v = req.method, req.uri, req.version
        req.start = rng.choice((
            b"", m.lower() + b" " + u + b" " + v, m, m + b" " + u, m + b" " + u + b" SIP/3.0",
            m + b"  " + u + b"  " + v, m + b"\t" + u + b"\t" + v, m + b" " + u + b" " + v + b" extra",
            b"X" * 2000 + b" " + u + b" " + v, b"\r\n\r\n" + m + b" " + u + b" " + v,
            m + b"\x00 " + u + b" " + v, b"SIP/2.0 200 OK", b"SIP/2.0 999 Weird", b"SIP/2.0 abc",
            m + b" " + u + b" sip/2.0", m + b" " + u + b" SIP/2.0\x00", b" " + m + b" " + u + b" " + v,
            m + b" " + u + b" " + v + b"\r", m + b" " + u,
        ))

    def _m_bad_uri(self, rng: random.Random, req: Request) -> None:
        h = self.target.domain
        bad = rng.choice((
            "sip:", "sip:@", f"sip:@{h}", f"sips:x@{h}", "tel:+15551234567", "sip:x@[::1", f"sip:x@{h}:99999",
            f"sip:x@{h}:-1", f"sip:x@{h}:0", f"sip:x@{h};;;;", f"<sip:x@{h}>", f"sip:x y@{h}", f"sip:%zz@{h}",
            "sip:x@" + "a" * 300 + ".invalid", f"sip:x@{h};transport=", f"sip:x@{h}?", "*", f"http://{h}/",
            f"sip:x:secret@{h}", f"sip:x@{h};maddr=example.invalid", f"sip:x@{h}:5060:5060", "urn:service:sos",
            f"sip:x@{h};lr;lr;lr", f"sip:{'%41' * 500}@{h}", f"SIP:X@{h}", f"sip:x@{h};transport=sctp",
            f"sip:x@{h};user=phone;pn-provider=apns;pn-prid=", "sip:x@0.0.0.0", f"sip:x@{h}:{self.target.port}",
        )).encode()
        where = rng.random()
        if where < 0.6:
            req.uri = bad
            return
        name = rng.choice((b"From", b"To", b"Contact", b"Route"))
        found = req.find(name)
        value = b"<" + bad + b">" + (b";tag=x" if name in (b"From", b"To") else b"")
        if found:
            req.headers[found[0]] = (req.headers[found[0]][0], value)
        else:
            req.headers.append((name, value))

    def _m_bad_via(self, rng: random.Random, req: Request) -> None:
        h, lp, tp = self.target.domain, self.target.local_port, self.target.transport.upper()
        bad = rng.choice((
            f"SIP/2.0/{tp} {h}:{lp}", f"SIP/2.0/XYZ {h}:{lp};rport", f"SIP/2.0/{tp}", f"SIP/2.0/{tp} :{lp}",
            f"SIP/2.0/{tp} {h}:99999;rport;branch=z9hG4bKx", f"SIP/2.0/{tp} {h}:0;rport",
            f"SIP/2.0/{tp} {h}:{lp};rport=abc;branch=z9hG4bKy", f"SIP/2.0/{tp} {h}:{lp};rport;received=garbage",
            f"SIP/3.0/{tp} {h}:{lp};rport", f"SIP/2.0/{tp} [::1;rport;branch=",
            f"SIP/2.0/{tp} {h}:{lp};rport;branch=" + "z" * 5000, f"SIP/2.0/{tp} {h}:{lp};rport, SIP/2.0/{tp} {h}",
            f"SIP/2.0/{tp} fuzz.invalid;rport;branch=z9hG4bKq", f"SIP/2.0/{tp} {h}:{lp};rport;ttl=999",
            f"SIP/2.0/{tp} {h}:{lp};rport;maddr={h}", f"SIP / 2.0 / {tp} {h} : {lp} ; rport ; branch = z9hG4bKs",
            f"SIP/2.0/{tp} {h}:{lp};rport;branch=z9hG4bK;branch=z9hG4bK2", f"SIP/2.0/{tp} {h}:{lp};;;rport",
            f"sip/2.0/{tp.lower()} {h}:{lp};rport;branch=z9hG4bKlower",
        )).encode()
        found = req.find(b"Via")
        if found and rng.random() < 0.7:
            req.headers[found[0]] = (req.headers[found[0]][0], bad)
        else:
            req.headers.insert(0, (b"Via", bad))

    def _m_contact_star(self, rng: random.Random, req: Request) -> None:
        star = rng.choice((b"*", b" * ", b"*;expires=0", b"*;expires=3600", b"*, <sip:x@127.0.0.1:20001>",
                           b"**", b'"*"', b"<*>", b"* ;q=0.5", b"*\t", b"<sip:x@127.0.0.1:20001>, *"))
        req.remove(b"Contact")
        req.headers.append((b"Contact", star))
        if rng.random() < 0.7:
            req.remove(b"Expires")
            req.headers.append((b"Expires", rng.choice((b"0", b"0", b"3600", b"-1", "０".encode()))))

    def _m_unicode_digits(self, rng: random.Random, req: Request) -> None:
        name = rng.choice((b"CSeq", b"Max-Forwards", b"Expires", b"Content-Length", b"Via", b"ruri"))
        if name == b"Content-Length":
            req.length = _unicode_digits(rng, str(len(req.body)))
            return
        if name == b"ruri":
            req.uri = re.sub(rb"\d", lambda m: _unicode_digits(rng, m.group().decode()), req.uri, count=3)
            return
        found = req.find(name)
        if not found:
            req.headers.append((name, _unicode_digits(rng, "3600")))
            return
        i = found[0]
        value = re.sub(rb"\d+", lambda m: _unicode_digits(rng, m.group().decode()), req.headers[i][1], count=1)
        req.headers[i] = (req.headers[i][0], value)

    def _m_bad_cseq(self, rng: random.Random, req: Request) -> None:
        m = req.method
        value = rng.choice((b"1 " + (b"BYE" if m != b"BYE" else b"INVITE"), b"4294967296 " + m, b"-1 " + m, m,
                            b"1", b"1  " + m + b" extra", b"", b"99999999999999999999999 " + m, b"0 " + m,
                            b"1 " + m.lower(), b"abc " + m))
        req.remove(b"CSeq")
        req.headers.append((b"CSeq", value))

    def _m_max_forwards(self, rng: random.Random, req: Request) -> None:
        req.remove(b"Max-Forwards")
        req.headers.append((b"Max-Forwards", rng.choice((b"0", b"1", b"-1", b"256", b"99999999999", b"abc", b""))))

    def _m_header_syntax(self, rng: random.Random, req: Request) -> None:
        choice = rng.randrange(9)
        if choice == 0:
            req.headers.insert(rng.randint(0, len(req.headers)), (b"", b"a line without a colon"))
        elif choice == 1:
            req.headers.append((b"", b": no name"))
        elif choice == 2:
            req.headers.append((b"Call ID", b"spaces-in-name"))
        elif choice == 3:
            req.headers = [(n + b" ", v) if n else (n, v) for n, v in req.headers]  # "Via : ..." (legal)
        elif choice == 4:  # compact forms
            inverse = {v: k for k, v in COMPACT.items()}
            req.headers = [(inverse.get(n.lower(), n), v) for n, v in req.headers]
        elif choice == 5:
            req.headers.append((b"X-" + b"N" * 1000, b"v"))
        elif choice == 6:
            req.eol = b"\n"
        elif choice == 7:
            req.headers.append((b"Contact", b""))
        else:
            req.headers.append((b"", b"X-Bare-CR: a\rb"))

    def _m_push_params(self, rng: random.Random, req: Request) -> None:
        tok = format(rng.getrandbits(256), "064x")
        params = rng.choice((
            f";pn-provider=apns;pn-provider=fcm;pn-param={TEAM_BUNDLE}.voip;pn-prid={tok}",
            f";pn-provider=apns;pn-param={TEAM_BUNDLE}.voip;pn-prid=",
            f";pn-provider=apns;pn-param={TEAM_BUNDLE}.voip;pn-prid={'ab' * 2600}",
            f";pn-provider=apns;pn-param={'x' * 5000};pn-prid={tok}",
            f";pn-provider=apns;pn-param={TEAM_BUNDLE}.voip;pn-prid=%00%ff{tok}",
            f";pn-provider=apns;pn-param={TEAM_BUNDLE}.voip;pn-prid={tok};pn-prid={tok[::-1]}",
            f";pn-provider=fcm;pn-param=;pn-prid={tok}", ";pn-provider;pn-param;pn-prid",
            f";pn-provider=apns;pn-param={TEAM_BUNDLE}.voip&remote&x&&;pn-prid={tok}:voip&:remote&&",
            f";app-id={BUNDLE};pn-type=apple;pn-tok={tok};pn-provider=fcm",
        ))
        header = rng.choice(('+sip.instance="<urn:uuid:zzz>"', '+sip.instance="<urn:uuid:', "expires=" + "9" * 30,
                             '+sip.instance=<urn:uuid:00000000-0000-0000-0000-000000000000>', "q=2.5", ""))
        contact = f"<sip:dev@{self.target.domain}:{rng.randint(*DEAD_PORTS)}{params}>;{header}".encode()
        req.remove(b"Contact")
        req.headers.append((b"Contact", contact))

    def _m_body(self, rng: random.Random, req: Request) -> None:
        choice = rng.randrange(5)
        if choice == 0:
            req.body = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 3000)))
        elif choice == 1:
            req.body = _sdp(rng).replace(b"\r\n", b"\r\na=" + b"x" * 4000 + b"\r\n", 1)
        elif choice == 2:
            req.remove(b"Content-Type")
            req.body = b"v=0\r\n"
        elif choice == 3:
            req.remove(b"Content-Type")
            req.headers.append((b"Content-Type", b"multipart/mixed;boundary=\"\""))
            req.body = b"--\r\n\r\n--\r\n--"
        else:
            req.headers.append((b"Content-Encoding", b"gzip"))
            req.body = b"\x1f\x8b\x08\x00" + bytes(rng.getrandbits(8) for _ in range(100))


_IPV4 = re.compile(rb"(?<![\d.])(\d{1,3})\.\d{1,3}\.\d{1,3}\.\d{1,3}(?![\d.])")
_IPV6 = re.compile(rb"\[([0-9A-Fa-f:.]*)\]")


def leaves_loopback(data: bytes) -> bool:
    """True when `data` names an IP address the proxy could send to that is not on this host
    (a byte flip can turn 127.0.0.1 into 137.0.0.1); such a mutant is not sent."""
    for m in _IPV4.finditer(data):
        if m.group(1) != b"127" and m.group(0) != b"0.0.0.0":
            return True
    return any(m.group(1) not in (b"::1", b"0:0:0:0:0:0:0:1") for m in _IPV6.finditer(data))


def _sdp(rng: random.Random) -> bytes:
    sess = rng.randint(1, 2**31)
    return (f"v=0\r\no=- {sess} {sess} IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {rng.randrange(20_000, 21_000, 2)} RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\n"
            ).encode()


def _unicode_digits(rng: random.Random, number: str) -> bytes:
    digits = rng.choice(DIGITS)
    return "".join(digits[int(c)] if c.isascii() and c.isdigit() else c for c in number).encode()


def _insert_at(rng: random.Random, data: bytes, what: bytes) -> bytes:
    k = rng.randint(0, len(data))
    return data[:k] + what + data[k:]


def _after(data: bytes, marker: bytes, what: bytes, rng: random.Random) -> bytes:
    """`what` right after the first `marker` (a URI's user part), or anywhere when there is none."""
    return data.replace(marker, marker + what, 1) if marker in data else _insert_at(rng, data, what)


# --------------------------------------------------------------------------- byte-level mutations

_INTERESTING = (b"\x00", b"\xff", b"\r\n", b"\r\n ", b"\r\n\r\n", b":", b";", b"<", b">", b"%", b'"', b"\\",
                b",", b"\r", b"\n", b"\t", b"=", b"@")


def _b_flip(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return data
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def _b_truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randint(0, len(data))]


def _b_insert(rng: random.Random, data: bytes) -> bytes:
    what = rng.choice(_INTERESTING) if rng.random() < 0.7 else bytes(rng.getrandbits(8) for _ in range(8))
    return _insert_at(rng, data, what * rng.choice((1, 1, 3, 100)))


def _b_delete(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return data
    k = rng.randrange(len(data))
    return data[:k] + data[k + rng.randint(1, 64):]


def _b_duplicate(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return data
    k = rng.randrange(len(data))
    chunk = data[k: k + rng.randint(1, 200)]
    return data[:k] + chunk * rng.randint(2, 20) + data[k:]


def _b_crlf(rng: random.Random, data: bytes) -> bytes:
    """Some line ends become bare LF or bare CR."""
    parts = data.split(b"\r\n")
    if len(parts) < 2:
        return data
    seps = [rng.choice((b"\r\n", b"\r\n", b"\n", b"\r")) for _ in parts[1:]]
    return parts[0] + b"".join(s + p for s, p in zip(seps, parts[1:], strict=True))


# --------------------------------------------------------------------------- senders


@dataclass
class FuzzStats:
    """What one `run()` did. `replies` counts responses by class ("1xx" .. "6xx", "other");
    `requests_received` counts requests the proxy sent to the sender (relayed in-dialog requests).
    `sending` is the time until the last request was sent, `elapsed` adds the reply collection."""

    transport: str
    seed: int
    requested: int
    sent: int = 0
    bytes_sent: int = 0
    send_errors: int = 0
    replies: dict[str, int] = field(default_factory=dict)
    requests_received: int = 0
    unparsed: int = 0
    tcp_connects: int = 0
    tcp_reconnects: int = 0
    tcp_closed_by_proxy: int = 0
    tcp_stalls: int = 0
    authenticated: bool = False
    sending: float = 0.0
    elapsed: float = 0.0
    stopped_by: str = "count"
    kinds: dict[str, int] = field(default_factory=dict)
    mutations: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Requests/s while sending (the reply collection after the last one left out)."""
        return round(self.sent / self.sending, 1) if self.sending else 0.0

    @property
    def total_replies(self) -> int:
        return sum(self.replies.values())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_replies"] = self.total_replies
        d["rate"] = self.rate
        return d

    def _count(self, gen: Generated) -> None:
        self.sent += 1
        self.bytes_sent += len(gen.data)
        self.kinds[gen.kind] = self.kinds.get(gen.kind, 0) + 1
        for m in gen.mutations:
            self.mutations[m] = self.mutations.get(m, 0) + 1

    def _incoming(self, data: bytes) -> None:
        """One UDP datagram or one framed TCP message from the proxy."""
        m = re.match(rb"SIP/2\.0 ([1-6])\d\d ", data)
        if m:
            key = f"{m.group(1).decode()}xx"
            self.replies[key] = self.replies.get(key, 0) + 1
        elif data.startswith(b"SIP/2.0 "):
            self.replies["other"] = self.replies.get("other", 0) + 1
        elif re.match(rb"[A-Za-z]+ \S+ SIP/2\.0\r\n", data):
            self.requests_received += 1
        elif data.strip(b"\r\n"):
            self.unparsed += 1


def fetch_challenge(host: str, port: int, user: str, domain: str = "127.0.0.1", timeout: float = 5.0) -> str | None:
    """The proxy's WWW-Authenticate for a REGISTER of `user` (None when it does not challenge)."""
    try:
        with SipClient(port, "udp", host) as c:
            r = c.register(user, f"<sip:{user}@{domain}:{DEAD_PORTS[0]}>", expires=0, domain=domain,
                           timeout=timeout)
    except (OSError, TimeoutError, ValueError):
        return None
    values = r.header("WWW-Authenticate")
    return values[0] if r.status == 401 and values else None


Progress = Callable[[FuzzStats], None]


def run(host: str, port: int, transport: str, count: int, seed: int, rate: float = 1000.0,
        deadline: float | None = None, *, credentials: Credentials | None = None, tcp_connections: int = 4,
        linger: float = 1.0, progress: Progress | None = None, progress_every: float = 5.0) -> FuzzStats:
    """Send `count` generated requests of seed `seed` to the proxy at `host`:`port` over `transport`
    ("udp" or "tcp") at about `rate` requests/s (0: as fast as possible), stopping early at
    `deadline` (a `time.monotonic()` instant; None: no time bound). After the last request,
    replies are collected for up to `linger` seconds (never past the deadline).

    With `credentials`, a share of the REGISTERs and INVITEs answer the proxy's digest challenge
    (fetched first, and again every minute: nonces expire), so they reach the push-parameter
    parsing and the call routing behind authentication."""
    require_loopback(host)
    if transport not in ("udp", "tcp"):
        raise ValueError(f"transport must be udp or tcp, not {transport!r}")
    stats = FuzzStats(transport, seed, count)
    sender: _Sender = _UdpSender(host, port, stats) if transport == "udp" else _TcpSender(
        host, port, stats, tcp_connections)
    try:
        sink = sender.local_port if transport == "udp" else DEAD_PORTS[0]
        target = Target(host, port, transport, sender.local_port, sink)
        fuzzer = SipFuzzer(seed, target, credentials)
        fetched = -1e9
        start = time.monotonic()
        last_progress = start
        for i in range(count):
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                stats.stopped_by = "deadline"
                break
            if credentials is not None and now - fetched > 60:
                fuzzer.challenge = fetch_challenge(host, port, credentials.user, credentials.domain)
                stats.authenticated = stats.authenticated or fuzzer.challenge is not None
                fetched = now
            if rate > 0:
                due = start + i / rate
                while now < due:
                    sender.drain(min(due - now, 0.05))
                    now = time.monotonic()
            gen = fuzzer.message(i)
            if sender.send(gen.data, deadline):
                stats._count(gen)
            else:
                stats.send_errors += 1
            sender.drain(0)
            if progress is not None and now - last_progress >= progress_every:
                stats.elapsed = now - start
                progress(stats)
                last_progress = now
        stats.sending = time.monotonic() - start
        end = time.monotonic() + linger
        if deadline is not None:
            end = min(end, deadline)
        while time.monotonic() < end:
            sender.drain(min(0.05, max(0.0, end - time.monotonic())))
        stats.elapsed = time.monotonic() - start
    finally:
        sender.close()
    return stats


class _Sender:
    local_port: int

    def send(self, data: bytes, deadline: float | None) -> bool:
        raise NotImplementedError

    def drain(self, wait: float) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class _UdpSender(_Sender):
    """One socket bound on the proxy's (loopback) host: sendto without waiting for answers."""

    def __init__(self, host: str, port: int, stats: FuzzStats) -> None:
        self.addr = (host.strip("[]"), port)
        self.stats = stats
        self.sock = socket.socket(_family(host), socket.SOCK_DGRAM)
        self.sock.bind((self.addr[0], 0))
        self.sock.setblocking(False)
        self.local_port = int(self.sock.getsockname()[1])

    def send(self, data: bytes, deadline: float | None) -> bool:
        for _ in range(50):
            try:
                self.sock.sendto(data, self.addr)
                return True
            except BlockingIOError:
                select.select([], [self.sock], [], 0.02)
            except ConnectionRefusedError:  # an ICMP error of an earlier datagram: the proxy port closed
                return False
            except OSError:  # EMSGSIZE and the like
                return False
        return False

    def drain(self, wait: float) -> None:
        if wait > 0:
            select.select([self.sock], [], [], wait)
        while True:
            try:
                data = self.sock.recv(65_535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP port unreachable reported on this socket
                continue
            self.stats._incoming(data)

    def close(self) -> None:
        self.sock.close()


class _TcpConn:
    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.buf = b""


class _TcpSender(_Sender):
    """A few connections used in turn; one the proxy closed (or that stalls) is replaced."""

    SEND_TIMEOUT = 2.0

    def __init__(self, host: str, port: int, stats: FuzzStats, connections: int) -> None:
        self.addr = (host.strip("[]"), port)
        self.stats = stats
        self.conns = [_TcpConn() for _ in range(max(1, connections))]
        self.turn = 0
        self.local_port = self._connect(self.conns[0])

    def _connect(self, conn: _TcpConn) -> int:
        sock = socket.socket(_family(self.addr[0]), socket.SOCK_STREAM)
        try:
            sock.settimeout(self.SEND_TIMEOUT)
            sock.bind((self.addr[0], 0))
            sock.connect(self.addr)
        except OSError:
            sock.close()
            raise
        if self.stats.tcp_connects:
            self.stats.tcp_reconnects += 1
        self.stats.tcp_connects += 1
        conn.sock, conn.buf = sock, b""
        return int(sock.getsockname()[1])

    def _drop(self, conn: _TcpConn) -> None:
        if conn.sock is not None:
            with suppress(OSError):
                conn.sock.close()
        conn.sock, conn.buf = None, b""

    def send(self, data: bytes, deadline: float | None) -> bool:
        for _attempt in range(2):  # a connection the proxy closed: once more on a fresh one
            conn = self.conns[self.turn % len(self.conns)]
            if conn.sock is None:
                try:
                    self._connect(conn)
                except OSError:
                    return False
            assert conn.sock is not None
            timeout = self.SEND_TIMEOUT
            if deadline is not None:
                timeout = max(0.05, min(timeout, deadline - time.monotonic()))
            conn.sock.settimeout(timeout)
            try:
                conn.sock.sendall(data)
            except TimeoutError:
                self.stats.tcp_stalls += 1
                self._drop(conn)
                self.turn += 1
                return False
            except OSError:
                self.stats.tcp_closed_by_proxy += 1
                self._drop(conn)
                continue
            self.turn += 1
            return True
        self.turn += 1
        return False

    def drain(self, wait: float) -> None:
        live = [(c, c.sock) for c in self.conns if c.sock is not None]
        if not live:
            if wait > 0:
                time.sleep(wait)
            return
        readable, _, _ = select.select([s for _, s in live], [], [], max(0.0, wait))
        for conn, sock in live:
            if sock not in readable:
                continue
            try:
                chunk = sock.recv(65_536)
            except OSError:
                chunk = b""
            if not chunk:
                self.stats.tcp_closed_by_proxy += 1
                self._drop(conn)
                continue
            conn.buf = self._frame(conn.buf + chunk)

    def _frame(self, buf: bytes) -> bytes:
        """Count every complete message in `buf` (framed by Content-Length); return the rest."""
        while True:
            buf = buf.lstrip(b"\r\n")  # keepalive pongs
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0:
                return buf if len(buf) < 1_000_000 else b""
            head = buf[:head_end]
            m = re.search(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*(\d+)", head)
            length = int(m.group(1)) if m else 0
            end = head_end + 4 + length
            if len(buf) < end:
                return buf
            self.stats._incoming(buf[:end])
            buf = buf[end:]

    def close(self) -> None:
        for conn in self.conns:
            self._drop(conn)


# --------------------------------------------------------------------------- checks

_SEVERE = re.compile(r"(?:^|\s)(?:CRITICAL|BUG|ALERT):")
_PYTHON = re.compile(r"route-error|Traceback|Unhandled exception|ERROR: app_python3")
_ERROR = re.compile(r"^\s*\d+\(\d+\) ERROR:")


@dataclass
class LogReport:
    """What a Kamailio log says after a fuzz run: `severe` lines (CRITICAL, BUG, ALERT: must be
    none), `python_errors` (the router's route-error lines, Python tracebacks, app_python3 errors:
    must be none), how many ERROR lines (malformed input is expected to cause many), and the
    severe and Python lines grouped by `kinds` (the line's message with numbers as #): per kind
    its count and the fuzz requests it names, as (seed, transport, index), first ones first."""

    severe: list[str]
    python_errors: list[str]
    error_lines: int
    lines: int
    kinds: dict[str, int]
    suspects: dict[str, list[tuple[int, str, int]]]

    @property
    def clean(self) -> bool:
        return not self.severe and not self.python_errors

    def to_dict(self) -> dict[str, Any]:
        return {"severe": self.severe[:50], "python_errors": self.python_errors[:50], "error_lines": self.error_lines,
                "lines": self.lines, "kinds": self.kinds, "suspects": {k: v[:5] for k, v in self.suspects.items()},
                "clean": self.clean}


def _kind(line: str) -> str:
    """A log line's message without the process, the log prefix and the numbers."""
    text = line.split("route-error ", 1)[1] if "route-error " in line else re.sub(r"^\s*\d+\(\d+\) ", "", line)
    return re.sub(r"\d+", "#", re.sub(r"\{[^}]*\} ", "", text, count=1))[:200]


def scan_log(text: str) -> LogReport:
    severe: list[str] = []
    python: list[str] = []
    errors = 0
    kinds: dict[str, int] = {}
    suspects: dict[str, list[tuple[int, str, int]]] = {}
    lines = text.splitlines()
    for line in lines:
        if _ERROR.match(line):
            errors += 1
        if _SEVERE.search(line):
            severe.append(line[:2000])
        elif _PYTHON.search(line):
            python.append(line[:2000])
        else:
            continue
        kind = _kind(line)
        kinds[kind] = kinds.get(kind, 0) + 1
        suspects.setdefault(kind, []).extend(locate(line))
    return LogReport(severe, python, errors, len(lines), kinds, suspects)


def options_ping(host: str, port: int, transport: str = "udp", timeout: float = 5.0) -> int | None:
    """Status of the proxy's answer to a keepalive OPTIONS (None: no answer)."""
    require_loopback(host)
    domain = f"[{host}]" if ":" in host else host
    try:
        with SipClient(port, transport, host) as c:
            c.send(
                f"OPTIONS sip:{domain} SIP/2.0\r\n"
                f"Via: SIP/2.0/{transport.upper()} {domain}:{c.local_port};rport;branch=z9hG4bK{uuid.uuid4().hex}\r\n"
                f"From: <sip:ping@{domain}>;tag={uuid.uuid4().hex[:8]}\r\nTo: <sip:{domain}>\r\n"
                f"Call-ID: ping-{uuid.uuid4().hex}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
                "Content-Length: 0\r\n\r\n")
            return c.response(timeout).status
    except (OSError, TimeoutError, ConnectionError, ValueError):
        return None


@dataclass
class CallResult:
    """A legitimate call: a device (SIPp UAS + REGISTER with RFC 8599 params, awake) is called by
    a SIPp caller through the proxy."""

    transport: str
    register_status: int | None
    caller_rc: int | None
    caller_finals: list[int]
    device_rc: int | None
    device_invites: int
    elapsed: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return (self.register_status == 200 and self.caller_rc == 0 and self.caller_finals == [200]
                and self.device_rc == 0 and self.device_invites == 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def legit_call(stack: Stack, transport: str = "udp", timeout: float = 30.0) -> CallResult:
    """Register a fresh user's device and call it (the smallest flow of tests/test_kamailio_flows.py:
    the device is awake, so it rings at once). SIPp work dirs go under `stack.tmpdir`."""
    start = time.monotonic()
    user = "legit" + uuid.uuid4().hex[:8]
    password = stack.add_user(user)
    dev = sipp_device(stack.tmpdir, transport)
    # An awake phone keeps the connection it registered over (over TCP the proxy takes a push
    # phone whose connection is gone for asleep, and pushes it instead of ringing it)
    with ExitStack() as registration:
        try:
            c = registration.enter_context(SipClient(stack.kamailio.port, transport))
            reg = c.register(user, rfc8599_apns_contact(dev.port, apns_token(), transport), password=password)
        except (OSError, TimeoutError, ConnectionError) as exc:
            dev.stop()
            return CallResult(transport, None, None, [], None, 0, time.monotonic() - start, f"register: {exc!r}")
        if reg.status != 200:
            dev.stop()
            return CallResult(transport, reg.status, None, [], None, 0, time.monotonic() - start, reg.raw[:300])
        caller = sipp_caller(stack.tmpdir, stack.kamailio.port, user, transport)
        caller_rc = caller.wait(timeout)
        device_rc = dev.wait(15)
    detail = "" if caller_rc == 0 and device_rc == 0 else (caller.logs() + dev.logs())[-2000:]
    return CallResult(transport, reg.status, caller_rc, caller.final_codes(), device_rc, dev.received("INVITE"),
                      time.monotonic() - start, detail)


def split_counts(total: int, transports: Sequence[str], weights: Sequence[float] | None = None) -> dict[str, int]:
    """`total` requests shared among `transports` (by `weights`, default evenly), summing to `total`."""
    w = list(weights or [1.0] * len(transports))
    shares = [int(total * x / sum(w)) for x in w]
    shares[0] += total - sum(shares)
    return dict(zip(transports, shares, strict=True))
