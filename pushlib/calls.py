"""Pure decisions of the Kamailio push role: REGISTER, INVITE, and the end of parked calls.

The KEMI router (kemi/) reads the SIP message and usrloc through KSR, calls the
functions here to decide what to do, and acts through KSR. Nothing in this module
does I/O, so every decision is unit-tested without Kamailio (tests/test_calls.py).

Vocabulary:
- a *binding* is one usrloc contact of an AOR (`$ulc`), as the registrar saved it;
- a *device* is a push-capable device from the Redis store (pushlib.models.Device);
- an *awake* device registered less than `awake_window` seconds ago and is called at once;
- a *sleeping* device is pushed (`incomingCall`) and the INVITE is parked until it re-REGISTERs.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TypeAlias
from urllib.parse import quote, unquote

from pushlib import params, schema
from pushlib.access import Limits, app_refusal
from pushlib.aor import Aor, aor_parts
from pushlib.aor import aor_of as aor_of
from pushlib.models import Device, ParkedCall, Provider, PushJob, PushKind, UaMapping
from pushlib.params import sip_reason as sip_reason
from pushlib.settings import Settings

#: SIP finals that end a call for every device (busy here = busy everywhere, a decline is a decline).
END_ALL_CODES = frozenset({486, 600, 603})
#: Names of Contact URI parameters that mark a binding as push-capable (RFC 8599 and legacy).
PUSH_URI_PARAMS = frozenset({"pn-provider", "pn-prid", "pn-param", "pn-tok", "pn-type", "app-id"})
#: Providers announced in Feature-Caps for plain (non-push) registrations.
SERVED_PROVIDERS: tuple[str, ...] = (Provider.APNS.value, Provider.FCM.value)

#: Longest Contact URI a REGISTER may bind (registrar's `contact_max_size`, default 512).
MAX_CONTACT_URI = 512
PNS_NOT_SUPPORTED = "Push Notification Service Not Supported"  # RFC 8599's reason phrase for 555


@dataclass(frozen=True)
class ProxyConfig:
    """What the Kamailio config tells the Python router (from `#!define`s / `-A` options)."""

    pusher: bool = True
    auth: bool = False
    awake_window: float = 10.0
    realm: str = ""
    #: where a parked call goes when its wait window ends unanswered ("" = answer 480); one per
    #: deployment for now (a per-user voicemail URI would come from the store)
    fallback_uri: str = ""
    #: ms a directly rung push device has to send a provisional reply before it is pushed
    #: instead (0 = never: only a 408/503 from it does); see `device_to_push_on_failure`
    push_on_silence_ms: int = 3000
    settings: Settings = field(default_factory=Settings)


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def proxy_config(
    get_def: Callable[[str], str | None], env: Mapping[str, str] | None = None
) -> ProxyConfig:
    """Build the router's configuration from Kamailio defines (`KSR.kx.get_def`) over PUSHLIB_* env.

    A define that is present but has no value (e.g. `#!define WITH_AUTH`) counts as on.
    Recognised: WITH_PUSHER, WITH_AUTH, REDIS_URL, WAIT_WINDOW, AWAKE_WINDOW, AUTH_REALM,
    HIDE_CALLER, FALLBACK_URI, PUSH_ON_SILENCE, CALL_ALERT_REPEAT and REREGISTER_PUSH_BEFORE (also for
    the in-process dispatcher).
    (WITH_EXTERNAL_DISPATCHER is the cfg's alone: it decides whether
    Kamailio starts dispatcher processes.)
    """

    def flag(name: str) -> bool:
        raw = get_def(name)
        return raw is not None and _unquote(raw).lower() not in ("0", "no", "off", "false")

    def text(name: str) -> str | None:
        raw = get_def(name)
        return None if raw is None else _unquote(raw)

    settings = Settings.from_env(env)
    overrides: dict[str, object] = {}
    if (url := text("REDIS_URL")) is not None:
        overrides["redis_url"] = url
    if (wait := text("WAIT_WINDOW")) is not None:
        overrides["wait_window"] = schema.finite_float(wait, "WAIT_WINDOW")
    if (repeat := text("CALL_ALERT_REPEAT")) is not None:
        overrides["call_alert_repeat"] = schema.finite_float(repeat, "CALL_ALERT_REPEAT")
    if (before := text("REREGISTER_PUSH_BEFORE")) is not None:
        overrides["reregister_before"] = max(0.0, schema.finite_float(before, "REREGISTER_PUSH_BEFORE"))
    if get_def("HIDE_CALLER") is not None:
        overrides["hide_caller"] = flag("HIDE_CALLER")
    settings = replace(settings, **overrides)  # type: ignore[arg-type]
    awake = text("AWAKE_WINDOW")
    silence = text("PUSH_ON_SILENCE")
    return ProxyConfig(
        pusher=flag("WITH_PUSHER"),
        auth=flag("WITH_AUTH"),
        awake_window=10.0 if awake is None else schema.finite_float(awake, "AWAKE_WINDOW"),
        realm=text("AUTH_REALM") or "",
        fallback_uri=text("FALLBACK_URI") or "",
        push_on_silence_ms=3000 if silence is None else max(0, int(schema.finite_float(silence, "PUSH_ON_SILENCE"))),
        settings=settings,
    )


# --------------------------------------------------------------------------- REGISTER


def feature_caps(provider: str | None) -> str:
    """The RFC 8599 Feature-Caps value for a REGISTER 2xx.

    A push REGISTER gets the PNS it used; a plain REGISTER learns every PNS we serve.
    """
    pns = provider if provider else ",".join(SERVED_PROVIDERS)
    return f'*;+sip.pns="{pns}"'


def register_expires(contact_expires: str | None, header_expires: str | None, default: int = 3600,
                     minimum: int = 0, maximum: int = 3600) -> int:
    """Effective expiry of the first binding of a REGISTER, clamped like the registrar clamps the
    binding: 0 stays 0 (unregister), anything else lands in [minimum, maximum].

    The contact's `expires` param beats the Expires header; only ASCII digits count (no sign, no
    Unicode digits, no `1_0`): a param that is not digits means `default`, as for the registrar."""
    value = default
    for raw in (contact_expires, header_expires):
        if raw is None:
            continue
        text = raw.strip(" \t")
        if len(text) <= 10 and text.isascii() and text.isdigit():
            value = int(text)
        break
    if value == 0:
        return 0
    return max(minimum, min(maximum, value)) if maximum else max(minimum, value)


def contact_uri(contact: str) -> str:
    """The bare URI of a Contact header value (`"Bob" <sip:b@h;x=1>;expires=60` -> `sip:b@h;x=1`),
    or "" when the value is malformed (params.parse_name_addr says why)."""
    try:
        return params.parse_name_addr(contact).uri
    except params.MalformedPushParams:
        return ""


def uri_param_names(uri: str) -> dict[str, str]:
    """A URI's parameters by lower-case name ({} when they cannot be decoded)."""
    try:
        return params.NameAddr("", uri).uri_params()
    except params.MalformedPushParams:
        return {}


