"""Users as API clients and operators see them: which user a reference means, and their devices.

A reference is a plain `user@domain`, or a user uuid mapped to an AOR.

Wazo-style clients name users by uuid (`user_uuid`). The mapping uuid -> AOR lives in Redis
(`schema.user_key`), written with `PUT /1.0/users/{user_uuid}` or `pushlib-admin users map`. A
reference holding `@` is an address of record itself (`user@domain`, `sip:user@domain`) and needs
no mapping. `device_view` is a device as the API and `pushlib-admin --json devices` show it: never
its tokens, only which kinds it has.
"""

from __future__ import annotations

import re
from typing import Any

from pushlib import schema
from pushlib.aor import Aor, AorError, parse_aor
from pushlib.models import Device
from pushlib.notify import push_capable
from pushlib.redisconn import unavailable_on_connection_error

#: A user uuid as this API takes it: a UUID, or any id of 1-128 of [A-Za-z0-9._-] (no `@`).
USER_UUID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def is_aor_ref(ref: str) -> bool:
    return "@" in ref


def check_user_uuid(user_uuid: str) -> str:
    if not USER_UUID.fullmatch(user_uuid):
        raise AorError(f"a user uuid is 1-128 of [A-Za-z0-9._-]: {user_uuid[:80]!r}")
    return user_uuid


def device_view(d: Device, now: float) -> dict[str, Any]:
    p = d.params
    return {"device_id": d.device_id, "provider": p.provider.value, "app_id": p.app_id, "sandbox": p.sandbox,
            "tokens": [k for k, v in (("voip", p.voip_token), ("alert", p.alert_token)) if v],
            "user_agent": d.user_agent, "registered_at": d.registered_at, "expires_at": d.expires_at,
            "quarantined_until": d.quarantined_until, "dead": d.dead, "push_capable": push_capable(d, now)}


class UserMap:
    """uuid -> AOR on a redis.asyncio client (raises StoreUnavailable)."""

    def __init__(self, client: Any) -> None:
        self._r = client

    async def get(self, user_uuid: str) -> Aor | None:
        with unavailable_on_connection_error("user_map"):
            value = await self._r.get(schema.user_key(user_uuid))
        return None if value is None else Aor(str(value))

    async def set(self, user_uuid: str, aor: Aor) -> None:
        with unavailable_on_connection_error("user_map_set"):
            await self._r.set(schema.user_key(check_user_uuid(user_uuid)), aor)

    async def delete(self, user_uuid: str) -> bool:
        with unavailable_on_connection_error("user_map_delete"):
            return bool(await self._r.delete(schema.user_key(user_uuid)))

    async def resolve(self, ref: str) -> Aor | None:
        """The AOR `ref` names: itself when it holds `@` (AorError when malformed), else the
        mapping of a uuid (None when unmapped or not a uuid)."""
        if is_aor_ref(ref):
            return parse_aor(ref)
        if not USER_UUID.fullmatch(ref):
            return None
        return await self.get(ref)
