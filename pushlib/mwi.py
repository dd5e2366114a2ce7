"""Voicemail notifications: RFC 3842 message summaries, who may send them, when they push, and the
per-user voicemail (fallback) URI.

Pure parts (unit-tested in tests/test_mwi.py): `parse_summary` (an `application/simple-message-summary`
body), `rises` (only a rise in new voice messages pushes), `voicemail_job` (the `voicemailReceived`
push job), `parse_sources` / `source_allowed` (VOICEMAIL_SOURCES), `check_voicemail_uri`.
`VoicemailStore` keeps, on a sync client (`redisconn.sync_client`), the last counts per user
(`pn:{<aor>}:mwi`, see `schema`-style notes below) and the per-user voicemail URI (field `voicemail`
of the subscriber hash `schema.subscriber_key`). Every method raises `StoreUnavailable` when Redis
cannot serve it.

Redis keys (in the AOR's hash tag, like the user's devices):
- `pn:{<aor>}:mwi` (`counts_key`) hash: `new`, `old` (the voice-message counts of the last accepted
  summary) and `at` (epoch seconds). TTL: COUNTS_TTL, refreshed by every summary: one small hash
  per user who got a voicemail in the last 30 days, never more.
- field `voicemail` of `pn:sub:<user>@<domain>` (`schema.subscriber_key`): the user's voicemail
  URI, where the router sends a parked call nobody answered (preferred over FALLBACK_URI). No TTL.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pushlib import schema
from pushlib.aor import aor_parts
from pushlib.models import PushJob, PushKind
from pushlib.redisconn import StoreUnavailable, unavailable_on_error

CONTENT_TYPE = "application/simple-message-summary"
EVENT = "message-summary"
#: a summary is a few lines; anything bigger is not one (and is not worth reading)
MAX_BODY_BYTES = 4096
MAX_LINES = 64
#: counts above this are not a mailbox (9 digits at most: never a float, never a huge int)
MAX_COUNT = 999_999_999
#: how long the last counts of a user are kept after the last summary (seconds)
COUNTS_TTL = 30 * 24 * 3600
MAX_URI_CHARS = 256
VOICEMAIL_FIELD = "voicemail"
VOICEMAIL_TITLE = "Voicemail"

#: RFC 3458 message-context-class values a summary line may name (case-insensitive)
_CLASSES = frozenset({"voice-message", "fax-message", "pager-message", "multimedia-message", "text-message",
                      "none"})
_COUNTS = re.compile(r"(\d{1,9})\s*/\s*(\d{1,9})(?:\s*\(\s*(\d{1,9})\s*/\s*(\d{1,9})\s*\))?")
_HEADER_NAME = re.compile(r"[A-Za-z0-9!%*_+`'~.-]+")
# a SIP(S) URI without anything that could break a header or a log line: printable ASCII, no
# blanks, quotes or angle brackets; a host part after the scheme (and after `user@` if any)
_VM_URI = re.compile(r"sips?:(?:[^@\s<>\"\\]+@)?[A-Za-z0-9{}\[\]._:-]+(?:;[!-~]*)?", re.IGNORECASE)
_BAD_URI_CHARS = re.compile(r"[^!-~]|[<>\"\\]")
_SURROGATES = re.compile("[\ud800-\udfff]")


class MwiError(ValueError):
    """A message summary we refuse (answered 400); the text says why, without echoing the body."""


@dataclass(frozen=True)
class MessageSummary:
    """What a summary says: `waiting` (Messages-Waiting) and the voice-message counts."""

    waiting: bool
    new: int = 0
    old: int = 0
    urgent_new: int = 0
    urgent_old: int = 0
    account: str = ""


def parse_summary(body: str | bytes) -> MessageSummary:
    """Parse an RFC 3842 `application/simple-message-summary` body.

    Lines end with CRLF or LF; header names are case-insensitive. `Messages-Waiting: yes|no` is
    required (once); `Message-Account` is optional; summary lines `<class>: new/old [(urgent
    new/urgent old)]` of the RFC 3458 classes are checked and the `Voice-Message` one is kept; other
    header lines are extensions and ignored; a blank line ends the summary (optional message
    headers follow). Raises MwiError for anything else: too big, not UTF-8, a line that is no
    header, a bad status or count."""
    if isinstance(body, bytes):
        if len(body) > MAX_BODY_BYTES:
            raise MwiError(f"summary larger than {MAX_BODY_BYTES} bytes")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise MwiError("summary is not UTF-8") from None
    else:
        text = body
        if len(text.encode("utf-8", "surrogatepass")) > MAX_BODY_BYTES:
            raise MwiError(f"summary larger than {MAX_BODY_BYTES} bytes")
        if _SURROGATES.search(text):  # (bytes that were not UTF-8, as the router hands them on)
            raise MwiError("summary is not UTF-8")
    lines = text.replace("\r\n", "\n").split("\n")
    while lines and not lines[0].strip(" \t"):
        lines.pop(0)  # (a leading blank line is a sender's slip, not an empty summary)
    waiting: bool | None = None
    voice: tuple[int, int, int, int] | None = None
    account = ""
    for number, line in enumerate(lines):
        if number >= MAX_LINES:
            raise MwiError(f"summary longer than {MAX_LINES} lines")
        if not line.strip(" \t"):
            break  # the optional message headers follow: not ours to read
        name, colon, value = line.partition(":")
        name, value = name.strip(" \t"), value.strip(" \t")
        if not colon or not _HEADER_NAME.fullmatch(name):
            raise MwiError(f"line {number + 1} is not a header")
        if any((c < " " and c != "\t") or c == "\x7f" for c in value):
            raise MwiError(f"line {number + 1} holds control characters")
        lowered = name.lower()
        if lowered == "messages-waiting":
            if waiting is not None:
                raise MwiError("Messages-Waiting given twice")
            if value.lower() not in ("yes", "no"):
                raise MwiError("Messages-Waiting is neither yes nor no")
            waiting = value.lower() == "yes"
        elif lowered == "message-account":
            account = value[:MAX_URI_CHARS]
        elif lowered in _CLASSES:
            m = _COUNTS.fullmatch(value)
            if m is None:
                raise MwiError(f"{name} is not new/old (urgent new/urgent old)")
            counts = tuple(int(g) if g is not None else 0 for g in m.groups())
            if lowered == "voice-message":
                if voice is not None:
                    raise MwiError("Voice-Message given twice")
                voice = (counts[0], counts[1], counts[2], counts[3])
    if waiting is None:
        raise MwiError("no Messages-Waiting line")
    new, old, urgent_new, urgent_old = voice or (0, 0, 0, 0)
    return MessageSummary(waiting, new, old, urgent_new, urgent_old, account)


def format_summary(summary: MessageSummary) -> str:
    """The body a voicemail server would send for `summary` (tests, the demo)."""
    lines = [f"Messages-Waiting: {'yes' if summary.waiting else 'no'}"]
    if summary.account:
        lines.append(f"Message-Account: {summary.account}")
    lines.append(f"Voice-Message: {summary.new}/{summary.old} ({summary.urgent_new}/{summary.urgent_old})")
    return "\r\n".join(lines) + "\r\n"


def rises(previous_new: int | None, new: int) -> bool:
    """Whether a summary with `new` voice messages pushes, after one with `previous_new` (None: no
    summary kept for the user). Only a rise pushes: the same count again (a server's periodic
    resend, a re-subscription), fewer (the user listened), or old ones moving do not."""
    return new > (previous_new or 0)


def check_counts(new: int, old: int) -> tuple[int, int]:
    """(new, old) when both are counts a mailbox can hold; MwiError otherwise."""
    for name, value in (("new", new), ("old", old)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
            raise MwiError(f"{name} is not a count 0-{MAX_COUNT}")
    return new, old


def voicemail_body(new: int) -> str:
    return "1 new voicemail" if new == 1 else f"{new} new voicemails"


def voicemail_job(aor: str, new: int, old: int, now: float, ttl: float, caller: tuple[str, str] = ("", "")
                  ) -> PushJob:
    """The `voicemailReceived` push job (every device of the user; alert, priority 5 on iOS, normal
    on Android, payload builders in `pushlib.payloads`): `new_messages` / `old_messages` as
    strings, a title and a body the app may show as they are."""
    data = {"new_messages": str(new), "old_messages": str(old), "title": VOICEMAIL_TITLE, "body": voicemail_body(new)}
    if caller[0]:
        data["caller_name"] = caller[0]
    if caller[1]:
        data["caller_number"] = caller[1]
    return PushJob(job_id=uuid.uuid4().hex, kind=PushKind.VOICEMAIL, aor=aor, deadline=now + ttl, data=data,
                   created_at=now)


# --------------------------------------------------------------------------- who may send summaries

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_sources(raw: str | None, setting: str = "VOICEMAIL_SOURCES") -> tuple[Network, ...]:
    """Trusted senders (VOICEMAIL_SOURCES, CLUSTER_NODES): addresses or networks (CIDR) separated
    by commas or blanks; "" or None: nobody. Raises ValueError naming the entry that is neither."""
    out: list[Network] = []
    for part in (raw or "").replace(",", " ").split():
        try:
            out.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"{setting}: {part[:60]!r} is not an address or network") from None
    return tuple(out)


def source_allowed(address: str, sources: tuple[Network, ...]) -> bool:
    """Whether a request from `address` (Kamailio's `$si`, IPv6 possibly in brackets) comes from
    one of `sources`."""
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return False
    return any(ip.version == net.version and ip in net for net in sources)


# --------------------------------------------------------------------------- the per-user voicemail URI


def check_voicemail_uri(uri: str) -> str:
    """`uri` when it can be a user's voicemail URI: `sip:` or `sips:` only (no tel:, http: ...), at
    most MAX_URI_CHARS, printable ASCII without blanks, quotes, angle brackets or backslashes (it
    becomes a request URI), with a host. `{user}` and `{domain}` are filled in like FALLBACK_URI's.
    Raises MwiError saying what is wrong."""
    if not isinstance(uri, str) or not uri:
        raise MwiError("the voicemail URI is empty")
    if len(uri) > MAX_URI_CHARS:
        raise MwiError(f"the voicemail URI is longer than {MAX_URI_CHARS} characters")
    if not uri[:5].lower().startswith(("sip:", "sips:")):
        raise MwiError("the voicemail URI must be a sip: or sips: URI")
    if _BAD_URI_CHARS.search(uri) or not _VM_URI.fullmatch(uri):
        raise MwiError("the voicemail URI is not a sip:[user@]host[:port][;params] URI")
    return uri


# --------------------------------------------------------------------------- Redis


def counts_key(aor: str) -> str:
    return f"pn:{{{aor}}}:mwi"


#: KEYS[1]: the user's counts hash. ARGV: new, old, now, TTL. Stores the counts and returns the
#: previous `new` (-1 when there was none): the swap is atomic, so two summaries racing each
#: other cannot both see the same previous count and both push.
SWAP_COUNTS_LUA = """#!lua
local prev = redis.call('HGET', KEYS[1], 'new')
redis.call('HSET', KEYS[1], 'new', ARGV[1], 'old', ARGV[2], 'at', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
if prev then return tonumber(prev) end
return -1
"""


class VoicemailStore:
    """The last message counts per user and the per-user voicemail URI (see module doc)."""

    def __init__(self, client: Any) -> None:
        self._r = client
        self._swap = client.register_script(SWAP_COUNTS_LUA)

    def swap_counts(self, aor: str, new: int, old: int, now: float) -> int | None:
        """Store the user's counts; returns the previous new count (None: none kept)."""
        with unavailable_on_error("mwi_counts"):
            prev = int(self._swap(keys=[counts_key(aor)], args=[new, old, repr(float(now)), COUNTS_TTL]))
        return None if prev < 0 else prev

    def counts(self, aor: str) -> tuple[int, int] | None:
        with unavailable_on_error("mwi_counts"):
            raw = self._r.hgetall(counts_key(aor))
        if not raw:
            return None
        return int(raw.get("new", 0)), int(raw.get("old", 0))

    def set_uri(self, aor: str, uri: str | None) -> bool:
        """Set (checked: MwiError) or, with None, clear the user's voicemail URI. True when
        something changed (a clear of a user without one: False)."""
        key = schema.subscriber_key(*aor_parts(aor))
        with unavailable_on_error("voicemail_uri"):
            if uri is None:
                return bool(self._r.hdel(key, VOICEMAIL_FIELD))
            self._r.hset(key, VOICEMAIL_FIELD, check_voicemail_uri(uri))
        return True

    def uri(self, aor: str) -> str | None:
        """The user's voicemail URI (None: none set, or a stored value no longer valid)."""
        with unavailable_on_error("voicemail_uri"):
            value = self._r.hget(schema.subscriber_key(*aor_parts(aor)), VOICEMAIL_FIELD)
        if value is None:
            return None
        try:
            return check_voicemail_uri(str(value))
        except MwiError:
            return None


def record_and_push(vm: VoicemailStore, enqueue: Callable[[PushJob], object], aor: str, new: int, old: int,
                    now: float, ttl: float, caller: tuple[str, str] = ("", "")) -> tuple[int | None, bool]:
    """What a summary (SIP NOTIFY or the HTTP API) does: keep the user's counts and, on a rise in
    new messages, queue the voicemailReceived push. Returns (previous new count, pushed). Raises
    StoreUnavailable; when the push could not be queued the previous counts are put back (best
    effort), so the sender's retry pushes."""
    previous = vm.swap_counts(aor, new, old, now)
    pushed = rises(previous, new)
    if pushed:
        try:
            enqueue(voicemail_job(aor, new, old, now, ttl, caller))
        except StoreUnavailable:
            with contextlib.suppress(StoreUnavailable):
                vm.swap_counts(aor, previous or 0, old, now)
            raise
    return previous, pushed
