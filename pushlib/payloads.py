"""Payload builders: what each push kind is on the wire for APNs and FCM (design.md §5).

Pure functions. The output is always valid UTF-8 JSON within the provider's limit:
free text (caller name and number, sender, title, body) is capped and then truncated
with "…" until it fits; ids (call_id, message_id, custom data fields) are never
altered, and when they alone cannot fit `PayloadTooLarge` is raised (the job is bad:
treat it as rejected, do not retry). Lone surrogates in any input become U+FFFD.

Fields by kind (APNs: top-level keys next to `aps`; FCM: `message.data`, all strings):
- every kind: `type` (the PushKind value), `sent_at` (epoch seconds of `now`);
- incomingCall: `call_id`, `callee`, `deadline`, `caller_name`, `caller_number`;
- cancelIncomingCall: `call_id`, `callee`;
- missedCall: `call_id`, `callee`, `caller_name`, `caller_number`, `title`, `body`;
`callee` is the address of record the call was for (`sip:user@domain`): an app signed in to
several accounts, or to another one since it registered, refuses a call push not for its own.
- messageReceived: `message_id`, `sender`, `title` (= sender), `body` (= message);
- voicemailReceived: `call_id`, `message_id`, `new_messages`, `old_messages` (RFC 3842 counts,
  `pushlib.mwi`), `caller_name`, `caller_number`, `title`, `body`;
- registrationRefresh: `aor` (the account to re-REGISTER; background / data-only, `pushlib.reregister`);
- custom: `title`, `body` and every other data field except the reserved ones.
Empty or absent inputs are left out. `settings.hide_caller` drops caller name and
number from call kinds. `badge` (digits) sets `aps.badge` on alert pushes.

iOS devices without a VoIP token (an app that registered only its remote-notification token:
RFC 8599 `pn-param` without `.voip`, Kazoo's `app-id=<bundle>;pn-type=apple`) are rung with a
visible alert instead, as Flexisip does for "remote" pushes: incomingCall is an `alert` push,
priority 10, topic `<bundle>`, `aps.alert` {title "Incoming call", body the caller line or
"Hidden caller"}, `sound` "default", `interruption-level` "time-sensitive", expiring at the
deadline; cancelIncomingCall replaces that alert (same `apns-collapse-id`) with a silent, passive
alert {title "Call ended", body the reason: "Answered elsewhere", "The caller hung up"...}.
Devices with a VoIP token keep the VoIP incomingCall and the background cancel.
`is_alert_call` tells which style a request is.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pushlib.models import ApnsRequest, Device, FcmMessage, Provider, PushKind
from pushlib.provider_limits import (
    APNS_COLLAPSE_ID_BYTES,
    APNS_PAYLOAD_BYTES,
    APNS_VOIP_PAYLOAD_BYTES,
    FCM_DATA_BYTES,
    FCM_MAX_TTL_SECONDS,
)
from pushlib.settings import Settings

MAX_TITLE_CHARS = 128  # names, numbers, senders, titles
MAX_BODY_CHARS = 1024
ELLIPSIS = "…"

MISSED_CALL_TITLE = "Missed Call"
INCOMING_CALL_TITLE = "Incoming call"
CALL_ENDED_TITLE = "Call ended"
VOICEMAIL_TITLE = "Voicemail"
NEW_MESSAGE_TITLE = "New Message"
UNKNOWN_CALLER = "Unknown caller"
HIDDEN_CALLER = "Hidden caller"

# The body of an alert-style cancel, by the job's `reason` (`calls.end_reason`); other
# `rejected-<code>` reasons say "Declined", anything else leaves the body out.
CALL_ENDED_BODIES = {
    "answered": "Answered elsewhere",
    "canceled": "The caller hung up",
    "timeout": "Not answered",
    "rejected-486": "Busy",
    "rejected-600": "Busy",
}
DECLINED = "Declined"

# Keys a custom push may not set: ours, or reserved by FCM (`from`, `google*`, `gcm*` ...).
_CUSTOM_RESERVED = {"type", "aps", "title", "body", "ttl", "badge", "sent_at", "from", "message_type",
                    "notification", "collapse_key"}
_FCM_RESERVED_PREFIXES = ("google", "gcm")

_SURROGATES = re.compile(r"[\ud800-\udfff]")
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # keeps \t and \n
_PRINTABLE_ASCII = re.compile(r"[!-~]+")


def custom_key_reserved(key: str) -> bool:
    """True for a data key a custom push may not set (ours, or FCM's): the builders drop it."""
    return key in _CUSTOM_RESERVED or key.startswith(_FCM_RESERVED_PREFIXES)


class PayloadTooLarge(ValueError):
    """The ids and custom fields alone exceed the provider's payload limit."""


@dataclass(frozen=True)
class _Wire:
    push_type: str
    apns_priority: int
    fcm_priority: str
    alert: bool  # shows title/body (aps.alert); otherwise content-available or voip
    sound: bool = True  # an alert's aps.sound "default"
    interruption: str = ""  # an alert's aps.interruption-level (iOS 15+), "" = the default (active)


_WIRE = {
    PushKind.INCOMING_CALL: _Wire("voip", 10, "high", alert=False),
    # Apple: a push with only content-available is a background push: push type background, priority 5
    PushKind.CANCEL_INCOMING_CALL: _Wire("background", 5, "high", alert=False),
    PushKind.MISSED_CALL: _Wire("alert", 10, "high", alert=True),
    PushKind.MESSAGE: _Wire("alert", 10, "high", alert=True),
    PushKind.VOICEMAIL: _Wire("alert", 5, "normal", alert=True),
    PushKind.REGISTRATION_REFRESH: _Wire("background", 5, "normal", alert=False),
    PushKind.CUSTOM: _Wire("alert", 10, "high", alert=True),
}
# iOS devices without a VoIP token: the call is a visible alert, its cancel a silent alert replacing it.
_ALERT_CALL_WIRE = {
    PushKind.INCOMING_CALL: _Wire("alert", 10, "high", alert=True, interruption="time-sensitive"),
    PushKind.CANCEL_INCOMING_CALL: _Wire("alert", 10, "high", alert=True, sound=False, interruption="passive"),
}
_CALL_KINDS = {PushKind.INCOMING_CALL, PushKind.CANCEL_INCOMING_CALL, PushKind.MISSED_CALL}
_ID_FIELDS = {
    PushKind.INCOMING_CALL: ("call_id", "callee"),
    PushKind.CANCEL_INCOMING_CALL: ("call_id", "callee"),
    PushKind.MISSED_CALL: ("call_id", "callee"),
    PushKind.VOICEMAIL: ("call_id", "message_id", "new_messages", "old_messages"),
    PushKind.MESSAGE: ("message_id",),
    # (an app signed in to several accounts refreshes the one named)
    PushKind.REGISTRATION_REFRESH: ("aor",),
}


@dataclass
class _Content:
    """The kind-specific fields, before they are laid out for one provider."""

    numbers: dict[str, int | float] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)  # never truncated
    texts: dict[str, tuple[str, int]] = field(default_factory=dict)  # value, cap in chars
    alert: bool = False  # title/body present and meant to be shown
    badge: int | None = None


