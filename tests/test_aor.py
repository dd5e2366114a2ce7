"""Addresses of record (pushlib.aor): one spelling whatever way a user is named."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pushlib import calls
from pushlib.aor import AorError, aor_of, aor_parts, parse_aor


@pytest.mark.parametrize(
    ("user", "domain", "aor"),
    [
        ("bob", "example.com", "sip:bob@example.com"),
        ("Bob", "Example.COM", "sip:Bob@example.com"),  # the user part is case-sensitive, the host not
        ("bob", "example.com:5061", "sip:bob@example.com"),
        ("bob", "Example.com;transport=tls", "sip:bob@example.com"),
        ("bob", "[2001:DB8::1]:5060", "sip:bob@[2001:db8::1]"),
        ("+1555;phone-context=x", "h", "sip:+1555;phone-context=x@h"),
        ("bob", "\u212aamailio.org", "sip:bob@\u212aamailio.org"),  # no Unicode folding: not kamailio.org
        ("", "example.com", "sip:@example.com"),  # never raises: the router checks requests elsewhere
    ],
)
def test_aor_of_normalises_the_host_only(user: str, domain: str, aor: str) -> None:
    assert aor_of(user, domain) == aor


def test_calls_aor_of_is_the_same_function() -> None:
    assert calls.aor_of is aor_of


@pytest.mark.parametrize(
    "text",
    ["alice@example.com", "sip:alice@example.com", "SIP:alice@Example.COM", "sips:alice@example.com",
     " sip:alice@example.com:5061;transport=tls ", "alice@EXAMPLE.com?subject=x"],
)
def test_parse_aor_accepts_the_operator_spellings(text: str) -> None:
    assert parse_aor(text) == "sip:alice@example.com"


@pytest.mark.parametrize(
    "text",
    ["alice", "@example.com", "alice@", "sip:", "a b@example.com", "alice:secret@example.com", "<sip:a@h>",
     "alice@exa mple.com", "alice@h@h", "alice@h_x.com", "alice@\u212aamailio.org", "al\x00ice@h"],
)
def test_parse_aor_refuses_what_is_not_user_at_host(text: str) -> None:
    with pytest.raises(AorError):
        parse_aor(text)


_USER = st.text(st.sampled_from("abcXYZ019-_.!~*'()%=+$&;,?/"), min_size=1, max_size=20)
_HOST = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9.-]{0,30}", fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(_USER, _HOST, st.sampled_from(["", ":5060", ";transport=tcp"]))
def test_one_spelling_round_trips(user: str, host: str, suffix: str) -> None:
    aor = aor_of(user, host + suffix)
    assert aor_parts(aor) == (user, host.lower())
    assert parse_aor(aor) == aor == parse_aor(f"{user}@{host.upper()}{suffix}")
    assert calls.fallback_target("sip:{user}@vm.{domain}", aor) == f"sip:{user}@vm.{host.lower()}"