def reached_over_stream(uri: str) -> bool:
    """Whether a binding URI is reached over a connection (TCP, TLS, WebSocket, or `sips:`), so
    that the connection its REGISTER came over is the way to it: a binding whose Contact says
    UDP is reached over UDP, whatever its REGISTER came over."""
    transport = uri_param_names(uri).get("transport", "").lower()
    return transport in ("tcp", "tls", "ws", "wss") or uri[:5].lower() == "sips:"


def looks_push(uri: str) -> bool:
    """True when a bare binding URI carries push parameters (without validating them); a URI
    whose parameters cannot be decoded counts as plain."""
    try:
        names = params.NameAddr("", uri).uri_params()
    except params.MalformedPushParams:
        return False
    return not PUSH_URI_PARAMS.isdisjoint(names)


def binding_device_id(binding: Binding, mappings: Sequence[UaMapping]) -> str | None:
    """The push device a usrloc binding belongs to (as `plan_register` named it), None for a
    plain binding or one whose push parameters no longer parse."""
    try:
        push = params.parse_push_params(params.contact_uri_params(f"<{binding.uri}>"), binding.user_agent,
                                        mappings)
    except params.PushParamError:
        return None
    return None if push is None else params.device_id_for(push, binding.instance or None)


def stale_bindings(
    bindings: Iterable[Binding], device_id: str, new_uri: str, identify: Callable[[Binding], str | None],
    evicted: Iterable[str] = (),
) -> list[Binding]:
    """Bindings to remove after saving `device_id` at `new_uri`: the device's older ones (another
    port, connection or Call-ID), then those of the devices the store `evicted` for it."""
    gone = set(evicted) - {device_id}
    stale: list[Binding] = []
    for b in bindings:
        if b.uri == new_uri and not gone:
            continue  # the binding just saved (nothing else can make it stale): not parsed again
        owner = identify(b)
        if (owner == device_id and b.uri != new_uri) or (owner is not None and owner in gone):
            stale.append(b)
    return stale