def _id(value: str) -> str:
    if value.isascii():  # the usual id: nothing to replace, no regex pass
        return value
    return _SURROGATES.sub("\ufffd", value)


def _text(value: str) -> str:
    if value.isascii() and value.isprintable():  # no surrogate, no control character
        return value.strip()
    return _TEXT_CONTROL.sub("", _id(value)).strip()


def _number(value: float, name: str) -> int | float:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number")
    return int(value) if value == int(value) else round(value, 3)


def _digits(value: str | None, maximum: int) -> int | None:
    if value is None or not value.isascii() or not value.isdigit():
        return None
    number = int(value)
    return number if number <= maximum else None


def _caller_line(name: str, number: str) -> str:
    if name and number and name != number:
        return f"{name} ({number})"
    return name or number or UNKNOWN_CALLER


def _call_ended_body(reason: str) -> str:
    if reason in CALL_ENDED_BODIES:
        return CALL_ENDED_BODIES[reason]
    return DECLINED if reason.startswith("rejected-") else ""


def _content(kind: PushKind, data: Mapping[str, str], deadline: float, now: float,
             settings: Settings, wire: _Wire) -> _Content:
    """The fields of `kind`; `wire` is the kind's wire form for this device (an alert-style call
    push gets a title and body)."""
    alert_call = kind in _ALERT_CALL_WIRE and wire.alert
    get = {k: _text(v) for k, v in data.items() if k in
           ("caller_name", "caller_number", "title", "body", "message", "sender", "reason")}
    content = _Content(numbers={"sent_at": _number(now, "now")})
    for key in _ID_FIELDS.get(kind, ()):
        if data.get(key):
            content.ids[key] = _id(data[key])
    show_caller = not settings.hide_caller
    name = get.get("caller_name", "") if show_caller else ""
    number = get.get("caller_number", "") if show_caller else ""
    if kind in (PushKind.INCOMING_CALL, PushKind.MISSED_CALL, PushKind.VOICEMAIL):
        for key, value in (("caller_name", name), ("caller_number", number)):
            if value:
                content.texts[key] = (value, MAX_TITLE_CHARS)
    if kind is PushKind.INCOMING_CALL:
        content.numbers["deadline"] = _number(deadline, "deadline")
        if alert_call:
            body = _caller_line(name, number) if show_caller else HIDDEN_CALLER
            content.texts["title"] = (INCOMING_CALL_TITLE, MAX_TITLE_CHARS)
            content.texts["body"] = (body, MAX_BODY_CHARS)
    elif kind is PushKind.CANCEL_INCOMING_CALL:
        if alert_call:
            content.texts["title"] = (CALL_ENDED_TITLE, MAX_TITLE_CHARS)
            content.texts["body"] = (_call_ended_body(get.get("reason", "")), MAX_BODY_CHARS)
    elif kind is PushKind.MISSED_CALL:
        body = _caller_line(name, number) if show_caller else HIDDEN_CALLER
        content.texts["title"] = (MISSED_CALL_TITLE, MAX_TITLE_CHARS)
        content.texts["body"] = (body, MAX_BODY_CHARS)
    elif kind is PushKind.VOICEMAIL:
        default = f"New voicemail from {_caller_line(name, number)}" if name or number else "New voicemail"
        content.texts["title"] = (get.get("title") or VOICEMAIL_TITLE, MAX_TITLE_CHARS)
        content.texts["body"] = (get.get("body") or default, MAX_BODY_CHARS)
    elif kind is PushKind.MESSAGE:
        sender = get.get("sender", "")
        if sender:
            content.texts["sender"] = (sender, MAX_TITLE_CHARS)
        content.texts["title"] = (sender or NEW_MESSAGE_TITLE, MAX_TITLE_CHARS)
        content.texts["body"] = (get.get("message") or get.get("body") or "", MAX_BODY_CHARS)
    elif kind is PushKind.CUSTOM:
        for key, value in data.items():
            clean_key = _id(key)
            if clean_key and not custom_key_reserved(clean_key):
                content.ids[clean_key] = _id(str(value))
        for key, cap in (("title", MAX_TITLE_CHARS), ("body", MAX_BODY_CHARS)):
            if get.get(key):
                content.texts[key] = (get[key], cap)
    content.texts = {k: v for k, v in content.texts.items() if v[0]}
    content.alert = wire.alert and any(k in content.texts for k in ("title", "body"))
    if content.alert:
        content.badge = _digits(data.get("badge"), 99_999)
    return content


