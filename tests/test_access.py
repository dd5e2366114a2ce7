"""Unit tests of pushlib.access: served domains, auth verdicts, start-up safety, limits."""

from __future__ import annotations

import pytest

from pushlib import access
from pushlib.access import AuthVerdict


def test_served_domains_parse_and_match() -> None:
    served = access.served_domains(' "Example.COM, b.example ;c.example" '.strip().strip('"'))
    assert served == {"example.com", "b.example", "c.example"}
    never = lambda host: pytest.fail(f"is_myself asked for {host}")  # noqa: E731
    assert access.is_served("EXAMPLE.com", served, never)
    assert not access.is_served("evil.example", served, never)
    assert not access.is_served("example.com\r\nX: y", served, never)
    # only ASCII is case-folded: the Kelvin sign lower-cases to "k" in Unicode
    assert not access.is_served("\u212aamailio.org", access.served_domains("kamailio.org"), never)


def test_without_local_domains_kamailio_decides() -> None:
    asked: list[str] = []

    def myself(host: str) -> bool:
        asked.append(host)
        return host == "127.0.0.1"

    assert access.is_served("127.0.0.1", frozenset(), myself)
    assert not access.is_served("evil.example", frozenset(), myself)
    # bytes no host name holds never reach Kamailio's matcher
    for bad in ("", "a b", "a\x00b", "é.example", "x" * 300, "a;b"):
        assert not access.is_served(bad, frozenset(), myself)
    assert asked == ["127.0.0.1", "evil.example"]


@pytest.mark.parametrize(
    ("register", "ha1_known", "store_up", "from_served", "fail_open", "expected"),
    [
        (True, True, True, True, False, None),  # check the stored HA1
        (True, False, True, True, False, AuthVerdict.CHALLENGE),  # no credentials: never a placeholder check
        (True, False, False, True, False, AuthVerdict.UNAVAILABLE),
        (False, False, True, True, False, AuthVerdict.SKIP),  # caller who is not a subscriber
        (False, True, True, True, False, None),
        (False, False, False, True, False, AuthVerdict.UNAVAILABLE),  # cannot tell an impersonation
        (False, False, False, True, True, AuthVerdict.SKIP),  # the operator chose to fail open
        (False, False, False, False, False, AuthVerdict.SKIP),  # another domain's caller
    ],
)
def test_auth_precheck(register: bool, ha1_known: bool, store_up: bool, from_served: bool, fail_open: bool,
                       expected: AuthVerdict | None) -> None:
    assert access.auth_precheck(register, ha1_known, store_up, from_served, fail_open) is expected


def test_auth_result_and_challenge_flags() -> None:
    assert access.auth_result(1) is AuthVerdict.PASS
    for rc in (-1, -2, -5, -8):
        assert access.auth_result(rc) is AuthVerdict.CHALLENGE
        assert access.challenge_flags(access.auth_result(rc)) == access.CHALLENGE_QOP_AUTH
    for rc in (access.AUTH_NONCE_EXPIRED, access.AUTH_NONCE_REUSED):
        assert access.auth_result(rc) is AuthVerdict.CHALLENGE_STALE
        assert access.challenge_flags(AuthVerdict.CHALLENGE_STALE) & access.CHALLENGE_STALE


@pytest.mark.parametrize(
    ("auth", "listen", "insecure", "refused"),
    [
        (True, "203.0.113.5", False, False),
        (False, "127.0.0.1", False, False),
        (False, '"127.0.0.2"', False, False),
        (False, "::1", False, False),
        (False, "localhost", False, False),
        (False, None, False, False),  # kamailio.cfg's default is loopback
        (False, "203.0.113.5", False, True),
        (False, "0.0.0.0", False, True),
        (False, "sip.example.com", False, True),
        (False, "203.0.113.5", True, False),
    ],
)
def test_insecure_start_refusal(auth: bool, listen: str | None, insecure: bool, refused: bool) -> None:
    reason = access.insecure_start_refusal(auth, listen, insecure)
    assert (reason is not None) is refused
    if reason:
        assert "\n" not in reason and "ALLOW_INSECURE" in reason