@dataclass(frozen=True)
class RegisterReply:
    """Answer `code reason` now, save nothing; log `register-rejected` with `log_fields`."""

    code: int
    reason: str
    log_fields: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class SaveBinding:
    """Let the registrar save (or, without a Contact, list) the bindings and reply, with a
    Feature-Caps header when `feature_caps` is set. `legacy_ua` is the User-Agent (cut to 80
    chars) of a Contact with legacy push parameters no UA mapping claims: worth a notice, once
    per AOR, since the device registers but will never be pushed."""

    feature_caps: str | None = None
    legacy_ua: str | None = None


@dataclass(frozen=True)
class UnregisterAll:
    """`Contact: *`: every push device of the AOR leaves the store, then the registrar removes
    every binding and replies."""


@dataclass(frozen=True)
class RemoveDevice:
    """A push binding's expires=0: the device leaves the store, then the registrar removes the
    binding and replies."""

    device_id: str


@dataclass(frozen=True)
class SaveDevice:
    """A push binding: the registrar saves it (reply held back), the calls parked for the device
    resume, the device is stored, and only then the REGISTER is answered with `feature_caps`."""

    device: Device
    feature_caps: str


RegisterPlan: TypeAlias = RegisterReply | SaveBinding | UnregisterAll | RemoveDevice | SaveDevice


def _rejected(code: int, reason: str, log_reason: str, *fields: tuple[str, str]) -> RegisterReply:
    return RegisterReply(code, reason, (*fields, ("reason", log_reason)))


def plan_register(
    aor: Aor,
    contact: str,
    expires_header: str | None,
    user_agent: str,
    mappings: Sequence[UaMapping],
    app_enabled: Callable[[str, str], bool | None],
    limits: Limits,
    now: float,
) -> RegisterPlan:
    """What a REGISTER does in the push role, from its first Contact (`contact`: the Contact
    header value as sent), Expires header and User-Agent.

    `app_enabled(provider, app_id)` says whether we push for that app (True), it is disabled
    (False) or not configured (None). It is asked for push REGISTERs only; a caller that cannot
    tell (Redis down) should answer True: storing the device then fails with its own 503.
    """
    value = contact.strip()
    if not value:
        return SaveBinding()  # a query: the registrar lists the bindings
    if value == "*":
        return UnregisterAll()
    try:
        addr = params.parse_name_addr(value)
        if len(addr.uri) > MAX_CONTACT_URI:  # (the registrar would answer a bare "Bad Request")
            return _rejected(400, "Contact URI Too Long", "contact-uri-too-long")
        uri_params = addr.uri_params()
        header_params = addr.header_params()
        # Push params belong in the URI (RFC 8599), but Kazoo's own sample puts its legacy ones
        # after the `>`: read both, the URI's winning
        push = params.parse_push_params({**header_params, **uri_params}, user_agent, mappings)
    except params.UnsupportedProvider as exc:
        return _rejected(555, PNS_NOT_SUPPORTED, str(exc))
    except params.PushParamError as exc:
        return _rejected(400, str(exc), str(exc))
    if push is None:
        legacy = params.has_legacy_params({**header_params, **uri_params}, mappings)
        return SaveBinding(feature_caps(None), user_agent[:80] if legacy else None)
    enabled = app_enabled(push.provider.value, push.app_id)
    refusal = app_refusal(enabled is not None, enabled is True)
    if refusal:
        return _rejected(555, f"{PNS_NOT_SUPPORTED} ({refusal})", refusal, ("app", push.app_id))
    device_id = params.device_id_for(push, header_params.get("+sip.instance"))
    expires = register_expires(header_params.get("expires"), expires_header,
                               minimum=limits.min_expires, maximum=limits.max_expires)
    if expires == 0:
        return RemoveDevice(device_id)
    device = Device(aor=aor, device_id=device_id, params=push, contact=addr.uri, user_agent=user_agent,
                    registered_at=now, expires_at=now + expires)
    # RFC 8599: the reply names the PNS the client named (apns.dev stays apns.dev)
    pns = uri_params.get("pn-provider", "").strip().lower() or push.provider.value
    return SaveDevice(device, feature_caps(pns))


