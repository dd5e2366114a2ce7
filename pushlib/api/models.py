"""The HTTP API's request and response bodies (pydantic): validation and the OpenAPI schemas.

Every request body forbids unknown fields and takes strict types (a number is not a string);
what pydantic cannot express (reserved names, credential parsing) is checked by the pushlib
functions the routes call.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, StringConstraints

from pushlib.mwi import MAX_COUNT, MAX_URI_CHARS
from pushlib.notify import EXTRA_KEY_PATTERN, MAX_BODY, MAX_EXTRA_FIELDS, MAX_TITLE, NOTIFICATION_TYPE_PATTERN

PEM_MAX = 16_384
Pem = Annotated[StrictStr, StringConstraints(min_length=1, max_length=PEM_MAX)]
Name = Annotated[StrictStr, StringConstraints(min_length=1, max_length=200, pattern=r"^[!-~]+$")]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorOut(BaseModel):
    """Every 4xx/5xx answer: a machine-readable code, one sentence, and per-field details."""

    error: str = Field(description="machine-readable code, e.g. `unauthorized`, `not_found`, `invalid_body`")
    message: str
    details: list[dict[str, Any]] | None = None


class NotificationIn(_In):
    """Wazo's custom mobile notification."""

    notification_type: Annotated[StrictStr, StringConstraints(pattern=NOTIFICATION_TYPE_PATTERN)] = Field(
        description="1-100 of [a-z0-9_]; the built-in push kinds (incoming_call, missed_call...) are reserved")
    user_uuid: Annotated[StrictStr, StringConstraints(min_length=1, max_length=300)] = Field(
        description="a user uuid mapped with PUT /1.0/users/{user_uuid}, or an address of record user@domain")
    title: Annotated[StrictStr, StringConstraints(min_length=1, max_length=MAX_TITLE)]
    body: Annotated[StrictStr, StringConstraints(min_length=1, max_length=MAX_BODY)]
    extra: dict[Annotated[StrictStr, StringConstraints(pattern=EXTRA_KEY_PATTERN)],
                Annotated[StrictStr, StringConstraints(max_length=2048)]] = Field(
        default_factory=dict, max_length=MAX_EXTRA_FIELDS,
        description="string fields added to the payload (FCM data / APNs top-level keys)")


class UserIn(_In):
    aor: Annotated[StrictStr, StringConstraints(min_length=3, max_length=300)] = Field(
        description="the address of record the uuid names: user@domain or sip:user@domain")


class UserOut(BaseModel):
    user_uuid: str
    aor: str


class DeviceOut(BaseModel):
    device_id: str
    provider: str
    app_id: str
    sandbox: bool
    tokens: list[str] = Field(description="which tokens it has: voip, alert (never the tokens themselves)")
    user_agent: str
    registered_at: float
    expires_at: float
    quarantined_until: float
    dead: bool
    push_capable: bool = Field(description="a custom notification can reach it")


class DevicesOut(BaseModel):
    aor: str
    devices: list[DeviceOut]


class RemovedOut(BaseModel):
    removed: list[str]


class SubscriberIn(_In):
    password: Annotated[StrictStr, StringConstraints(min_length=1, max_length=256)]
    realm: Annotated[StrictStr, StringConstraints(min_length=1, max_length=253, pattern=r"^[!-~]+$")] | None = None


class SubscriberOut(BaseModel):
    aor: str
    realm: str | None
    voicemail_uri: str | None = Field(default=None, description="the user's own voicemail URI, if set")


class VoicemailUriIn(_In):
    uri: Annotated[StrictStr, StringConstraints(min_length=5, max_length=MAX_URI_CHARS)] = Field(
        description="sip: or sips: URI where the user's unanswered push calls go (before FALLBACK_URI); "
                    "{user} and {domain} are filled in")


Count = Annotated[StrictInt, Field(ge=0, le=MAX_COUNT)]


