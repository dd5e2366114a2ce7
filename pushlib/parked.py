"""Parked-call bookkeeping in Redis for the Kamailio SIP workers, per (call, device).

Keys (`schema.call_key`, `schema.pending_key`) share the AOR's hash tag with the devices, so
they live in one Redis Cluster slot and one script can touch them together. A second call to the
same user gets its own call hash, so it is parked and resumed on its own.

Uses the SIP worker's shared sync client (`redisconn.sync_client`, short timeouts); every method
raises `StoreUnavailable` when Redis cannot serve it.
"""

from __future__ import annotations

from typing import Any

import redis

from pushlib import schema
from pushlib.models import ParkedCall, PushJob
from pushlib.redisconn import is_cluster, unavailable_on_error
from pushlib.settings import Settings

# KEYS[1]: the device's pending set. ARGV[1]: the prefix of the AOR's call keys, ARGV[2]: the
# device's field in a call hash, ARGV[3]: its woken state. Returns the keys of the calls still parked.
_WAKE_LUA = """
local keys = redis.call('SMEMBERS', KEYS[1])
redis.call('DEL', KEYS[1])
local out = {}
for _, k in ipairs(keys) do
  local ck = ARGV[1] .. k
  if redis.call('EXISTS', ck) == 1 then
    redis.call('HSET', ck, ARGV[2], ARGV[3])
    table.insert(out, k)
  end
end
return out
"""


class ParkedCalls:
    """Park, wake and finish calls (used by the KEMI router)."""

    def __init__(self, client: Any) -> None:
        self._r = client
        self._cluster = is_cluster(client)
        self._wake = client.register_script(_WAKE_LUA)
        self._park = client.register_script(schema.PARK_LUA)
        self._finish = client.register_script(schema.FINISH_LUA)

    def warm_up(self) -> None:
        """Open the connection and load the scripts now, so the first call does not pay for it (on
        a cluster: on every master)."""
        with unavailable_on_error("parked warm_up"):
            for script in (_WAKE_LUA, schema.PARK_LUA, schema.FINISH_LUA):
                self._r.script_load(script)

    def park(self, call: ParkedCall, now: float) -> bool:
        """Record a parked call and the devices pushed for it (one round trip). False if it was
        already parked."""
        fields = [x for kv in schema.encode_parked_call(call).items() for x in kv]
        with unavailable_on_error("park"):
            done = self._park(
                keys=[schema.call_key(call.aor, call.key)],
                args=[schema.parked_ttl(call.deadline, now), schema.pending_key(call.aor, ""), call.key,
                      len(call.pushed), *call.pushed, *fields],
            )
        return bool(done)

    def park_and_push(self, call: ParkedCall, job: PushJob, settings: Settings, now: float) -> None:
        """`park`, then queue the call's push job: one round trip for both (a pipeline; the job
        stream and the call's keys live in different Cluster slots, so not one script). The
        script goes by its digest (loaded by `warm_up`; loaded again once if Redis lost it).

        On a Redis Cluster two round trips, park then queue: redis-py's cluster pipelines refuse
        EVALSHA (a NOSCRIPT is per node), and the two keys are on different nodes anyway. The
        job is queued whatever `park` answers, as in the pipeline."""
        fields = [x for kv in schema.encode_parked_call(call).items() for x in kv]
        park_args = [schema.parked_ttl(call.deadline, now), schema.pending_key(call.aor, ""), call.key,
                     len(call.pushed), *call.pushed, *fields]
        ck = schema.call_key(call.aor, call.key)
        if self._cluster:
            with unavailable_on_error("park_and_push"):
                self._park(keys=[ck], args=park_args)
                self._r.xadd(settings.stream, schema.encode_job(job), maxlen=settings.stream_maxlen,
                             approximate=True)
            return
        with unavailable_on_error("park_and_push"):
            pipe = self._r.pipeline(transaction=False)
            pipe.evalsha(self._park.sha, 1, ck, *park_args)
            pipe.xadd(settings.stream, schema.encode_job(job), maxlen=settings.stream_maxlen, approximate=True)
            parked, queued = pipe.execute(raise_on_error=False)
            if isinstance(queued, Exception):
                raise queued
            if isinstance(parked, redis.exceptions.NoScriptError):
                self._park(keys=[ck], args=park_args)  # (loads the script; the job is queued already)
            elif isinstance(parked, Exception):
                raise parked

    def add_pushed(self, aor: str, key: str, device_id: str, now: float) -> bool:
        """Add a device pushed later in the life of a parked call (a directly rung phone that
        stayed silent). False when the call has ended or the device was already pushed for it."""
        ck = schema.call_key(aor, key)
        with unavailable_on_error("add_pushed"):
            deadline = self._r.hget(ck, "deadline")
            if deadline is None or not self._r.hsetnx(ck, schema.parked_device_field(device_id), schema.PUSHED):
                return False
            pk = schema.pending_key(aor, device_id)
            pipe = self._r.pipeline(transaction=False)
            pipe.sadd(pk, key)
            pipe.expire(pk, schema.parked_ttl(float(deadline), now))
            pipe.execute()
        return True

    def wake(self, aor: str, device_id: str) -> list[str]:
        """The device re-registered: the keys of the calls it was pushed for and not yet woken for.

        One round trip (a Lua script over keys of one hash-tag slot): clears the device's pending
        set and marks it woken in each call still parked, so a second REGISTER of the same device
        does not add a second branch.
        """
        pending, *args = schema.wake_args(aor, device_id)
        with unavailable_on_error("wake"):
            keys = self._wake(keys=[pending], args=args)
        return sorted(str(k) for k in keys)

    def finish(self, aor: str, key: str) -> ParkedCall | None:
        """Atomically end a parked call (one round trip); None if it had already ended (only one
        ender wins)."""
        with unavailable_on_error("finish"):
            flat = self._finish(keys=[schema.call_key(aor, key)],
                                args=[schema.PARKED_DEVICE_PREFIX, schema.pending_key(aor, ""), key])
        return schema.decode_parked_call(aor, key, schema.pairs_to_dict(flat))

    def asleep(self, aor: str, key: str) -> int:
        """How many devices pushed for a parked call have not woken yet (0 also when the call has
        ended)."""
        call = self.parked(aor, key)
        return 0 if call is None else len(set(call.pushed) - set(call.woken))

    def parked(self, aor: str, key: str) -> ParkedCall | None:
        """The parked call's record (None once it has ended)."""
        with unavailable_on_error("parked"):
            raw = self._r.hgetall(schema.call_key(aor, key))
        return schema.decode_parked_call(aor, key, raw)
