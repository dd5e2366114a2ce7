"""SIP secrets: subscribers' digest credentials (the one definition of HA1, and where it is
stored) and the key that signs the proxy's Record-Route.

Only HA1 is stored (`schema.subscriber_key`), never the clear password. Written by the operator
CLI (`pushlib-admin subscriber`), or the tests and the demo; read by the router's REGISTER/INVITE
digest check. Every method raises `StoreUnavailable` when Redis cannot serve it.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from typing import Any

from pushlib import schema
from pushlib.redisconn import StoreUnavailable, unavailable_on_error


def ha1(user: str, realm: str, password: str) -> str:
    """HA1 of HTTP digest (RFC 2617/7616, MD5): hex MD5 of `user:realm:password`."""
    return hashlib.md5(f"{user}:{realm}:{password}".encode()).hexdigest()


class Subscribers:
    """SIP digest credentials (HA1 only) per `user@domain`, on a sync client (`redisconn.sync_client`)."""

    def __init__(self, client: Any) -> None:
        self._r = client

    def set_password(self, user: str, domain: str, password: str, realm: str | None = None) -> None:
        """Store the HA1 of `password` for `realm` (default: the domain)."""
        realm = realm or domain
        fields = {"ha1": ha1(user, realm, password), "realm": realm}
        with unavailable_on_error("set_password"):
            self._r.hset(schema.subscriber_key(user, domain), mapping=fields)

    def ha1(self, user: str, domain: str) -> str | None:
        """The stored HA1, or None when the subscriber has no credentials."""
        with unavailable_on_error("ha1"):
            value = self._r.hget(schema.subscriber_key(user, domain), "ha1")
        return None if value is None else str(value)

    def remove(self, users: Sequence[tuple[str, str]]) -> None:
        """Delete the credentials of these (user, domain) pairs."""
        if not users:
            return
        with unavailable_on_error("remove_subscribers"):
            self._r.delete(*(schema.subscriber_key(u, d) for u, d in users))


def route_secret(client: Any) -> bytes:
    """The deployment's Record-Route signing key: created once (SET NX, 32 random bytes) by the
    first proxy to start and shared by every worker and node, so a dialog survives a restart and
    may continue through another node. Raises StoreUnavailable."""
    with unavailable_on_error("route_secret"):
        client.set(schema.ROUTE_SECRET_KEY, secrets.token_hex(32), nx=True)
        value = client.get(schema.ROUTE_SECRET_KEY)
    if not value:
        raise StoreUnavailable("route secret missing after SET NX")
    return str(value).encode()
