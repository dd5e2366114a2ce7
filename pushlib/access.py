"""Who may do what: served domains, digest-auth verdicts, abuse limits, start-up safety.

Pure functions for the router (kemi/router.py); Kamailio modules do the counting (pike for
per-source request rates, htable for parked calls and push counts) and the digest maths (auth).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from pushlib.aor import HOST, ascii_lower
from pushlib.params import NameAddr, PushParamError

# ----------------------------------------------------------------------------- domains


def served_domains(raw: str | None) -> frozenset[str]:
    """The LOCAL_DOMAINS define ("a.example, b.example"), lower-cased. Empty: Kamailio's own
    addresses and `alias=` names decide (the router asks `is_myself`)."""
    if not raw:
        return frozenset()
    return frozenset(ascii_lower(d.strip()) for d in re.split(r"[\s,;]+", raw) if d.strip())


def is_served(domain: str, served: frozenset[str], is_myself: Callable[[str], bool]) -> bool:
    """True when `domain` (the host of a To / From / request URI) is one of ours.

    With no LOCAL_DOMAINS, `is_myself` (Kamailio's listen addresses and aliases) answers.
    A domain with bytes a host name cannot hold is never ours (and never reaches is_myself);
    only ASCII letters are case-folded, so no Unicode look-alike (the Kelvin sign `K` lower-cases
    to `k`) can pass for one of our names.
    """
    host = ascii_lower(domain.strip())
    if not HOST.fullmatch(host):
        return False
    if served:
        return host in served
    return is_myself(host)

# ----------------------------------------------------------------------------- digest auth


class AuthVerdict(Enum):
    PASS = "pass"  # credentials checked and valid
    SKIP = "skip"  # no check applies (an INVITE from a caller who is not a local subscriber)
    CHALLENGE = "challenge"  # 401/407 with a fresh nonce
    CHALLENGE_STALE = "challenge-stale"  # the nonce expired or was reused: stale=true, same password
    UNAVAILABLE = "unavailable"  # the credentials store is down: 503


# pv_auth_check return codes (auth module README)
AUTH_NONCE_EXPIRED = -4
AUTH_NONCE_REUSED = -6
CHALLENGE_QOP_AUTH = 1  # auth_challenge flag: qop=auth
CHALLENGE_STALE = 16  # auth_challenge flag: stale=true


def auth_precheck(is_register: bool, ha1_known: bool, store_up: bool, from_served: bool,
                  fail_open_invite: bool) -> AuthVerdict | None:
    """What to do before any digest is checked; None: run pv_auth_check with the stored HA1.

    - A REGISTER for a user without stored credentials is challenged like a wrong password:
      the same 401 whether or not the user exists, and no placeholder HA1 is ever checked.
    - An INVITE from a caller who is not a local subscriber is an external call: no check.
    - While Redis is down nobody's REGISTER can be checked (503). An INVITE whose From claims
      one of our domains cannot be told from an impersonation, so it gets 503 too, unless the
      operator chose AUTH_FAIL_OPEN_INVITE (calls to awake contacts keep working unverified).
    """
    if not store_up:
        if is_register or (from_served and not fail_open_invite):
            return AuthVerdict.UNAVAILABLE
        return AuthVerdict.SKIP
    if not ha1_known:
        return AuthVerdict.CHALLENGE if is_register else AuthVerdict.SKIP
    return None


def auth_result(rc: int) -> AuthVerdict:
    """The verdict for pv_auth_check's return code."""
    if rc > 0:
        return AuthVerdict.PASS
    if rc in (AUTH_NONCE_EXPIRED, AUTH_NONCE_REUSED):
        return AuthVerdict.CHALLENGE_STALE
    return AuthVerdict.CHALLENGE


def challenge_flags(verdict: AuthVerdict) -> int:
    return CHALLENGE_QOP_AUTH | (CHALLENGE_STALE if verdict is AuthVerdict.CHALLENGE_STALE else 0)


# ----------------------------------------------------------------------------- start-up safety


def insecure_start_refusal(auth: bool, listen_ip: str | None, allow_insecure: bool) -> str | None:
    """Why Kamailio must not start (None: it may): digest auth off on an address that is not
    loopback lets anyone register as anyone and take their calls."""
    if auth or allow_insecure:
        return None
    host = (listen_ip or "127.0.0.1").strip().strip('"').strip("[]")
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass  # a host name: it may resolve to anything
    return (f"refusing to start: digest auth is off (WITHOUT_AUTH) and SIP listens on {host}, "
            "which is not loopback; remove WITHOUT_AUTH, or define ALLOW_INSECURE to accept that anyone can "
            "register as anyone")


# ----------------------------------------------------------------------------- limits


@dataclass(frozen=True)
class Limits:
    """Abuse limits (defines of kamailio.cfg; 0 turns a limit off)."""

    max_parked_per_user: int = 5
    max_call_pushes_per_minute: int = 10
    min_expires: int = 60
    max_expires: int = 3600
    #: new calls (initial INVITEs) per second this node takes; above it they get 503 with
    #: Retry-After at once, before any Redis or usrloc work (pipelimit, TAILDROP per second)
    max_calls_per_second: int = 300


def limits_from(get: Callable[[str], str | None]) -> Limits:
    """Limits from defines (`get` returns a define's text or None); bad values keep defaults."""
    base = Limits()

    def number(name: str, default: int) -> int:
        raw = (get(name) or "").strip().strip('"')
        return int(raw) if re.fullmatch(r"[0-9]{1,9}", raw) else default

    return Limits(
        max_parked_per_user=number("MAX_PARKED_PER_USER", base.max_parked_per_user),
        max_call_pushes_per_minute=number("MAX_CALL_PUSHES_PER_MINUTE", base.max_call_pushes_per_minute),
        min_expires=number("MIN_EXPIRES", base.min_expires),
        max_expires=number("MAX_EXPIRES", base.max_expires),
        max_calls_per_second=number("MAX_CPS", base.max_calls_per_second),
    )


def push_bucket(aor: str, device_id: str, now: float) -> str:
    """The htable key counting one device's call pushes in the current minute (fixed windows:
    a device called now and then never accumulates towards the limit)."""
    return f"{aor}|{device_id}|{int(now // 60)}"


# ----------------------------------------------------------------------------- dialogs

DIALOG_PARAM = "pnd"  # Record-Route parameter: the proxy's signature of the dialog's Call-ID


def dialog_signature(secret: bytes, call_id: str) -> str:
    """What the proxy puts in its Record-Route (`;pnd=<this>`) and expects back in the Route of
    every in-dialog request: without it, anyone could send a request with a To tag and a Route
    naming us and have it relayed anywhere (loose routing alone does not tell a dialog we
    record-routed from a forged one)."""
    digest = hmac.new(secret, call_id.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()
    return digest[:24]


def route_signed(route_uri: str, secret: bytes, call_id: str) -> bool:
    """Whether a Route URI (an addr-spec, as `$route_uri` gives it) carries `;pnd=` with our
    signature of `call_id` (dialog_signature). The caller also checks that the URI names us:
    a valid signature copied onto a Route to another host must not make us relay there.

    rr's check_route_param() would say the same, but compiles its regular expression on
    every call: that was the costliest step of relaying an ACK or a BYE."""
    try:
        given = NameAddr("", route_uri).uri_params().get(DIALOG_PARAM)
    except PushParamError:  # (parameters that do not decode: no signature of ours)
        return False
    # constant time: the signature is the secret's only exposure to guessing
    # (as bytes: compare_digest refuses a str that is not ASCII, and a forged one may not be)
    return given is not None and hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                                                     dialog_signature(secret, call_id).encode())


APP_REFUSAL = "App Not Configured"


def app_refusal(found: bool, enabled: bool) -> str | None:
    """The 555 reason for a REGISTER naming an app we do not push for (None: the app is fine)."""
    if not found:
        return APP_REFUSAL
    if not enabled:
        return "App Disabled"
    return None
