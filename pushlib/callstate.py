"""Redis state of parked calls, per (call, device), and SIP digest credentials of subscribers.

Keys share the AOR hash tag of pushlib.store so they live on one Redis Cluster slot:

- `pn:{<aor>}:call:<call_key>` hash: call_id, cseq, caller_name, caller_number, deadline, and one
  field `dev:<device_id>` per pushed device (value `pushed` or `woken`); TTL = wait window + margin.
- `pn:{<aor>}:pend:<device_id>` set of call keys the device was pushed for and has not woken for yet.
- `pn:sub:<user>@<domain>` hash: ha1 (MD5 of user:realm:password), realm. Written by the operator
  (or the tests / demo) through `Subscribers`; read by the REGISTER/INVITE digest check.

A second call to the same user gets its own call hash, so it is parked and resumed on its own.
Every method raises `CallStateUnavailable` when Redis cannot be reached (socket timeouts are short).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from pushlib.settings import redis_connection_options

_MARGIN = 60


class CallStateUnavailable(RuntimeError):
    """Redis could not be reached or answered with an error."""


@dataclass(frozen=True)
class ParkedCall:
    aor: str
    key: str
    call_id: str
    cseq: str
    caller_name: str
    caller_number: str
    deadline: float
    pushed: tuple[str, ...] = ()
    woken: tuple[str, ...] = ()


_WAKE_LUA = """
local keys = redis.call('SMEMBERS', KEYS[1])
redis.call('DEL', KEYS[1])
local out = {}
for _, k in ipairs(keys) do
  local ck = ARGV[1] .. k
  if redis.call('EXISTS', ck) == 1 then
    redis.call('HSET', ck, ARGV[2], 'woken')
    table.insert(out, k)
  end
end
return out
"""


def _call_key(aor: str, key: str) -> str:
    return f"pn:{{{aor}}}:call:{key}"


def _pend_key(aor: str, device_id: str) -> str:
    return f"pn:{{{aor}}}:pend:{device_id}"


def connect(redis_url: str, timeout: float = 0.5) -> redis.Redis:
    """A synchronous client with short timeouts, for Kamailio SIP worker processes."""
    return redis.Redis.from_url(
        redis_url, socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=True,
        **redis_connection_options(redis_url),
    )


def _decode(aor: str, key: str, raw_any: Any) -> ParkedCall | None:
    raw: dict[str, str] = {str(k): str(v) for k, v in (raw_any or {}).items()}
    if not raw or "call_id" not in raw:
        return None
    pushed = tuple(sorted(f[4:] for f in raw if f.startswith("dev:")))
    woken = tuple(sorted(f[4:] for f, v in raw.items() if f.startswith("dev:") and v == "woken"))
    return ParkedCall(
        aor=aor,
        key=key,
        call_id=raw["call_id"],
        cseq=raw.get("cseq", ""),
        caller_name=raw.get("caller_name", ""),
        caller_number=raw.get("caller_number", ""),
        deadline=float(raw.get("deadline", "0") or 0),
        pushed=pushed,
        woken=woken,
    )


class CallState:
    """Parked-call bookkeeping used by the KEMI router."""

    def __init__(self, client: redis.Redis) -> None:
        self._r = client
        self._wake = client.register_script(_WAKE_LUA)

    def warm_up(self) -> None:
        """Open the connection and load the wake script now, so the first call does not pay for it."""
        try:
            self._r.script_load(_WAKE_LUA)
        except redis.RedisError as exc:
            raise CallStateUnavailable(str(exc)) from exc

    def park(self, call: ParkedCall, now: float) -> bool:
        """Record a parked call and the devices pushed for it. False if it was already parked."""
        ttl = max(1, int(call.deadline - now) + _MARGIN)
        ck = _call_key(call.aor, call.key)
        try:
            if not self._r.hsetnx(ck, "call_id", call.call_id):
                return False
            pipe = self._r.pipeline(transaction=False)
            fields: dict[Any, Any] = {
                "cseq": call.cseq,
                "caller_name": call.caller_name,
                "caller_number": call.caller_number,
                "deadline": f"{call.deadline:.3f}",
            }
            fields.update({f"dev:{d}": "pushed" for d in call.pushed})
            pipe.hset(ck, mapping=fields)
            pipe.expire(ck, ttl)
            for d in call.pushed:
                pk = _pend_key(call.aor, d)
                pipe.sadd(pk, call.key)
                pipe.expire(pk, ttl)
            pipe.execute()
        except redis.RedisError as exc:
            raise CallStateUnavailable(str(exc)) from exc
        return True

    def get(self, aor: str, key: str) -> ParkedCall | None:
        try:
            raw = self._r.hgetall(_call_key(aor, key))
        except redis.RedisError as exc:
            raise CallStateUnavailable(str(exc)) from exc
        return _decode(aor, key, raw)

    def wake(self, aor: str, device_id: str) -> list[str]:
        """The device re-registered: the keys of the calls it was pushed for and not yet woken for.

        One round trip (a Lua script over keys of one hash-tag slot): clears the device's pending
        set and marks it woken in each call still parked, so a second REGISTER of the same device
        does not add a second branch.
        """
        try:
            keys = self._wake(keys=[_pend_key(aor, device_id)], args=[f"pn:{{{aor}}}:call:", f"dev:{device_id}"])
        except redis.RedisError as exc:
            raise CallStateUnavailable(str(exc)) from exc
        return sorted(str(k) for k in keys)

    def finish(self, aor: str, key: str) -> ParkedCall | None:
        """Atomically end a parked call; None if it had already ended (only one ender wins)."""
        ck = _call_key(aor, key)
        try:
            pipe = self._r.pipeline(transaction=True)
            pipe.hgetall(ck)
            pipe.delete(ck)
            raw, _ = pipe.execute()
            call = _decode(aor, key, raw)
            if call is not None and call.pushed:
                pipe = self._r.pipeline(transaction=False)
                for d in call.pushed:
                    pipe.srem(_pend_key(aor, d), key)
                pipe.execute()
        except redis.RedisError as exc:
            raise CallStateUnavailable(str(exc)) from exc
        return call


def ha1(user: str, realm: str, password: str) -> str:
    return hashlib.md5(f"{user}:{realm}:{password}".encode()).hexdigest()


class Subscribers:
    """SIP digest credentials (HA1 only, never the clear password) per `user@domain`."""

    def __init__(self, client: redis.Redis) -> None:
        self._r = client

    @staticmethod
    def key(user: str, domain: str) -> str:
        return f"pn:sub:{user}@{domain}"

    def set_password(self, user: str, domain: str, password: str, realm: str | None = None) -> None:
        realm = realm or domain
        try:
            self._r.hset(self.key(user, domain), mapping={"ha1": ha1(user, realm, password), "realm": realm})
        except redis.RedisError as exc:
            raise CallStateUnavailable(str(exc)) from exc

    def ha1(self, user: str, domain: str) -> str | None:
        try:
            value = self._r.hget(self.key(user, domain), "ha1")
        except redis.RedisError as exc:
            raise CallStateUnavailable(str(exc)) from exc
        return None if value is None else str(value)

    def remove(self, users: Sequence[tuple[str, str]]) -> None:
        try:
            if users:
                self._r.delete(*(self.key(u, d) for u, d in users))
        except redis.RedisError as exc:
            raise CallStateUnavailable(str(exc)) from exc
