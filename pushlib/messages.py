"""Pure decisions for SIP MESSAGE to users whose devices sleep (issue 13).

The KEMI router (kemi/ksrmessages.py) reads the MESSAGE through KSR, asks this module what to do,
stores through `pushlib.msgstore` and acts through KSR. Nothing here does I/O.

- `classify` sorts a body by Content-Type: `text/plain` and `message/cpim` are stored and pushed
  with their text, `application/im-iscomposing+xml` is never stored nor pushed, anything else is
  stored and pushed with GENERIC_TEXT.
- `plan_message` decides: relay as before (every device reachable now), store for the sleeping
  push devices (202 to the sender, a `messageReceived` push), or answer an error.
- `StoredMessage` is what a queued message is in Redis (flat string fields) and what its delivery
  to the woken device is built from; `DeliveryStep` is one MESSAGE of a delivery chain in flight
  (kept in Kamailio's shared memory, keyed by the token the uac module hands back with the reply).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from enum import Enum

from pushlib import calls, params
from pushlib.models import Device, PushJob, PushKind

TEXT_PLAIN = "text/plain"
CPIM = "message/cpim"
IS_COMPOSING = "application/im-iscomposing+xml"
#: the push body of a message whose type has no text to show (a file transfer, a location...)
GENERIC_TEXT = "New message"
#: characters of message text a push job carries (the payload builder cuts further to fit)
PREVIEW_CHARS = 1024
#: the uac module's body buffer is 32 KB: MESSAGE_MAX_BODY can never be set above this
HARD_MAX_BODY = 30_000
#: longest Content-Type value kept (it is written back as a header of the delivered MESSAGE)
MAX_CONTENT_TYPE = 200
#: longest From value kept for the delivery (display name and URI)
MAX_FROM = 512

# a media type with parameters: tokens, quoted strings, no CR/LF or other control characters
_TOKEN = r"[A-Za-z0-9!#$&^_.+-]+"
_CONTENT_TYPE = re.compile(rf'{_TOKEN}/{_TOKEN}(\s*;\s*{_TOKEN}=("[^"\\\x00-\x1f]*"|{_TOKEN}))*')
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class BodyKind(Enum):
    TEXT = "text"  # text/plain
    CPIM = "cpim"  # message/cpim (RFC 3862): its inner text/plain is shown
    COMPOSING = "composing"  # RFC 3994 typing indication: never stored nor pushed
    OTHER = "other"  # stored and pushed with GENERIC_TEXT


@dataclass(frozen=True)
class MessageLimits:
    """Defines of kamailio.cfg (MESSAGE_*); 0 is never a valid value here (a limit is always on)."""

    max_body: int = 8192  # bytes of one body; above: 413, nothing stored
    max_count: int = 200  # messages queued per user; above: QUEUE_FULL_CODE, what is stored stays
    max_bytes: int = 262_144  # body bytes queued per user
    ttl: int = 86_400  # seconds a queued message waits for its device
    pushes_per_minute: int = 10  # messageReceived pushes per device per minute (more are stored silently)


def message_limits(get: Callable[[str], str | None]) -> MessageLimits:
    """Limits from defines (`get` returns a define's text or None); bad or zero values keep the default."""
    base = MessageLimits()

    def number(name: str, default: int, maximum: int = 10**9) -> int:
        raw = (get(name) or "").strip().strip('"')
        value = int(raw) if re.fullmatch(r"[0-9]{1,9}", raw) else 0
        return min(value, maximum) if value > 0 else default

    return MessageLimits(
        max_body=number("MESSAGE_MAX_BODY", base.max_body, HARD_MAX_BODY),
        max_count=number("MESSAGE_QUEUE_MAX", base.max_count),
        max_bytes=number("MESSAGE_QUEUE_BYTES", base.max_bytes),
        ttl=number("MESSAGE_TTL", base.ttl),
        pushes_per_minute=number("MESSAGE_PUSHES_PER_MINUTE", base.pushes_per_minute),
    )


def media_type(content_type: str) -> str:
    """`type/subtype` of a Content-Type value, lower-cased, without parameters."""
    return content_type.split(";", 1)[0].strip().lower()


def classify(content_type: str) -> BodyKind:
    mtype = media_type(content_type)
    if mtype == TEXT_PLAIN:
        return BodyKind.TEXT
    if mtype == CPIM:
        return BodyKind.CPIM
    if mtype == IS_COMPOSING:
        return BodyKind.COMPOSING
    return BodyKind.OTHER


def valid_content_type(content_type: str) -> bool:
    """Whether a Content-Type can be written back as a header of the delivered MESSAGE as it is
    (a well-formed media type, no control characters: nothing can be smuggled into the headers)."""
    return 0 < len(content_type) <= MAX_CONTENT_TYPE and _CONTENT_TYPE.fullmatch(content_type.strip()) is not None


def cpim_text(body: str) -> str | None:
    """The text of a message/cpim body (RFC 3862: message headers, a blank line, the inner MIME
    headers, a blank line, the content) when its inner type is text/plain; None otherwise."""
    parts = re.split(r"\r?\n\r?\n", body, maxsplit=2)
    if len(parts) < 3:
        return None
    inner_type = ""
    for line in re.split(r"\r?\n", parts[1]):
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-type":
            inner_type = value
    return parts[2] if media_type(inner_type) == TEXT_PLAIN else None


def preview(kind: BodyKind, body: str) -> str:
    """The text a push shows for a message (cut to PREVIEW_CHARS, control characters dropped)."""
    if kind is BodyKind.TEXT:
        text: str | None = body
    elif kind is BodyKind.CPIM:
        text = cpim_text(body)
    else:
        text = None
    text = GENERIC_TEXT if text is None or not text.strip() else text
    return _CONTROL.sub("", text.strip())[:PREVIEW_CHARS]


def sender_identity(from_header: str, from_user: str) -> tuple[str, str]:
    """(name shown in the push: display name or user; the From value the delivered MESSAGE carries:
    `"name" <uri>`, rebuilt from its parts so no header parameter or control character passes)."""
    name, _ = calls.caller_identity(from_header, from_user)
    try:
        addr = params.parse_name_addr(from_header)
        uri = addr.uri if addr.uri.startswith(("sip:", "sips:", "tel:")) else ""
        display = addr.display_name.strip()
    except params.MalformedPushParams:
        uri, display = "", ""
    if not uri or _CONTROL.search(uri) or any(c in uri for c in '<>" \r\n'):
        uri = "sip:anonymous@anonymous.invalid"
    display = _CONTROL.sub("", display).replace("\\", "").replace('"', "")[:128]
    value = f'"{display}" <{uri}>' if display else f"<{uri}>"
    return name, value if len(value) <= MAX_FROM else "<sip:anonymous@anonymous.invalid>"


# --------------------------------------------------------------------------- the plan


class Action(Enum):
    RELAY = "relay"  # nobody sleeps: routed as any other request (lookup + relay)
    STORE = "store"  # queue for the sleeping push devices, 202, push; copies to the awake bindings
    RELAY_AWAKE = "relay_awake"  # an isComposing with sleeping devices: to the awake bindings only
    REPLY = "reply"  # answered here with `code`


@dataclass(frozen=True)
class MessagePlan:
    action: Action
    code: int = 0
    reason: str = ""
    ring: tuple[calls.Binding, ...] = ()  # bindings reachable now
    store_for: tuple[Device, ...] = ()  # sleeping push devices the message is queued for
    log_reason: str = ""


QUEUE_FULL_CODE = 486
QUEUE_FULL_REASON = "Message Queue Full"
TOO_LARGE_REASON = "Message Too Large"


def plan_message(kind: BodyKind, body_bytes: int, body_ok: bool, bindings: Sequence[calls.Binding],
                 devices: Sequence[Device] | None, now: float, awake_window: float, limits: MessageLimits,
                 disconnected: frozenset[str] = frozenset()) -> MessagePlan:
    """What to do with a MESSAGE to a served user. Who is awake and who sleeps is decided as for
    an INVITE (`calls.plan_invite`): a push device that registered within the awake window and is
    still connected gets the MESSAGE directly, the others are asleep.

    `body_ok`: the body is UTF-8 without NUL and its Content-Type can be written back (a body that
    cannot be stored as it came is refused with 415 rather than altered)."""
    if body_bytes > limits.max_body:
        return MessagePlan(Action.REPLY, 413, TOO_LARGE_REASON, log_reason="too-large")
    invite = calls.plan_invite(bindings, devices, now, awake_window, disconnected)
    if invite.verdict is calls.Verdict.NOT_FOUND:
        return MessagePlan(Action.REPLY, 404, "Not Found", log_reason="no-such-user")
    if invite.verdict is calls.Verdict.RING:
        return MessagePlan(Action.RELAY, ring=invite.ring)
    if invite.verdict is calls.Verdict.UNAVAILABLE:
        if devices is None:
            return MessagePlan(Action.REPLY, 503, "Message Store Unavailable", log_reason="store-down")
        return MessagePlan(Action.REPLY, 480, "Temporarily Unavailable", log_reason="nobody-reachable")
    # some push devices sleep
    if kind is BodyKind.COMPOSING:
        if invite.ring:
            return MessagePlan(Action.RELAY_AWAKE, ring=invite.ring)
        return MessagePlan(Action.REPLY, 480, "Temporarily Unavailable", log_reason="composing-asleep")
    if not body_ok:
        return MessagePlan(Action.REPLY, 415, "Unsupported Media Type", log_reason="body-not-storable")
    return MessagePlan(Action.STORE, ring=invite.ring, store_for=invite.push)


# --------------------------------------------------------------------------- stored messages


@dataclass(frozen=True)
class StoredMessage:
    """One queued message. `entry_id` is its Redis stream id ("" before it is stored)."""

    message_id: str
    sender: str  # the From value of the delivery (`sender_identity`)
    content_type: str
    body: str
    received_at: float
    entry_id: str = ""

    def fields(self) -> dict[str, str]:
        return {"mid": self.message_id, "from": self.sender, "ct": self.content_type, "body": self.body,
                "at": f"{self.received_at:.3f}"}

    @property
    def size(self) -> int:
        """What the message counts for against MESSAGE_QUEUE_BYTES."""
        return len(self.body.encode("utf-8"))

    @staticmethod
    def decode(entry_id: str, raw: Mapping[str, str]) -> StoredMessage | None:
        try:
            return StoredMessage(raw["mid"], raw["from"], raw["ct"], raw.get("body", ""), float(raw["at"]), entry_id)
        except (KeyError, ValueError):
            return None


def new_message_id() -> str:
    return secrets.token_hex(8)


def delivery_headers(message: StoredMessage) -> str:
    """The extra headers of the delivered MESSAGE (uac `$uac_req(hdrs)`): its type, and the Date
    it reached the proxy (RFC 3428 §7: the recipient shows when it was sent, not when it woke)."""
    return f"Content-Type: {message.content_type}\r\nDate: {formatdate(message.received_at, usegmt=True)}\r\n"


def message_job(aor: str, message_id: str, sender_name: str, text: str, device_ids: Sequence[str], now: float,
                ttl: float) -> PushJob:
    """The `messageReceived` push (title = sender, body = text; data: message_id, sender). Its job id
    comes from the message id: the dispatcher never delivers it twice to a device."""
    return PushJob(
        job_id=hashlib.sha1(f"{PushKind.MESSAGE.value}|{message_id}".encode()).hexdigest()[:24],
        kind=PushKind.MESSAGE,
        aor=aor,
        deadline=now + ttl,
        device_ids=tuple(device_ids),
        data={"message_id": message_id, "sender": sender_name, "message": text},
        created_at=now,
    )


@dataclass(frozen=True)
class DeliveryStep:
    """One MESSAGE of a device's delivery chain in flight: what its reply acknowledges."""

    aor: str
    device_id: str
    ruri: str  # the device's binding
    dst: str  # where it is sent ("" = the R-URI): the binding's received address behind NAT
    entry_id: str
    lock: str  # the chain's lock token (msgstore)
    sent: int = 0  # messages this chain delivered before this one

    def encode(self) -> str:
        # (none of the parts holds a tab: AORs, device ids and URIs are checked SIP text)
        return "\t".join((self.aor, self.device_id, self.ruri, self.dst, self.entry_id, self.lock, str(self.sent)))

    @staticmethod
    def decode(raw: object) -> DeliveryStep | None:
        if not isinstance(raw, str):
            return None
        parts = raw.split("\t")
        if len(parts) != 7 or not parts[6].isdigit():
            return None
        aor, device_id, ruri, dst, entry_id, lock, sent = parts
        return DeliveryStep(aor, device_id, ruri, dst, entry_id, lock, int(sent))
