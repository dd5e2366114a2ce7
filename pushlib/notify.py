"""Custom notifications (Wazo's `POST /1.0/mobile/notifications`): validation and the push job.

A notification is `{notification_type, user_uuid, title, body, extra}`. It becomes one `custom`
push job (`PushKind.CUSTOM`) on the same job stream the SIP side uses, so the dispatcher sends it
like any other push: on iOS an `alert` push to the remote token (topic `<bundle>`, priority 10), on
Android an FCM data message with a `notification` block. The payload carries `type` = `custom`,
`notification_type`, `title`, `body` and every `extra` field (APNs: top-level keys next to `aps`;
FCM: `message.data`).

Rules (pure functions, the HTTP layer maps `NotificationError` to 4xx):
- `notification_type`: 1-100 of `[a-z0-9_]`; the built-in kinds are reserved in any spelling
  (`incoming_call`, `incomingcall`, `missed_call`, `custom`...): a client cannot fake a call push;
- `title` 1-128 chars, `body` 1-250 chars;
- `extra`: at most 32 string fields, names 1-64 of `[A-Za-z0-9_.-]`, none of the names the payload
  builders reserve (`type`, `aps`, `title`, `ttl`, `google*`, ... and `notification_type`); the
  whole push must fit the providers' payload limits (extra values are never truncated);
- the user must have a device that can show it (`push_capable`).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from pushlib.models import Device, Provider, PushJob, PushKind, PushParams
from pushlib.payloads import PayloadTooLarge, build_apns, build_fcm, custom_key_reserved
from pushlib.settings import Settings

NOTIFICATION_TYPE_PATTERN = r"^[a-z0-9_]{1,100}$"
EXTRA_KEY_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
MAX_TITLE = 128
MAX_BODY = 250
MAX_EXTRA_FIELDS = 32
TYPE_FIELD = "notification_type"
#: notification types nobody may send through the API: our push kinds, however spelled
RESERVED_TYPES = frozenset(k.value.lower() for k in PushKind)

_EXTRA_KEY = re.compile(EXTRA_KEY_PATTERN)


class NotificationError(ValueError):
    """A notification we refuse; `code` names the rule for API clients."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Notification:
    notification_type: str
    title: str
    body: str
    extra: Mapping[str, str]


def check_notification(n: Notification, settings: Settings, now: float) -> Notification:
    """`n` if it may be sent (the shape is the HTTP schema's job; this checks the rules above)."""
    if n.notification_type.replace("_", "") in RESERVED_TYPES:
        raise NotificationError("reserved_notification_type",
                                f"notification_type {n.notification_type!r} is a built-in push kind")
    if len(n.extra) > MAX_EXTRA_FIELDS:
        raise NotificationError("extra_too_many", f"extra has more than {MAX_EXTRA_FIELDS} fields")
    for key in n.extra:
        if not _EXTRA_KEY.fullmatch(key):
            raise NotificationError("extra_bad_name", f"extra field name {key[:70]!r} is not 1-64 of [A-Za-z0-9_.-]")
        if key == TYPE_FIELD or custom_key_reserved(key):
            raise NotificationError("extra_reserved_name", f"extra field name {key!r} is reserved")
    data = job_data(n)
    try:
        for device in _probe_devices(now):
            build_apns(PushKind.CUSTOM, device, data, now + settings.message_ttl, now, settings)
            build_fcm(PushKind.CUSTOM, device, data, now + settings.message_ttl, now, settings)
    except PayloadTooLarge:
        raise NotificationError("payload_too_large", "extra does not fit a push payload (APNs 4 KiB, FCM 4 KB)"
                                ) from None
    return n


def _probe_devices(now: float) -> list[Device]:
    """Stand-in devices with long tokens, to measure the payloads a notification makes."""
    apns = PushParams(Provider.APNS, "probe.app", alert_token="0" * 200)
    fcm = PushParams(Provider.FCM, "probe-app", alert_token="f" * 256)
    return [Device("sip:probe@probe", "probe", p, registered_at=now, expires_at=now) for p in (apns, fcm)]


def job_data(n: Notification) -> dict[str, str]:
    return {**n.extra, TYPE_FIELD: n.notification_type, "title": n.title, "body": n.body}


def push_capable(device: Device, now: float) -> bool:
    """Whether a custom notification can reach the device: alive, not quarantined, and with a token
    for visible pushes (an iOS device with only a VoIP token gets call pushes only)."""
    return not device.dead and device.quarantined_until <= now and bool(device.params.alert_token)


def custom_job(n: Notification, aor: str, settings: Settings, now: float) -> PushJob:
    """The push job of a checked notification (deadline: now + `settings.message_ttl`)."""
    return PushJob(job_id=str(uuid.uuid4()), kind=PushKind.CUSTOM, aor=aor,
                   deadline=now + settings.message_ttl, data=job_data(n), created_at=now)