class VoicemailIn(_In):
    """A voicemail system's message counts for the user (RFC 3842 Voice-Message new/old)."""

    new_messages: Count
    old_messages: Count = 0
    caller_name: Annotated[StrictStr, StringConstraints(max_length=128)] | None = None
    caller_number: Annotated[StrictStr, StringConstraints(max_length=64)] | None = None


class VoicemailOut(BaseModel):
    aor: str
    new_messages: int
    old_messages: int
    previous_new: int | None = Field(description="the new count kept from the previous summary (null: none)")
    pushed: bool = Field(description="a voicemailReceived push was queued (only a rise in new messages pushes)")


class ApnsTokenIn(_In):
    key_pem: Pem = Field(description="the .p8 token key (EC P-256 private key, PEM)")
    key_id: Annotated[StrictStr, StringConstraints(pattern=r"^[A-Z0-9]{1,32}$")]
    team_id: Annotated[StrictStr, StringConstraints(pattern=r"^[A-Z0-9]{1,32}$")]


class ApnsCertificateIn(_In):
    cert_pem: Pem
    key_pem: Pem


class AppIn(_In):
    """An app's credentials (exactly one kind) and switches. Credentials are write-only."""

    apns_token: ApnsTokenIn | None = None
    apns_certificate: ApnsCertificateIn | None = None
    fcm_service_account: dict[str, Any] | None = Field(
        default=None, description="the service-account JSON object; its project_id must be the app id")
    sandbox: StrictBool = Field(default=False, description="APNs development environment")
    enabled: StrictBool = True
    host: Annotated[StrictStr, StringConstraints(pattern=r"^[A-Za-z0-9.\-\[\]:]{1,300}:[0-9]{1,5}$")] | None = Field(
        default=None, description="host:port instead of Apple's or Google's (the sandbox)")
    ca_pem: Pem | None = Field(default=None, description="the only CA trusted for `host`")
    aliases: list[Name] | None = Field(
        default=None, max_length=50, description="FCM: other names devices give the app; omitted: kept as stored")


class AppPatchIn(_In):
    enabled: StrictBool | None = None
    aliases: list[Name] | None = Field(default=None, max_length=50)


class CredentialsOut(BaseModel):
    kind: str = Field(description="apns-token, apns-certificate, fcm-service-account or none")
    fingerprint: str | None = Field(default=None, description="sha256 of the public key or certificate (DER)")
    expires_at: str | None = None
    key_id: str | None = None
    team_id: str | None = None
    subject: str | None = None
    not_before: str | None = None
    client_email: str | None = None
    private_key_id: str | None = None
    unreadable: bool | None = None


class AppOut(BaseModel):
    provider: str
    app_id: str
    enabled: bool
    sandbox: bool
    host: str | None
    custom_ca: bool
    aliases: list[str]
    credentials: CredentialsOut
    tenant: str | None = None
    status: dict[str, Any] | None = None


class AppsOut(BaseModel):
    apps: list[AppOut]


class CheckOut(BaseModel):
    ok: bool
    host: str
    status: int
    reason: str
    detail: str


class UaMappingIn(_In):
    regex: Annotated[StrictStr, StringConstraints(min_length=1, max_length=500)]
    app_param: Name = "app-id"
    type_param: Name = "pn-type"
    token_param: Name = "pn-tok"


class UaMappingOut(BaseModel):
    name: str
    regex: str
    app_param: str
    type_param: str
    token_param: str


class UaMappingsOut(BaseModel):
    mappings: list[UaMappingOut]


class HealthOut(BaseModel):
    status: str = Field(description="ok, degraded (no live dispatcher) or down (Redis unreachable)")
    redis: bool
    dispatcher_alive: bool
    reading_clients: int = Field(description="connections that read the job stream in the last 5 s")
    consumers: int
    active_consumers: int
    stream_length: int | None
    pending: int | None
    lag: int | None