def test_limits_from_defines() -> None:
    defines = {"MAX_PARKED_PER_USER": "2", "MAX_CALL_PUSHES_PER_MINUTE": '"0"', "MIN_EXPIRES": "x",
               "MAX_EXPIRES": "-1"}
    limits = access.limits_from(defines.get)
    assert limits == access.Limits(max_parked_per_user=2, max_call_pushes_per_minute=0, min_expires=60,
                                   max_expires=3600)
    none: dict[str, str] = {}
    assert access.limits_from(none.get) == access.Limits()


def test_push_bucket_is_a_fixed_minute() -> None:
    assert access.push_bucket("sip:a@b", "d1", 120.0) == access.push_bucket("sip:a@b", "d1", 179.9)
    assert access.push_bucket("sip:a@b", "d1", 179.9) != access.push_bucket("sip:a@b", "d1", 180.0)


def test_app_refusal() -> None:
    assert access.app_refusal(True, True) is None
    assert access.app_refusal(False, False) == "App Not Configured"
    assert access.app_refusal(True, False) == "App Disabled"


def test_dialog_signature_is_keyed_and_bound_to_the_call() -> None:
    a = access.dialog_signature(b"k1", "call-1")
    assert a == access.dialog_signature(b"k1", "call-1") and len(a) == 24 and a.isalnum()
    assert a != access.dialog_signature(b"k2", "call-1")
    assert a != access.dialog_signature(b"k1", "call-2")
    assert access.dialog_signature(b"k1", b"c\xff".decode("utf-8", "surrogateescape"))  # never raises


def test_route_signed_accepts_only_the_signature_of_this_call() -> None:
    sig = access.dialog_signature(b"k1", "call-1")
    assert access.route_signed(f"sip:10.0.0.1:5060;lr;pnd={sig}", b"k1", "call-1")
    assert access.route_signed(f"sip:10.0.0.1;transport=tcp;lr;PND={sig}", b"k1", "call-1")  # names: any case
    assert access.route_signed(f"sip:node@10.0.0.1;lr;pnd={sig}?X=1", b"k1", "call-1")
    assert not access.route_signed(f"sip:10.0.0.1;lr;pnd={sig}", b"k2", "call-1")  # another key
    assert not access.route_signed(f"sip:10.0.0.1;lr;pnd={sig}", b"k1", "call-2")  # another call
    assert not access.route_signed(f"sip:10.0.0.1;lr;pnd={sig[:-1]}", b"k1", "call-1")
    assert not access.route_signed(f"sip:10.0.0.1;lr;pnd={sig}0", b"k1", "call-1")
    assert not access.route_signed("sip:10.0.0.1;lr;pnd=", b"k1", "call-1")
    assert not access.route_signed("sip:10.0.0.1;lr", b"k1", "call-1")
    assert not access.route_signed("sip:10.0.0.1", b"k1", "call-1")
    assert not access.route_signed("", b"k1", "call-1")
    # the parameter must be the Route URI's own: in its user part or its headers it is not
    assert not access.route_signed(f"sip:x;pnd={sig}@10.0.0.1;lr", b"k1", "call-1")
    assert not access.route_signed(f"sip:10.0.0.1;lr?pnd={sig}", b"k1", "call-1")
    # a forged value that is not ASCII (or not even UTF-8) is refused, never an error
    assert not access.route_signed("sip:10.0.0.1;lr;pnd=é" + sig[1:], b"k1", "call-1")
    assert not access.route_signed("sip:10.0.0.1;lr;pnd=\udcff" + sig[1:], b"k1", "call-1")
    assert not access.route_signed("sip:10.0.0.1;lr;pnd=%zz", b"k1", "call-1")
    # the first occurrence decides (a second, valid one appended by an attacker changes nothing)
    assert not access.route_signed(f"sip:10.0.0.1;lr;pnd=0;pnd={sig}", b"k1", "call-1")