# --------------------------------------------------------------------------- INVITE


@dataclass(frozen=True)
class Binding:
    """A usrloc contact as seen through `$ulc(...)`."""

    uri: str
    received: str = ""
    instance: str = ""
    modified: float = 0.0
    ruid: str = ""
    user_agent: str = ""
    #: Kamailio's id of the TCP/TLS connection the binding's REGISTER came over (0: UDP)
    conid: int = 0
    #: WITH_CLUSTER: the Path of a binding another node took ("<sip:node;lr>"): reached through it
    path: str = ""

    @property
    def destination(self) -> str:
        """Where a request for this binding is sent ("": to its URI): through the node whose
        Path it has (that node knows the device's flow), else to the address its REGISTER came
        from when that differs from its Contact (NAT)."""
        return first_route_uri(self.path) if self.path else self.received


def first_route_uri(value: str) -> str:
    """The first URI of a Path or Route header value ("<sip:a;lr>,<sip:b;lr>" -> "sip:a;lr")."""
    first = value.split(",", 1)[0].strip()
    return first[1:first.index(">")] if first.startswith("<") and ">" in first else first


class Verdict(Enum):
    RING = "ring"  # some bindings are called now; nothing to park
    PARK = "park"  # at least one device is pushed: park (and ring the awake ones in parallel)
    NOT_FOUND = "not_found"  # no binding and no device: 404
    UNAVAILABLE = "unavailable"  # the user exists but nobody can be reached now: 480


@dataclass(frozen=True)
class InvitePlan:
    verdict: Verdict
    ring: tuple[Binding, ...] = ()
    push: tuple[Device, ...] = ()
    #: bindings of dead devices (every token died at its provider): removed, never called (their
    #: contact reaches nobody, or someone else by now)
    drop: tuple[Binding, ...] = ()


def plan_invite(
    bindings: Sequence[Binding],
    devices: Sequence[Device] | None,
    now: float,
    awake_window: float,
    disconnected: frozenset[str] = frozenset(),
) -> InvitePlan:
    """Decide who rings now and who gets pushed.

    `disconnected` names push bindings whose TCP/TLS connection is gone: their devices are
    pushed even inside the awake window.
    `devices` is None when the store is unreachable: then only bindings without push
    parameters (or push bindings refreshed within the awake window) are called, and a
    user who could only be pushed is unavailable at once.
    """
    ring: list[Binding] = []
    push: list[Device] = []
    # newest first: of two records of one phone (same token, say before and after it began to
    # send +sip.instance), the fresher one is kept
    fresh = sorted(devices or (), key=lambda d: d.registered_at, reverse=True)
    by_contact: dict[str, Device] = {}
    for d in fresh:
        by_contact.setdefault(d.contact, d)
    matched: set[str] = set()
    matched_phones: set[tuple[str, str, str]] = set()  # push identities of devices with a binding
    rung: set[tuple[str, str]] = set()
    pushed: set[tuple[str, str, str]] = set()

    def ring_once(b: Binding) -> None:
        # two bindings with one contact (a phone re-registered from a new Call-ID) are one phone
        if (b.uri, b.received) not in rung:
            rung.add((b.uri, b.received))
            ring.append(b)

    def push_once(d: Device) -> None:
        # one push per phone: the same token (per app) is the same device, whatever its id
        token = _push_identity(d)
        if token not in pushed and d.device_id not in {p.device_id for p in push}:
            pushed.add(token)
            push.append(d)

    drop: list[Binding] = []
    for b in bindings:
        device = by_contact.get(b.uri)
        if device is not None and device.dead:
            matched.add(device.device_id)
            drop.append(b)
            continue
        if device is not None:
            matched.add(device.device_id)
            matched_phones.add(_push_identity(device))
            # a binding whose TCP/TLS connection is gone (`disconnected`: binding URIs) is asleep
            # whatever the time of its REGISTER
            if awake_window > 0 and now - device.registered_at < awake_window and b.uri not in disconnected:
                ring_once(b)
            elif device.quarantined_until <= now:
                push_once(device)
            continue
        if devices is None and looks_push(b.uri):
            if awake_window > 0 and b.modified and now - b.modified < awake_window:
                ring_once(b)
            continue
        ring_once(b)
    for d in fresh:
        if d.dead or d.device_id in matched or _push_identity(d) in matched_phones or d.quarantined_until > now:
            continue
        if d.expires_at and d.expires_at <= now:
            continue
        push_once(d)
    if push:
        return InvitePlan(Verdict.PARK, tuple(ring), tuple(push), tuple(drop))
    if ring:
        return InvitePlan(Verdict.RING, tuple(ring), drop=tuple(drop))
    if not bindings and not devices and devices is not None:
        return InvitePlan(Verdict.NOT_FOUND)
    return InvitePlan(Verdict.UNAVAILABLE, drop=tuple(drop))


