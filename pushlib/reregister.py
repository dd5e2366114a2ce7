"""Re-registration pushes (RFC 8599 §4.1.3/§5.6): a push device whose binding nears its expiry
without a refresh gets a background push (`registrationRefresh`: APNs `background`, priority 5,
content-available only, to the remote token; FCM data-only, normal priority) asking its app to
re-REGISTER. Never a VoIP push: iOS kills apps whose VoIP pushes report no call.

How (no scan of Redis keyspace, ever):
- each push REGISTER (router, `schedule`) ZADDs the device to one sorted set, `pn:rereg` (DUE_KEY),
  member `json([aor, device_id])`, score = when its refresh push is due (`due_at`): the binding's
  expiry minus the lead (REREGISTER_PUSH_BEFORE, at most half the binding's lifetime, so a short
  registration is never pushed the moment it is made). A refresh REGISTER moves the score; an
  unREGISTER (`unschedule`) removes the member;
- every dispatcher runs `Dispatcher._reregister` every SCAN_SECONDS: CLAIM_DUE_LUA takes the due
  members (ZRANGEBYSCORE -inf now LIMIT n) and removes them (ZREM) in one atomic script, so of
  several dispatchers exactly one gets each member: at most one push per binding and expiry
  period. The member comes back only with the device's next REGISTER. Nothing due: one command
  per dispatcher and tick (60 a minute); due members: one script per CLAIM_BATCH of them.
- a device that does not answer is not pushed again: its binding expires (usrloc), its record
  expires (Redis TTL), the dispatcher skips a device whose record is gone or already expired.
  A claim whose dispatcher dies before pushing loses that one push (at most once, by design: the
  binding then expires as it would have without the feature).

RFC 8599 §4.1.4: a UA that can wake itself to refresh puts `+sip.pnsreg` in its Contact; the 2xx
then carries the `+sip.pnsreg="<seconds>"` feature-capability indicator (`with_pnsreg`): refresh
at least that long before the expiry. We push such a UA too if its refresh does not come by then
(a suspended app's timer does not run: the push is the safety net, as OpenSIPS's
`pn_trigger_interval`). Without the tag the push is the refresh mechanism (§4.1.3) and no
indicator is sent.

The sorted set is one key (one Redis Cluster slot): ~100 bytes per push device, removed as
claimed. `bench/reregister_bench.py` measures the scan with 100,000 devices.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from pushlib import params
from pushlib.models import PushJob, PushKind
from pushlib.redisconn import unavailable_on_connection_error, unavailable_on_error

DUE_KEY = "pn:rereg"
#: how often each dispatcher looks for due devices (seconds): a push lands at most this late
SCAN_SECONDS = 1.0
#: members claimed per script call; a tick claims until a call returns fewer
CLAIM_BATCH = 500
#: claims per tick at most (a backlog after an outage drains over several ticks)
CLAIM_MAX_BATCHES = 20
PNSREG_TAG = "+sip.pnsreg"

#: KEYS[1]: DUE_KEY. ARGV: [1] now (epoch seconds), [2] how many at most. Returns the due members
#: with their scores (member, score, ...) after removing them: whoever gets a member owns its push.
CLAIM_DUE_LUA = """#!lua
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
for i = 1, #due, 2 do redis.call('ZREM', KEYS[1], due[i]) end
return due
"""


def lead(before: float, lifetime: float) -> int:
    """Seconds before a binding's expiry its refresh push is due: REREGISTER_PUSH_BEFORE (`before`),
    at most half the binding's `lifetime`; 0 = no push (feature off, or no lifetime)."""
    if before <= 0 or lifetime <= 0:
        return 0
    return max(1, int(min(before, lifetime / 2)))


def due_at(registered_at: float, expires_at: float, before: float) -> float | None:
    """When the refresh push of a binding saved at `registered_at` and expiring at `expires_at`
    is due (None: never)."""
    ahead = lead(before, expires_at - registered_at)
    return expires_at - ahead if ahead else None


def member(aor: str, device_id: str) -> str:
    return json.dumps([aor, device_id], separators=(",", ":"), ensure_ascii=False)


def parse_member(raw: str) -> tuple[str, str] | None:
    """(aor, device_id) of a DUE_KEY member; None for anything else (never raises)."""
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    if (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) and v for v in value)):
        return value[0], value[1]
    return None


def asks_pnsreg(contact: str) -> bool:
    """Whether a REGISTER's Contact carries the `+sip.pnsreg` media feature tag (RFC 8599 §4.1.4:
    its UA can refresh by itself)."""
    try:
        return PNSREG_TAG in params.parse_name_addr(contact).header_params()
    except params.MalformedPushParams:
        return False


def with_pnsreg(feature_caps: str, contact: str, before: float, lifetime: float) -> str:
    """The REGISTER 2xx Feature-Caps value, with `+sip.pnsreg="<lead>"` when the UA asked for it
    (`asks_pnsreg`) and re-registration pushes are on."""
    ahead = lead(before, lifetime)
    if not ahead or not asks_pnsreg(contact):
        return feature_caps
    return f'{feature_caps};{PNSREG_TAG}="{ahead}"'


def refresh_job(aor: str, device_id: str, due: float, expires_at: float, now: float) -> PushJob:
    """The push job of one claimed device: its deadline is the binding's expiry (a refresh after it
    is useless: the binding is gone); its id derives from the device and due time, so it is one
    job per binding and period."""
    digest = hashlib.sha1(f"{aor}|{device_id}|{due:.3f}".encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return PushJob(job_id=digest, kind=PushKind.REGISTRATION_REFRESH, aor=aor, deadline=expires_at,
                   device_ids=(device_id,), data={"aor": aor}, created_at=now)


def parse_claimed(flat: Sequence[Any]) -> list[tuple[str, str, float]]:
    """CLAIM_DUE_LUA's reply as (aor, device_id, due); members that do not parse are dropped."""
    out: list[tuple[str, str, float]] = []
    for i in range(0, len(flat) - 1, 2):
        parsed = parse_member(str(flat[i]))
        if parsed is not None:
            out.append((parsed[0], parsed[1], float(flat[i + 1])))
    return out


# --------------------------------------------------------------------------- Redis


def schedule(client: Any, aor: str, device_id: str, due: float) -> None:
    """(SIP worker, sync client) The device's refresh push is due at `due` (replaces its previous
    due time). Raises StoreUnavailable."""
    with unavailable_on_error("reregister_schedule"):
        client.zadd(DUE_KEY, {member(aor, device_id): due})


def unschedule(client: Any, aor: str, device_ids: Sequence[str]) -> None:
    """(SIP worker) No refresh push for these devices (unregistered, evicted). Raises StoreUnavailable."""
    if device_ids:
        with unavailable_on_error("reregister_unschedule"):
            client.zrem(DUE_KEY, *(member(aor, d) for d in device_ids))


class Claimer:
    """(dispatcher, async client) Takes due devices out of DUE_KEY (CLAIM_DUE_LUA)."""

    def __init__(self, client: Any) -> None:
        self._r = client
        self._claim = client.register_script(CLAIM_DUE_LUA)

    async def claim(self, now: float, limit: int = CLAIM_BATCH) -> list[tuple[str, str, float]]:
        """Due devices (aor, device_id, due), at most `limit`, now owned by the caller. Raises
        StoreUnavailable on a connection failure."""
        with unavailable_on_connection_error("reregister_claim"):
            flat = await self._claim(keys=[DUE_KEY], args=[repr(float(now)), limit])
        return parse_claimed(flat)