# One encoder for every payload: json.dumps with non-default options builds a new one per call.
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _encode(obj: object) -> bytes:
    return _JSON.encode(obj).encode("utf-8")


# Random bytes for apns-id, drawn from the OS in blocks: uuid.uuid4() costs a system call and a
# UUID object per push. A block belongs to the process that drew it: a forked child (Kamailio
# forks its workers in C, without Python's fork hooks) draws its own, so no two processes hand
# out the same ids.
_ID_BLOCK = 16 * 256


class _RandomIds:
    def __init__(self) -> None:
        self.block = bytearray()
        self.pid = 0

    def next16(self) -> bytearray:
        pid = os.getpid()
        if pid != self.pid or not self.block:
            self.block = bytearray(os.urandom(_ID_BLOCK))
            self.pid = pid
        raw = self.block[-16:]
        del self.block[-16:]
        return raw


_random_ids = _RandomIds()


def apns_id() -> str:
    """A random (version 4) UUID string, as `str(uuid.uuid4())` gives."""
    raw = _random_ids.next16()
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _cost(ch: str) -> int:
    """Bytes one character takes inside a JSON string."""
    return len(_encode(ch)) - 2


def _fit(texts: Mapping[str, tuple[str, int]], render: Callable[[dict[str, str]], tuple[bytes, int]],
         limit: int) -> bytes:
    """Render with the texts cut (longest first, "…" appended) until the measured size fits."""
    if all(len(v) <= cap for v, cap in texts.values()):  # the usual push: fits as it is
        out, size = render({k: v for k, (v, _) in texts.items()})
        if size <= limit:
            return out
    originals = {k: v for k, (v, _) in texts.items()}
    kept = {k: min(len(v), cap) for k, (v, cap) in texts.items()}

    def current(key: str) -> str:
        value, n = originals[key], kept[key]
        if n == len(value):
            return value
        return value[:n] + ELLIPSIS if n else ""

    while True:
        values = {k: current(k) for k in originals}
        out, size = render(values)
        if size <= limit:
            return out
        candidates = [k for k in originals if kept[k] > 0]
        if not candidates:
            raise PayloadTooLarge(f"ids alone take {size} bytes, limit {limit}")
        key = max(candidates, key=lambda k: len(values[k].encode("utf-8")))
        need = size - limit + (len(ELLIPSIS.encode("utf-8")) if kept[key] == len(originals[key]) else 0)
        n = kept[key]
        while n > 0 and need > 0:
            n -= 1
            need -= _cost(originals[key][n])
        kept[key] = n