#: final replies of a directly rung push device that mean "asleep", not "no": 408 (tm's own
#: timeout when it stayed silent, or the phone's) and 503 (an app that cannot take the call now)
PUSH_ON_FAILURE_CODES = frozenset({408, 503})


def rings_push_device(ring: Sequence[Binding], devices: Sequence[Device]) -> bool:
    """Whether some binding rung directly belongs to a push device (a phone that may have been
    suspended since its REGISTER): such a call is watched for silence (PUSH_ON_SILENCE)."""
    contacts = {d.contact for d in devices}
    return any(b.uri in contacts for b in ring)


def device_to_push_on_failure(
    branch_uri: str, code: int, devices: Sequence[Device], now: float
) -> Device | None:
    """The push device to wake for a directly rung branch (`branch_uri`) that failed with `code`,
    or None. A phone the OS suspended right after its REGISTER is rung as awake; it answers
    nothing (tm ends its branch with 408 after PUSH_ON_SILENCE ms) or 503: it is pushed and the
    call waits for it, like a sleeping phone. Other codes (busy, decline, not found) are the
    phone's answer and stand."""
    if code not in PUSH_ON_FAILURE_CODES:
        return None
    for d in sorted(devices, key=lambda d: d.registered_at, reverse=True):
        if d.contact != branch_uri or d.quarantined_until > now:
            continue
        if d.expires_at and d.expires_at <= now:
            continue
        return d
    return None


def _push_identity(device: Device) -> tuple[str, str, str]:
    p = device.params
    return (p.provider.value, p.app_id, p.voip_token or p.alert_token or device.device_id)


class FailureAction(Enum):
    RELAY = "relay"  # let tm send the best final reply upstream
    END_ALL = "end_all"  # busy/decline: end the call for everyone, cancel pushes
    KEEP_WAITING = "keep_waiting"  # pushed devices may still wake: keep the transaction


_PHRASES = {408: "Request Timeout", 480: "Temporarily Unavailable", 486: "Busy Here", 487: "Request Terminated",
            500: "Server Internal Error", 503: "Service Unavailable", 600: "Busy Everywhere", 603: "Decline"}


def reason_phrase(code: int) -> str:
    return _PHRASES.get(code, "Temporarily Unavailable")


def end_reason(code: int) -> str:
    """Why a parked call ended (cancel pushes and log lines carry it), from the final reply that
    ends it: 2xx `answered`, 487 `canceled` (the caller hung up), 0 or 480 `timeout` (the wait
    window ran out), any other `rejected-<code>` (busy, decline)."""
    if 200 <= code < 300:
        return "answered"
    if code == 487:
        return "canceled"
    if code in (0, 480):
        return "timeout"
    return f"rejected-{code}"


def failure_action(code: int, parked: bool, canceled: bool) -> FailureAction:
    """What to do when every current branch of an INVITE has failed with `code`."""
    if canceled:
        return FailureAction.RELAY
    if code in END_ALL_CODES:
        return FailureAction.END_ALL
    if parked:
        return FailureAction.KEEP_WAITING
    return FailureAction.RELAY


