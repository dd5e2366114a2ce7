"""Tenants: who owns which SIP domains and push apps, and what a tenant-bound API key may touch.

A tenant has an id (`[a-z0-9][a-z0-9_-]{0,62}`), a name, SIP domains (a domain belongs to at most
one tenant) and apps (`<provider>:<app_id>`, at most one tenant each). A key bound to a tenant
(`apikeys.Principal.tenant`) sees the users whose AOR domain is one of the tenant's domains, their
devices, and the tenant's apps; anything else answers as if it did not exist (404). An
operator-wide key (no tenant) sees everything. Apps a tenant-bound key creates become the
tenant's.

Pure decision: `visible`. `TenantStore` keeps the records (`schema`: one hash
tag, so every change is one MULTI transaction, also on Redis Cluster) on a redis.asyncio client.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from pushlib import schema
from pushlib.aor import HOST, aor_parts, ascii_lower
from pushlib.apikeys import Principal
from pushlib.redisconn import unavailable_on_connection_error

TENANT_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
MAX_NAME = 100


class TenantError(ValueError):
    """A tenant request that cannot be honoured: bad id or domain, unknown tenant, taken domain or app."""


@dataclass(frozen=True)
class Tenant:
    tenant_id: str
    name: str = ""
    created_at: float = 0.0
    domains: frozenset[str] = field(default_factory=frozenset)
    apps: frozenset[str] = field(default_factory=frozenset)  # `<provider>:<app_id>`

    def public(self) -> dict[str, Any]:
        return {"tenant_id": self.tenant_id, "name": self.name, "created_at": self.created_at,
                "domains": sorted(self.domains), "apps": sorted(self.apps)}


def check_tenant_id(tenant_id: str) -> str:
    if not TENANT_ID.fullmatch(tenant_id):
        raise TenantError(f"a tenant id is 1-63 of [a-z0-9_-], starting with a letter or digit: {tenant_id[:80]!r}")
    return tenant_id


def check_tenant_name(name: str) -> str:
    if len(name) > MAX_NAME or any(not c.isprintable() for c in name):
        raise TenantError(f"a tenant name is at most {MAX_NAME} printable characters")
    return name


def check_domain(domain: str) -> str:
    host = ascii_lower(domain.strip())
    if not HOST.fullmatch(host):
        raise TenantError(f"not a SIP domain: {domain[:80]!r}")
    return host


def app_ref(provider: str, app_id: str) -> str:
    return schema.app_index_field(provider, app_id)


def visible(principal: Principal, owner: str | None) -> bool:
    """Whether `principal` may see a user or app owned by tenant `owner` (None: no tenant owns it,
    the operator's). A user is owned by the tenant of its AOR's domain."""
    return principal.tenant is None or principal.tenant == owner


class TenantStore:
    """Tenant records and ownership maps on a redis.asyncio client (raises StoreUnavailable)."""

    def __init__(self, client: Any) -> None:
        self._r = client

    async def create(self, tenant_id: str, name: str = "") -> Tenant:
        check_tenant_id(tenant_id)
        check_tenant_name(name)
        now = time.time()
        with unavailable_on_connection_error("create_tenant"):
            if not await self._r.sadd(schema.TENANT_IDS_KEY, tenant_id):
                raise TenantError(f"tenant {tenant_id} exists")
            await self._r.hset(schema.tenant_key(tenant_id), mapping={"name": name, "created_at": repr(now)})
        return Tenant(tenant_id, name, now)

    async def get(self, tenant_id: str) -> Tenant | None:
        with unavailable_on_connection_error("tenant"):
            pipe = self._r.pipeline(transaction=False)
            pipe.sismember(schema.TENANT_IDS_KEY, tenant_id)
            pipe.hgetall(schema.tenant_key(tenant_id))
            pipe.hgetall(schema.TENANT_DOMAINS_KEY)
            pipe.hgetall(schema.TENANT_APPS_KEY)
            member, raw, domains, apps = await pipe.execute()
        if not member:
            return None
        return Tenant(tenant_id, raw.get("name", ""), float(raw.get("created_at", 0) or 0),
                      frozenset(d for d, t in domains.items() if t == tenant_id),
                      frozenset(a for a, t in apps.items() if t == tenant_id))

    async def all(self) -> list[Tenant]:
        with unavailable_on_connection_error("tenants"):
            ids = sorted(await self._r.smembers(schema.TENANT_IDS_KEY))
        found = [await self.get(i) for i in ids]
        return [t for t in found if t is not None]

    async def _require(self, tenant_id: str) -> None:
        with unavailable_on_connection_error("tenant"):
            if not await self._r.sismember(schema.TENANT_IDS_KEY, tenant_id):
                raise TenantError(f"no tenant {tenant_id[:80]}")

    async def delete(self, tenant_id: str) -> bool:
        """Remove a tenant and its ownership of domains and apps (the apps themselves stay, now the
        operator's). Its API keys are revoked by the caller (`ApiKeyStore.revoke_tenant`)."""
        tenant = await self.get(tenant_id)
        if tenant is None:
            return False
        with unavailable_on_connection_error("delete_tenant"):
            pipe = self._r.pipeline(transaction=True)
            pipe.srem(schema.TENANT_IDS_KEY, tenant_id)
            pipe.delete(schema.tenant_key(tenant_id))
            if tenant.domains:
                pipe.hdel(schema.TENANT_DOMAINS_KEY, *tenant.domains)
            if tenant.apps:
                pipe.hdel(schema.TENANT_APPS_KEY, *tenant.apps)
            await pipe.execute()
        return True

    async def add_domain(self, tenant_id: str, domain: str) -> str:
        host = check_domain(domain)
        await self._require(tenant_id)
        with unavailable_on_connection_error("add_domain"):
            if not await self._r.hsetnx(schema.TENANT_DOMAINS_KEY, host, tenant_id):
                owner = await self._r.hget(schema.TENANT_DOMAINS_KEY, host)
                if owner != tenant_id:
                    raise TenantError(f"domain {host} belongs to tenant {owner}")
        return host

    async def remove_domain(self, tenant_id: str, domain: str) -> bool:
        host = check_domain(domain)
        with unavailable_on_connection_error("remove_domain"):
            if await self._r.hget(schema.TENANT_DOMAINS_KEY, host) != tenant_id:
                return False
            return bool(await self._r.hdel(schema.TENANT_DOMAINS_KEY, host))

    async def add_app(self, tenant_id: str, provider: str, app_id: str) -> None:
        """Give the app `<provider>:<app_id>` to the tenant (TenantError when another tenant owns it)."""
        await self._require(tenant_id)
        ref = app_ref(provider, app_id)
        with unavailable_on_connection_error("add_tenant_app"):
            if not await self._r.hsetnx(schema.TENANT_APPS_KEY, ref, tenant_id):
                owner = await self._r.hget(schema.TENANT_APPS_KEY, ref)
                if owner != tenant_id:
                    raise TenantError(f"app {ref} belongs to tenant {owner}")

    async def remove_app(self, tenant_id: str | None, provider: str, app_id: str) -> bool:
        """Drop the tenant's ownership of an app (`tenant_id` None: whoever owns it)."""
        ref = app_ref(provider, app_id)
        with unavailable_on_connection_error("remove_tenant_app"):
            owner = await self._r.hget(schema.TENANT_APPS_KEY, ref)
            if owner is None or (tenant_id is not None and owner != tenant_id):
                return False
            return bool(await self._r.hdel(schema.TENANT_APPS_KEY, ref))

    async def owner_of_domain(self, domain: str) -> str | None:
        with unavailable_on_connection_error("domain_owner"):
            owner = await self._r.hget(schema.TENANT_DOMAINS_KEY, ascii_lower(domain))
        return None if owner is None else str(owner)

    async def owner_of_user(self, aor: str) -> str | None:
        return await self.owner_of_domain(aor_parts(aor)[1])

    async def owner_of_app(self, provider: str, app_id: str) -> str | None:
        with unavailable_on_connection_error("app_owner"):
            owner = await self._r.hget(schema.TENANT_APPS_KEY, app_ref(provider, app_id))
        return None if owner is None else str(owner)

    async def app_owners(self) -> dict[str, str]:
        with unavailable_on_connection_error("app_owners"):
            return dict(await self._r.hgetall(schema.TENANT_APPS_KEY))