def _collapse_id(call_id: str) -> str:
    if len(call_id) <= APNS_COLLAPSE_ID_BYTES and _PRINTABLE_ASCII.fullmatch(call_id):
        return call_id
    return hashlib.sha256(call_id.encode("utf-8")).hexdigest()[:32]


def _ttl(kind: PushKind, data: Mapping[str, str], deadline: float, now: float, settings: Settings) -> int:
    """Seconds the provider may hold the push."""
    if kind is PushKind.INCOMING_CALL:
        seconds = max(0, math.ceil(_number(deadline, "deadline") - _number(now, "now")))
    elif kind is PushKind.CANCEL_INCOMING_CALL:
        seconds = settings.cancel_ttl
    elif kind is PushKind.REGISTRATION_REFRESH:
        seconds = settings.refresh_ttl
    elif kind is PushKind.CUSTOM:
        custom = _digits(data.get("ttl"), FCM_MAX_TTL_SECONDS)
        seconds = settings.message_ttl if custom is None else custom
    else:
        seconds = settings.message_ttl
    return min(max(0, seconds), FCM_MAX_TTL_SECONDS)


def build_apns(kind: PushKind, device: Device, data: Mapping[str, str], deadline: float, now: float,
               settings: Settings) -> ApnsRequest | None:
    """The APNs request for `kind`, or None when the device has no token for it or is not an
    APNs device. incomingCall goes to the VoIP token; a device without one but with an alert
    token gets it as a visible alert, and then its cancelIncomingCall as a silent alert (see the
    module doc); every other kind needs the alert token.

    Raises PayloadTooLarge when ids/custom fields cannot fit, ValueError on non-finite times.
    """
    params = device.params
    if params.provider is not Provider.APNS:
        return None
    voip = kind is PushKind.INCOMING_CALL and bool(params.voip_token)
    token = params.voip_token if voip else params.alert_token
    if not token:
        return None
    wire = _ALERT_CALL_WIRE[kind] if kind in _ALERT_CALL_WIRE and not params.voip_token else _WIRE[kind]
    content = _content(kind, data, deadline, now, settings, wire)
    if kind is PushKind.INCOMING_CALL:  # VoIP or alert: nothing should ring past the deadline
        expiration = int(deadline)
    else:
        expiration = int(now) + _ttl(kind, data, deadline, now, settings)

    def render(texts: dict[str, str]) -> tuple[bytes, int]:
        aps: dict[str, object] = {}
        if content.alert:
            aps["alert"] = {k: texts[k] for k in ("title", "body") if k in texts}
            if wire.sound:
                aps["sound"] = "default"
            if wire.interruption:
                aps["interruption-level"] = wire.interruption
            if content.badge is not None:
                aps["badge"] = content.badge
        elif not voip:
            aps["content-available"] = 1
        top = {k: v for k, v in texts.items() if k not in ("title", "body") or not content.alert}
        body = _encode({"aps": aps, "type": kind.value, **content.numbers, **content.ids, **top})
        return body, len(body)

    payload = _fit(content.texts, render, APNS_VOIP_PAYLOAD_BYTES if voip else APNS_PAYLOAD_BYTES)
    headers = {
        "apns-topic": params.app_id + ".voip" if voip else params.app_id,
        "apns-push-type": wire.push_type,
        "apns-priority": str(wire.apns_priority),
        "apns-expiration": str(expiration),
        "apns-id": apns_id(),
    }
    call_id = content.ids.get("call_id")
    if call_id and kind in _CALL_KINDS:
        headers["apns-collapse-id"] = _collapse_id(call_id)
    return ApnsRequest(token=token, headers=headers, payload=payload)


