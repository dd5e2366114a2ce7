"""Shared value types: providers, push kinds, devices, apps, jobs, parked calls and outcomes.

These are plain dataclasses with no I/O so every module (store, parser, clients,
dispatcher, KEMI router) speaks the same language. Fields that hold a push token, a credential or
something that contains one (a push binding's Contact URI carries `pn-prid`, an FCM body carries
the token, APNs headers may carry the bearer JWT) are left out of the reprs (`field(repr=False)`),
so a `%r` in a log line or a traceback's locals never leaks them; equality is unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class Provider(StrEnum):
    APNS = "apns"
    FCM = "fcm"


class PushKind(StrEnum):
    INCOMING_CALL = "incomingCall"
    CANCEL_INCOMING_CALL = "cancelIncomingCall"
    MISSED_CALL = "missedCall"
    VOICEMAIL = "voicemailReceived"
    MESSAGE = "messageReceived"
    REGISTRATION_REFRESH = "registrationRefresh"
    CUSTOM = "custom"


@dataclass(frozen=True)
class PushParams:
    """What a REGISTER's Contact says about how to reach the device by push.

    `app_id` is the APNs bundle id (without a `.voip` suffix) or the FCM project id.
    `alert_token` is the APNs remote-notification token or the FCM registration token;
    `voip_token` is the APNs PushKit token. At least one token is set.
    """

    provider: Provider
    app_id: str
    voip_token: str | None = field(default=None, repr=False)
    alert_token: str | None = field(default=None, repr=False)
    team_id: str | None = None
    sandbox: bool = False


@dataclass(frozen=True)
class Device:
    """One push-capable device of a user (an AOR may have several)."""

    aor: str
    device_id: str
    params: PushParams
    contact: str = field(default="", repr=False)  # a push binding's URI: its pn-prid is the token
    user_agent: str = ""
    registered_at: float = 0.0
    expires_at: float = 0.0
    quarantined_until: float = 0.0
    # Every token of the device died at its provider (APNs 410, FCM UNREGISTERED): a tombstone,
    # never pushed, kept until it expires or the device REGISTERs again (which replaces it).
    dead: bool = False


@dataclass(frozen=True)
class AppCredentials:
    """Credentials and switches of one app, keyed by (provider, app_id).

    APNs uses either a token key (`apns_key_pem` + `apns_key_id` + `apns_team_id`)
    or a client certificate (`apns_cert_pem` + `apns_cert_key_pem`). FCM uses a
    service-account JSON (`fcm_service_account`), whose project id the v1 URL needs.
    `custom_host` ("host:port") replaces Apple's or Google's host; `ca_pem`, when set, is the only
    CA trusted for that custom host (the sandbox providers); it never applies to the real hosts.
    `aliases` are other names devices may give the app (an FCM device names it by whatever its app
    puts in `pn-param`: often the sender id or the package name, not the project id): a device
    registered under an alias is pushed with these credentials (FCM: to `app_id`'s project).
    """

    provider: Provider
    app_id: str
    enabled: bool = True
    sandbox: bool = False
    apns_key_pem: str | None = field(default=None, repr=False)
    apns_key_id: str | None = None
    apns_team_id: str | None = None
    apns_cert_pem: str | None = field(default=None, repr=False)
    apns_cert_key_pem: str | None = field(default=None, repr=False)
    fcm_service_account: str | None = field(default=None, repr=False)
    custom_host: str | None = None
    ca_pem: str | None = None
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class PushJob:
    """A unit of work for the dispatcher: one push kind to some devices of one AOR.

    `device_ids` empty means every device of the AOR. `deadline` is epoch seconds:
    past it the job is dropped, never delivered late. `data` holds the string fields
    the payload builders use (call_id, caller_name, caller_number, title, body, ...).
    """

    job_id: str
    kind: PushKind
    aor: str
    deadline: float
    device_ids: tuple[str, ...] = ()
    data: Mapping[str, str] = field(default_factory=dict)
    created_at: float = 0.0


@dataclass(frozen=True)
class ParkedCall:
    """An INVITE parked while its callee's devices are pushed, one per (AOR, call key).

    `deadline` is epoch seconds (the end of the wait window); `pushed` are the devices pushed for
    the call, `woken` those of them that re-registered since (each joins the call once).
    """

    aor: str
    key: str
    call_id: str
    cseq: str
    caller_name: str
    caller_number: str
    deadline: float
    pushed: tuple[str, ...] = ()
    woken: tuple[str, ...] = ()


class Outcome(StrEnum):
    DELIVERED = "delivered"
    TOKEN_DEAD = "token_dead"
    DEVICE_SUSPECT = "device_suspect"
    RETRYABLE = "retryable"
    CONFIG_ERROR = "config_error"
    REJECTED = "rejected"  # the request itself was wrong (e.g. payload too large): no retry, device kept


@dataclass(frozen=True)
class PushResult:
    """What a provider said about one push."""

    outcome: Outcome
    status: int = 0
    reason: str = ""
    retry_after: float | None = None
    provider_id: str | None = None


@dataclass(frozen=True)
class UaMapping:
    """Kazoo-style legacy push mapping: a User-Agent regex and the Contact params that hold
    the app id (Token-App), the token type (Token-Type) and the token (Token-ID)."""

    name: str
    user_agent_regex: str
    app_param: str = "app-id"
    type_param: str = "pn-type"
    token_param: str = "pn-tok"


@dataclass(frozen=True)
class ApnsRequest:
    """One APNs push ready to send: `POST /3/device/<token>` with these headers and body."""

    token: str = field(repr=False)
    headers: Mapping[str, str] = field(repr=False)  # may hold `authorization: bearer <JWT>`
    payload: bytes


@dataclass(frozen=True)
class FcmMessage:
    """One FCM v1 push ready to send: the JSON body of `messages:send` (it holds the token)."""

    token: str = field(repr=False)
    body: bytes = field(repr=False)  # holds the token