class FailureRouteAction(Enum):
    """What tm's failure route does for an INVITE whose branches have all ended."""

    RELAY = "relay"  # not (or no longer) a parked call: tm sends the best reply upstream
    END_ALL = "end_all"  # busy/decline reached the failure route: end the parked call
    WINDOW_END = "window_end"  # the parking branch timed out: the wait window is over
    FALLBACK = "fallback"  # the window ended while branches rang; they were canceled for the fallback


def failure_route_action(code: int, parked: bool, canceled: bool, fallback_due: bool) -> FailureRouteAction:
    """Decide the failure route of a (possibly) parked INVITE.

    The parking branch never answers and its fr timer is the wait window, so when the failure
    route runs for a call that is still parked every branch has ended, the parking one by its
    timeout: the window is over. `fallback_due` marks a call whose window ended while a device
    still rang (the timer canceled its branches to send the call to the fallback URI).
    """
    if canceled:
        return FailureRouteAction.RELAY
    if parked:
        return FailureRouteAction.END_ALL if code in END_ALL_CODES else FailureRouteAction.WINDOW_END
    if fallback_due:
        return FailureRouteAction.FALLBACK
    return FailureRouteAction.RELAY


def host_call_flags(raw: str | None) -> tuple[int, ...]:
    """The message flags a role-mode host asks the role to set on the calls it relays
    (`PUSHER_HOST_CALL_FLAGS`, e.g. "1,2" for the stock config's FLT_ACC and FLT_ACCMISSED).
    Numbers 0-31 separated by commas or blanks; raises ValueError naming what is wrong."""
    flags: list[int] = []
    for part in (raw or "").replace(",", " ").split():
        if not (part.isascii() and part.isdigit() and int(part) <= 31):
            raise ValueError(f"PUSHER_HOST_CALL_FLAGS: {part!r} is not a flag number (0-31)")
        if int(part) not in flags:
            flags.append(int(part))
    return tuple(flags)


def fallback_target(template: str, aor: str) -> str:
    """The fallback R-URI for a call to `aor` ("" = none).

    `{user}` and `{domain}` in the template are replaced by the callee's, so one voicemail
    server can pick the mailbox from the R-URI (`sip:{user}@vm.example.com`); the router
    also adds a Diversion header (RFC 5806, reason=no-answer) for servers that read that.
    """
    if not template:
        return ""
    user, domain = aor_parts(aor)
    return template.replace("{user}", user).replace("{domain}", domain)


def diversion_header(aor: str) -> str:
    """The Diversion header value for a call sent to the fallback because nobody answered."""
    return f"<{aor}>;reason=no-answer;counter=1"


# --------------------------------------------------------------------------- push jobs

def caller_identity(from_header: str, from_user: str) -> tuple[str, str]:
    """(caller name, caller number) from a From header value and its URI user; the user stands in
    for a missing (or unparsable) display name."""
    try:
        name = params.parse_name_addr(from_header).display_name.strip()
    except params.MalformedPushParams:
        name = ""
    # bytes that were not UTF-8 (kept as lone surrogates by the router) cannot be stored: U+FFFD
    name, user = (_LONE_SURROGATES.sub("\ufffd", v) for v in (name or from_user, from_user))
    return name, user


_LONE_SURROGATES = re.compile("[\ud800-\udfff]")


def pushed_caller(caller: tuple[str, str], hide_caller: bool) -> tuple[str, str]:
    """The caller identity written to Redis (job stream, parked-call hash): nothing when
    HIDE_CALLER is on, so the name never leaves Kamailio, not only the push payloads."""
    return ("", "") if hide_caller else caller


def call_key(call_id: str) -> str:
    """Key of a parked call (htable key, Redis key part): a short digest of the Call-ID."""
    return hashlib.sha1(call_id.encode("utf-8", "surrogateescape")).hexdigest()[:20]


def _job_id(kind: PushKind, key: str, salt: str = "") -> str:
    return hashlib.sha1(f"{kind.value}|{key}|{salt}".encode()).hexdigest()[:24]


def incoming_call_job(
    aor: str, call_id: str, caller: tuple[str, str], device_ids: Sequence[str], now: float, wait_window: float
) -> PushJob:
    # (the payload's deadline comes from the job's own deadline, not from a data field)
    return PushJob(
        job_id=_job_id(PushKind.INCOMING_CALL, call_key(call_id)),
        kind=PushKind.INCOMING_CALL,
        aor=aor,
        deadline=now + wait_window,
        device_ids=tuple(device_ids),
        data={"call_id": call_id, "callee": aor, "caller_name": caller[0], "caller_number": caller[1]},
        created_at=now,
    )


