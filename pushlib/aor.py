"""Addresses of record: one type, one spelling, built here only.

An AOR is `sip:<user>@<host>`, the name usrloc, tsilo, the Redis keys and the push jobs give a user:

- the user part is kept as sent: it is case-sensitive (RFC 3261 §19.1.4);
- the host is lower-cased (ASCII only: a host name is case-insensitive, and no Unicode case
  folding may turn a foreign name into one of ours);
- a port, URI parameters and URI headers are not part of an AOR and are dropped:
  `sip:Bob@Example.COM:5061;transport=tls` names the AOR `sip:Bob@example.com`;
- the scheme is always `sip:`: the router builds AORs from `$tU`/`$td`, which carry no scheme,
  so a `sips:` URI names the same user.
"""

from __future__ import annotations

import re
from typing import NewType

Aor = NewType("Aor", str)

#: A host as this proxy serves it (lower-case): a DNS name or IPv4 address, or an IPv6 reference.
HOST = re.compile(r"[a-z0-9.\-]{1,253}|\[[0-9a-f:.]{2,45}\]")

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_BAD_USER = re.compile(r"[\x00-\x20\x7f<>\"@:]")


class AorError(ValueError):
    """Text that does not name a user at a domain."""


def ascii_lower(text: str) -> str:
    return text.translate(_ASCII_LOWER)


def _host(domain: str) -> str:
    host = domain.strip().split(";", 1)[0].split("?", 1)[0]
    if host.startswith("["):
        end = host.find("]")
        host = host[: end + 1] if end >= 0 else host
    else:
        host = host.partition(":")[0]
    return ascii_lower(host)


def aor_of(user: str, domain: str) -> Aor:
    """The AOR of `user` at `domain` (a host, maybe with a port or URI parameters).

    Never raises: the router passes what the SIP message held; whether that domain is served and
    well formed is decided elsewhere (access.is_served)."""
    return Aor(f"sip:{user}@{_host(domain)}")


def parse_aor(text: str) -> Aor:
    """The AOR an operator or API client names: `user@domain`, `sip:user@domain` or
    `sips:user@domain`, with or without a port or URI parameters (dropped).

    Raises AorError for text with no user or no host, a host that is not a host name or address,
    or a user part with white space, controls, `<>"@` or a `:password`."""
    value = text.strip()
    for scheme in ("sip:", "sips:"):
        if ascii_lower(value[: len(scheme)]) == scheme:
            value = value[len(scheme):]
            break
    user, sep, rest = value.partition("@")
    host = _host(rest)
    if not sep or not user or _BAD_USER.search(user):
        raise AorError(f"want user@domain, got {text[:80]!r}")
    if not HOST.fullmatch(host):
        raise AorError(f"not a host name: {rest[:80]!r}")
    return aor_of(user, host)


def aor_parts(aor: str) -> tuple[str, str]:
    """(user, host) of an AOR built by `aor_of` / `parse_aor`."""
    user, _, host = aor.removeprefix("sip:").rpartition("@")
    return user, host
