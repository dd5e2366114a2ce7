"""Pure call-flow decisions of the Kamailio push role.

The KEMI router (kemi/) reads the SIP message and usrloc through KSR, calls the
functions here to decide what to do, and acts through KSR. Nothing in this module
does I/O, so every decision is unit-tested without Kamailio (tests/test_calls.py).

Vocabulary:
- a *binding* is one usrloc contact of the callee's AOR as seen when an INVITE arrives;
- a *device* is a push-capable device from the Redis store (pushlib.models.Device);
- an *awake* device registered less than `awake_window` seconds ago and is called at once;
- a *sleeping* device is pushed (`incomingCall`) and the INVITE is parked until it re-REGISTERs.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from urllib.parse import quote, unquote

from pushlib import schema
from pushlib.models import Device, Provider, PushJob, PushKind
from pushlib.settings import Settings

#: SIP finals that end a call for every device (busy here = busy everywhere, a decline is a decline).
END_ALL_CODES = frozenset({486, 600, 603})
#: Names of Contact URI parameters that mark a binding as push-capable (RFC 8599 and legacy).
PUSH_URI_PARAMS = frozenset({"pn-provider", "pn-prid", "pn-param", "pn-tok", "pn-type", "app-id"})
#: Providers announced in Feature-Caps for plain (non-push) registrations.
SERVED_PROVIDERS: tuple[str, ...] = (Provider.APNS.value, Provider.FCM.value)

#: Longest Contact URI a REGISTER may bind (registrar's `contact_max_size`, default 512).
MAX_CONTACT_URI = 512
_MAX_REASON = 80
_SAFE_REASON = re.compile(r"[^\x20-\x7e]")


@dataclass(frozen=True)
class ProxyConfig:
    """What the Kamailio config tells the Python router (from `#!define`s / `-A` options)."""

    pusher: bool = True
    auth: bool = False
    external_dispatcher: bool = False
    awake_window: float = 10.0
    realm: str = ""
    #: where a parked call goes when its wait window ends unanswered ("" = answer 480); one per
    #: deployment for now (a per-user voicemail URI would come from the store)
    fallback_uri: str = ""
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
    Recognised: WITH_PUSHER, WITH_AUTH, WITH_EXTERNAL_DISPATCHER, REDIS_URL, WAIT_WINDOW,
    AWAKE_WINDOW, AUTH_REALM, HIDE_CALLER, FALLBACK_URI.
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
    if get_def("HIDE_CALLER") is not None:
        overrides["hide_caller"] = flag("HIDE_CALLER")
    settings = replace(settings, **overrides)  # type: ignore[arg-type]
    awake = text("AWAKE_WINDOW")
    return ProxyConfig(
        pusher=flag("WITH_PUSHER"),
        auth=flag("WITH_AUTH"),
        external_dispatcher=flag("WITH_EXTERNAL_DISPATCHER"),
        awake_window=10.0 if awake is None else schema.finite_float(awake, "AWAKE_WINDOW"),
        realm=text("AUTH_REALM") or "",
        fallback_uri=text("FALLBACK_URI") or "",
        settings=settings,
    )


# --------------------------------------------------------------------------- REGISTER


def sip_reason(text: str) -> str:
    """A string made safe for a SIP reason phrase: printable ASCII, one line, <= 80 chars."""
    cleaned = _SAFE_REASON.sub("?", text).strip() or "Bad Request"
    return cleaned[:_MAX_REASON]


def feature_caps(provider: str | None) -> str:
    """The RFC 8599 Feature-Caps value for a REGISTER 2xx.

    A push REGISTER gets the PNS it used; a plain REGISTER learns every PNS we serve.
    """
    pns = provider if provider else ",".join(SERVED_PROVIDERS)
    return f'*;+sip.pns="{pns}"'


def aor_of(user: str, domain: str) -> str:
    """The AOR key used by the store, tsilo and usrloc: `sip:user@domain`."""
    return f"sip:{user}@{domain}"


_EXPIRES = re.compile(r"[0-9]{1,10}")


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
        if _EXPIRES.fullmatch(text):
            value = int(text)
        break
    if value == 0:
        return 0
    return max(minimum, min(maximum, value)) if maximum else max(minimum, value)


def uri_params(uri: str) -> dict[str, str]:
    """Lower-cased URI parameters of a bare SIP URI (no `<>`; headers after `?` ignored)."""
    body = uri.strip().strip("<>").split("?", 1)[0]
    out: dict[str, str] = {}
    for part in body.split(";")[1:]:
        name, _, value = part.partition("=")
        if name:
            out[name.strip().lower()] = value.strip()
    return out


def contact_uri(contact: str) -> str:
    """The bare URI of a Contact header value (`"Bob" <sip:b@h;x=1>;expires=60` -> `sip:b@h;x=1`)."""
    value = contact.strip()
    if "<" in value:
        return value.split("<", 1)[1].split(">", 1)[0].strip()
    # without <>, everything after the first ';' is a header parameter (RFC 3261 20.10)
    return value.split(";", 1)[0].split(",", 1)[0].strip()


def looks_push(uri: str) -> bool:
    """True when a contact URI carries push parameters (without validating them)."""
    return not PUSH_URI_PARAMS.isdisjoint(uri_params(uri))


def stale_bindings(
    bindings: Iterable[Binding], device_id: str, new_uri: str, identify: Callable[[Binding], str | None]
) -> list[Binding]:
    """Bindings of the same device (by `identify`) other than the one being saved: to be removed."""
    return [b for b in bindings if b.uri != new_uri and identify(b) == device_id]


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


def plan_invite(
    bindings: Sequence[Binding],
    devices: Sequence[Device] | None,
    now: float,
    awake_window: float,
) -> InvitePlan:
    """Decide who rings now and who gets pushed.

    `devices` is None when the store is unreachable: then only bindings without push
    parameters (or push bindings refreshed within the awake window) are called, and a
    user who could only be pushed is unavailable at once.
    """
    ring: list[Binding] = []
    push: list[Device] = []
    by_contact = {d.contact: d for d in devices or ()}
    matched: set[str] = set()
    for b in bindings:
        device = by_contact.get(b.uri)
        if device is not None:
            matched.add(device.device_id)
            if awake_window > 0 and now - device.registered_at < awake_window:
                ring.append(b)
            elif device.quarantined_until <= now:
                push.append(device)
            continue
        if devices is None and looks_push(b.uri):
            if awake_window > 0 and b.modified and now - b.modified < awake_window:
                ring.append(b)
            continue
        ring.append(b)
    for d in devices or ():
        if d.device_id in matched or d.quarantined_until > now:
            continue
        if d.expires_at and d.expires_at <= now:
            continue
        push.append(d)
    if push:
        return InvitePlan(Verdict.PARK, tuple(ring), tuple(push))
    if ring:
        return InvitePlan(Verdict.RING, tuple(ring))
    if not bindings and not devices and devices is not None:
        return InvitePlan(Verdict.NOT_FOUND)
    return InvitePlan(Verdict.UNAVAILABLE)


class FailureAction(Enum):
    RELAY = "relay"  # let tm send the best final reply upstream
    END_ALL = "end_all"  # busy/decline: end the call for everyone, cancel pushes
    KEEP_WAITING = "keep_waiting"  # pushed devices may still wake: keep the transaction


_PHRASES = {480: "Temporarily Unavailable", 486: "Busy Here", 487: "Request Terminated",
            600: "Busy Everywhere", 603: "Decline"}


def reason_phrase(code: int) -> str:
    return _PHRASES.get(code, "Temporarily Unavailable")


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


def fallback_target(template: str, aor: str) -> str:
    """The fallback R-URI for a call to `aor` ("" = none).

    `{user}` and `{domain}` in the template are replaced by the callee's, so one voicemail
    server can pick the mailbox from the R-URI (`sip:{user}@vm.example.com`); the router
    also adds a Diversion header (RFC 5806, reason=no-answer) for servers that read that.
    """
    if not template:
        return ""
    user, _, domain = aor.removeprefix("sip:").partition("@")
    return template.replace("{user}", user).replace("{domain}", domain)


def diversion_header(aor: str) -> str:
    """The Diversion header value for a call sent to the fallback because nobody answered."""
    return f"<{aor}>;reason=no-answer;counter=1"


# --------------------------------------------------------------------------- push jobs

_DISPLAY = re.compile(r'^\s*(?:"((?:[^"\\]|\\.)*)"|([^<"]*?))\s*<')


def caller_identity(from_header: str, from_user: str) -> tuple[str, str]:
    """(caller name, caller number) from a From header value and its URI user."""
    name = ""
    m = _DISPLAY.match(from_header or "")
    if m:
        name = (m.group(1) if m.group(1) is not None else m.group(2) or "").replace('\\"', '"').strip()
    return name or from_user, from_user


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


def end_of_call_jobs(
    aor: str,
    call_id: str,
    caller: tuple[str, str],
    pushed: Sequence[str],
    answered_by: str | None,
    now: float,
    settings: Settings,
    reason: str,
) -> list[PushJob]:
    """Pushes owed when a parked call ends.

    - answered (`answered_by` set, or "" for a non-push binding): cancel pushes to pushed devices
      that did not answer;
    - not answered (timeout, caller CANCEL, busy/decline): cancel pushes to every pushed
      device and one missedCall to the user.
    """
    jobs: list[PushJob] = []
    others = [d for d in pushed if d != answered_by]
    if others:
        jobs.append(cancel_call_job(aor, call_id, others, now, reason))
    if answered_by is None:
        jobs.append(missed_call_job(aor, call_id, pushed_caller(caller, settings.hide_caller), now,
                                    float(settings.message_ttl)))
    return jobs


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