def is_alert_call(kind: PushKind, request: ApnsRequest | FcmMessage) -> bool:
    """True for an incomingCall sent as a visible APNs alert (a device without a VoIP token)."""
    return (kind is PushKind.INCOMING_CALL and isinstance(request, ApnsRequest)
            and request.headers.get("apns-push-type") == "alert")


def build_fcm(kind: PushKind, device: Device, data: Mapping[str, str], deadline: float, now: float,
              settings: Settings) -> FcmMessage | None:
    """The FCM v1 `messages:send` body for `kind`, or None when the device has no
    registration token or is not an FCM device. Always a data message (string values);
    custom pushes with a title/body also carry a `notification` block.

    Raises PayloadTooLarge when ids/custom fields cannot fit, ValueError on non-finite times.
    """
    params = device.params
    if params.provider is not Provider.FCM or not params.alert_token:
        return None
    token = params.alert_token
    wire = _WIRE[kind]
    content = _content(kind, data, deadline, now, settings, wire)
    android = {"priority": wire.fcm_priority, "ttl": f"{_ttl(kind, data, deadline, now, settings)}s"}
    numbers = {k: str(v) for k, v in content.numbers.items()}
    badge = {} if content.badge is None else {"badge": str(content.badge)}

    def render(texts: dict[str, str]) -> tuple[bytes, int]:
        message: dict[str, object] = {
            "token": token,
            "data": {"type": kind.value, **numbers, **content.ids, **badge, **texts},
        }
        if kind is PushKind.CUSTOM and content.alert:
            message["notification"] = {k: texts[k] for k in ("title", "body") if k in texts}
        size = len(_encode({k: v for k, v in message.items() if k in ("data", "notification")}))
        message["android"] = android
        return _encode({"message": message}), size

    return FcmMessage(token=token, body=_fit(content.texts, render, FCM_DATA_BYTES))