def cancel_call_job(aor: str, call_id: str, device_ids: Sequence[str], now: float, reason: str) -> PushJob:
    return PushJob(
        job_id=_job_id(PushKind.CANCEL_INCOMING_CALL, call_key(call_id)),
        kind=PushKind.CANCEL_INCOMING_CALL,
        aor=aor,
        deadline=now + 60.0,
        device_ids=tuple(device_ids),
        data={"call_id": call_id, "callee": aor, "reason": reason},
        created_at=now,
    )


def missed_call_job(aor: str, call_id: str, caller: tuple[str, str], now: float, ttl: float) -> PushJob:
    # title/body are built by the payload builders (which honour HIDE_CALLER): a copy here
    # would only put the caller's name in the Redis stream
    name, number = caller
    return PushJob(
        job_id=_job_id(PushKind.MISSED_CALL, call_key(call_id)),
        kind=PushKind.MISSED_CALL,
        aor=aor,
        deadline=now + ttl,
        data={"call_id": call_id, "callee": aor, "caller_name": name, "caller_number": number},
        created_at=now,
    )


def end_of_call_jobs(call: ParkedCall, answered: bool, now: float, settings: Settings, reason: str) -> list[PushJob]:
    """Pushes owed when a parked call ends (`reason`: see `end_reason`).

    - answered: a cancel push to the pushed devices that never woke (a woken device got the
      INVITE, and tm's CANCEL ends its ringing);
    - not answered (timeout, caller CANCEL, busy/decline): a cancel push to every pushed device
      and one missedCall to the user.
    """
    jobs: list[PushJob] = []
    notify = [d for d in call.pushed if d not in call.woken] if answered else list(call.pushed)
    if notify:
        jobs.append(cancel_call_job(call.aor, call.call_id, notify, now, reason))
    if not answered:
        caller = pushed_caller((call.caller_name, call.caller_number), settings.hide_caller)
        jobs.append(missed_call_job(call.aor, call.call_id, caller, now, float(settings.message_ttl)))
    return jobs


# --------------------------------------------------------------------------- pending devices


def pending_key(aor: str, device_id: str) -> str:
    """The htable `pnpend` key of a device pushed for calls parked on this node: exact, so a
    REGISTER takes its entry in O(1) (no walk of the table)."""
    return f"{aor}|{device_id}"


def add_pending_call(value: object, key: str) -> str:
    """A `pnpend` value (the call keys the device was pushed for) with `key` added once."""
    keys = pending_calls(value)
    return ",".join(keys if key in keys else [*keys, key])


def pending_calls(value: object) -> list[str]:
    """The call keys of a `pnpend` value (None: none). Call keys are hex, never hold a comma."""
    return [k for k in str(value).split(",") if k] if value is not None else []


# --------------------------------------------------------------------------- parked-call entry


@dataclass(frozen=True)
class WaitEntry:
    """The shared-memory (htable `pnwait`) record of a call parked on this node.

    It holds everything needed to *end* the call's transaction (tmx t_reply_callid /
    t_cancel_callid need Call-ID and CSeq number), so answering the caller never depends on
    Redis; Redis only supplies the pushes owed at the end. `code` is the final reply the
    wait-window timer sends (0 = the window ran out: 480 or the fallback).
    """

    aor: str
    call_id: str
    cseq: str
    code: int = 0

    def encode(self) -> str:
        # every field percent-encoded, so no value (a hostile Call-ID, a repeated re-arm) can
        # shift the separators
        fields = (str(self.code), self.cseq, self.aor, self.call_id)
        return "|".join(quote(f, safe="", errors="surrogateescape") for f in fields)

    def with_code(self, code: int) -> WaitEntry:
        return replace(self, code=code)

    def window_end(self, fallback: bool) -> WindowEnd:
        """What the wait-window timer does when this entry expires; `fallback`: a FALLBACK_URI is
        configured."""
        if self.code in (0, 480) and fallback:
            # a device still rings (else the failure route had ended the call): cancel its branch
            # without a final reply, so the failure route can relay the call to the fallback
            return WindowEnd(0, end_reason(0), to_fallback=True)
        return WindowEnd(self.code or 480, end_reason(self.code), to_fallback=False)

    @staticmethod
    def decode(value: object) -> WaitEntry | None:
        """The entry of an htable value; None for an absent or malformed one."""
        if value is None:
            return None
        parts = str(value).split("|")
        if len(parts) != 4 or not parts[0].isdigit():
            return None
        code, cseq, aor, call_id = (unquote(p, errors="surrogateescape") for p in parts)
        if not aor:
            return None
        return WaitEntry(aor=aor, call_id=call_id, cseq=cseq, code=int(code))



