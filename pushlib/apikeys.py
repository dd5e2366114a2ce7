"""API keys of the HTTP API (`pushlib.api`): bearer tokens, stored hashed, with scopes and a tenant.

A token reads `pnk_<key_id>_<secret>`: `key_id` (12 hex digits) names the stored record
(`schema.api_key_key`), `secret` is 32 random bytes (url-safe base64). Only the sha256 of the
secret is stored; a presented token is checked by hashing its secret and comparing the digests in
constant time (`hmac.compare_digest`). The token is shown once, when the key is created
(`pushlib-admin keys create`); a lost token is revoked and replaced, never recovered.

Scopes: `send` (custom notifications), `read` (every GET), `admin` (every write, and implies
`read` and `send`). A key with a tenant (`pushlib.tenants`) sees only that tenant's users and apps;
a key without one is operator-wide.

Pure parts (`new_token`, `parse_token`, `secret_hash`, `verify`, `Principal.allows`) are plain
functions; `ApiKeyStore` keeps the records on a redis.asyncio client (`redisconn.async_client`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pushlib import schema
from pushlib.redisconn import unavailable_on_connection_error

TOKEN_PREFIX = "pnk_"
_TOKEN = re.compile(r"pnk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
KEY_ID = re.compile(r"[0-9a-f]{12}")
MAX_NAME = 100


class Scope(StrEnum):
    SEND = "send"
    READ = "read"
    ADMIN = "admin"


class ApiKeyError(ValueError):
    """A key request that cannot be honoured (unknown scope, bad name, unknown key id)."""


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: a key's id, scopes and tenant (None: operator-wide)."""

    key_id: str
    scopes: frozenset[Scope]
    tenant: str | None = None

    def allows(self, scope: Scope) -> bool:
        """`admin` implies every scope; otherwise the scope must have been granted."""
        return Scope.ADMIN in self.scopes or scope in self.scopes


@dataclass(frozen=True)
class ApiKey:
    """A stored key (never the secret): what `keys list` and the key lookup see."""

    key_id: str
    secret_sha256: str
    scopes: frozenset[Scope]
    tenant: str | None
    name: str
    created_at: float

    @property
    def principal(self) -> Principal:
        return Principal(self.key_id, self.scopes, self.tenant)

    def public(self) -> dict[str, Any]:
        """The key as `keys list --json` shows it (no hash, no secret)."""
        return {"key_id": self.key_id, "scopes": sorted(self.scopes), "tenant": self.tenant,
                "name": self.name, "created_at": self.created_at}


def parse_scopes(given: Iterable[str]) -> frozenset[Scope]:
    """Scope names as a set; ApiKeyError for an unknown one or none at all."""
    out = set()
    for name in given:
        try:
            out.add(Scope(name))
        except ValueError:
            raise ApiKeyError(f"unknown scope {name[:40]!r} (want {', '.join(s.value for s in Scope)})") from None
    if not out:
        raise ApiKeyError("a key needs at least one scope")
    return frozenset(out)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_token() -> tuple[str, str, str]:
    """(token, key_id, sha256 of the secret) of a fresh key."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return f"{TOKEN_PREFIX}{key_id}_{secret}", key_id, secret_hash(secret)


def parse_token(token: str) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed token, None otherwise."""
    m = _TOKEN.fullmatch(token)
    return (m.group(1), m.group(2)) if m else None


def verify(stored_sha256: str, secret: str) -> bool:
    """Whether `secret` hashes to the stored digest (constant-time comparison)."""
    return hmac.compare_digest(stored_sha256.encode(), secret_hash(secret).encode())


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value, None for anything else."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def encode_api_key(key: ApiKey) -> dict[str, str]:
    out = {"key_id": key.key_id, "secret_sha256": key.secret_sha256, "scopes": ",".join(sorted(key.scopes)),
           "name": key.name, "created_at": repr(float(key.created_at))}
    if key.tenant is not None:
        out["tenant"] = key.tenant
    return out


def decode_api_key(raw: Mapping[str, str]) -> ApiKey:
    try:
        return ApiKey(raw["key_id"], raw["secret_sha256"], parse_scopes(raw["scopes"].split(",")),
                      raw.get("tenant") or None, raw.get("name", ""),
                      schema.finite_float(raw.get("created_at", "0"), "created_at"))
    except (KeyError, ValueError) as exc:
        raise schema.DecodeError(f"bad API key record: {exc!r}") from exc


class ApiKeyStore:
    """API key records on a redis.asyncio client. Raises StoreUnavailable when Redis cannot answer."""

    def __init__(self, client: Any) -> None:
        self._r = client

    async def create(self, scopes: frozenset[Scope], tenant: str | None, name: str = "") -> tuple[str, ApiKey]:
        """A new key: (its token, shown once; the stored record). The tenant must exist (checked
        by the caller: `tenants.TenantStore.get`)."""
        if len(name) > MAX_NAME or any(not c.isprintable() for c in name):
            raise ApiKeyError(f"a key name is at most {MAX_NAME} printable characters")
        token, key_id, digest = new_token()
        key = ApiKey(key_id, digest, scopes, tenant, name, time.time())
        with unavailable_on_connection_error("create_api_key"):
            pipe = self._r.pipeline(transaction=True)
            pipe.hset(schema.api_key_key(key_id), mapping=encode_api_key(key))
            pipe.sadd(schema.API_KEY_IDS_KEY, key_id)
            await pipe.execute()
        return token, key

    async def get(self, key_id: str) -> ApiKey | None:
        with unavailable_on_connection_error("api_key"):
            raw = await self._r.hgetall(schema.api_key_key(key_id))
        return schema.decode_or_log(decode_api_key, raw, "apikey", key_id) if raw else None

    async def authenticate(self, token: str) -> Principal | None:
        """The principal of a valid token; None for a malformed, unknown or revoked one."""
        parsed = parse_token(token)
        if parsed is None:
            return None
        key = await self.get(parsed[0])
        if key is None or not verify(key.secret_sha256, parsed[1]):
            return None
        return key.principal

    async def all(self) -> list[ApiKey]:
        with unavailable_on_connection_error("api_keys"):
            ids = sorted(await self._r.smembers(schema.API_KEY_IDS_KEY))
        found = [await self.get(i) for i in ids]
        return sorted((k for k in found if k is not None), key=lambda k: (k.created_at, k.key_id))

    async def revoke(self, key_id: str) -> bool:
        """Delete a key; True when it existed. Requests with it fail from then on."""
        with unavailable_on_connection_error("revoke_api_key"):
            pipe = self._r.pipeline(transaction=True)
            pipe.delete(schema.api_key_key(key_id))
            pipe.srem(schema.API_KEY_IDS_KEY, key_id)
            deleted, _ = await pipe.execute()
        return bool(deleted)

    async def revoke_tenant(self, tenant: str) -> list[str]:
        """Revoke every key of a tenant; returns their ids."""
        gone = [k.key_id for k in await self.all() if k.tenant == tenant]
        for key_id in gone:
            await self.revoke(key_id)
        return gone