@dataclass(frozen=True)
class WindowEnd:
    """How the wait-window timer ends a parked call: answer the caller `reply` (0: none, cancel
    the branches instead), with `reason` for the pushes owed; `to_fallback`: mark the call for
    the failure route to relay to FALLBACK_URI."""

    reply: int
    reason: str
    to_fallback: bool


# --------------------------------------------------------------------------- ends Redis missed


#: How long after a call ended its owed Redis work (record finished, end pushes queued) is retried
#: while Redis is unreachable. A missed-call push is still worth sending minutes late; past this
#: the dispatcher would drop the pushes at their deadlines anyway.
OWED_END_KEEP = 300.0
#: Seconds between two attempts (the htable entry's expiry; its timer runs every second).
OWED_END_RETRY = 2


@dataclass(frozen=True)
class OwedEnd:
    """A parked call that ended while Redis was unreachable, kept in shared memory until Redis takes
    what the end owes it: the call record finished (`jobs` None) and then the end-of-call pushes
    (`jobs`: those not yet queued, with the deadlines of the moment the call ended)."""

    aor: str
    key: str
    reason: str
    answered: bool
    ended_at: float
    jobs: tuple[PushJob, ...] | None = None
    attempt: int = 0

    def encode(self) -> str:
        return json.dumps({
            "aor": self.aor, "key": self.key, "reason": self.reason, "answered": self.answered,
            "ended_at": self.ended_at, "attempt": self.attempt,
            "jobs": None if self.jobs is None else [schema.encode_job(j) for j in self.jobs],
        }, separators=(",", ":"))

    @classmethod
    def decode(cls, raw: object) -> OwedEnd | None:
        """None for anything that is not an encoded OwedEnd (an entry written by another version)."""
        try:
            d = json.loads(str(raw))
            jobs = d["jobs"]
            return cls(
                aor=str(d["aor"]), key=str(d["key"]), reason=str(d["reason"]), answered=bool(d["answered"]),
                ended_at=schema.finite_float(d["ended_at"], "ended_at"), attempt=int(d["attempt"]),
                jobs=None if jobs is None else tuple(schema.decode_job(j) for j in jobs),
            )
        except (ValueError, KeyError, TypeError):  # (schema.DecodeError is a ValueError)
            return None

    def given_up(self, now: float) -> bool:
        return now - self.ended_at > OWED_END_KEEP

    def retry_key(self) -> str:
        """The htable key of the next attempt: a new key each time, so the expiry event of one
        attempt never rewrites the cell htable is about to free."""
        return f"{self.key}|{self.attempt + 1}"


def owed_end_jobs(call: ParkedCall, woken_unrecorded: Iterable[str], answered: bool, ended_at: float,
                  settings: Settings, reason: str) -> list[PushJob]:
    """`end_of_call_jobs` for a call whose devices in `woken_unrecorded` re-registered while Redis
    could not record it (they got the INVITE: no cancel push for them)."""
    extra = [d for d in woken_unrecorded if d not in call.woken]
    if extra:
        call = replace(call, woken=(*call.woken, *extra))
    return end_of_call_jobs(call, answered, ended_at, settings, reason)


def nobody_can_answer(call: ParkedCall | None, unreachable: Iterable[str], open_branches: int) -> bool:
    """Whether a parked call waits for nothing: no branch rings (`open_branches`: awake and woken
    devices' branches still open) and every pushed device that has not woken is `unreachable`
    (its call push hit a dead token). False once the call has ended (None)."""
    if call is None or open_branches > 0:
        return False
    return not set(call.pushed) - set(call.woken) - set(unreachable)
