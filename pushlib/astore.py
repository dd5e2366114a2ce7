"""The asyncio Redis store used by the push dispatcher (redis.asyncio): the async side of the data layer.

Same keys and serialisation as the sync side (`pushlib.store.SyncStore`; both use `pushlib.schema`),
and what the dispatcher needs: the job stream (consumer group, reclaim, ack), its target devices
with their idempotency marks, app credentials, and the outcome helpers (dead tokens, device
quarantine, per-app error and environment status). Connection failures and timeouts raise
`redisconn.StoreUnavailable`; a server's error reply passes through (the dispatcher tells them apart).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from redis.exceptions import ClusterDownError, NoScriptError, ResponseError, TryAgainError

from pushlib import schema
from pushlib.logutil import token_prefix
from pushlib.models import AppCredentials, Device
from pushlib.redisconn import async_client, is_cluster, unavailable_on_connection_error
from pushlib.schema import SENT_MARK_TTL
from pushlib.settings import Settings

log = logging.getLogger(__name__)

QUARANTINE_SECONDS = 24 * 3600
# Sliding window used to suspect a wrong APNs environment (sandbox vs production) for an app.
ENV_WINDOW_PUSHES = 100
ENV_SUSPECT_MIN_BAD = 5

# Remove one dead token from a device; when no token is left, keep the device as a tombstone:
# its hash (with its TTL) and its member of the AOR set stay, every token gone, `dead` = "1" (the
# SIP side sees the phone's binding is dead, drops it and deletes the record; a REGISTER of the
# device replaces the hash). KEYS[1]: the device hash. ARGV[1]: the dead token, ARGV[2]: the dead
# field's name. Returns 0 (token not on the device any more: no-op), 1 (token removed, another
# left), 2 (no token left: the device is now dead).
_REMOVE_TOKEN = """
local field = nil
if redis.call('hget', KEYS[1], 'voip_token') == ARGV[1] then field = 'voip_token'
elseif redis.call('hget', KEYS[1], 'alert_token') == ARGV[1] then field = 'alert_token' end
if not field then return 0 end
redis.call('hdel', KEYS[1], field)
if redis.call('hexists', KEYS[1], 'voip_token') == 0
   and redis.call('hexists', KEYS[1], 'alert_token') == 0 then
  redis.call('hset', KEYS[1], ARGV[2], '1')
  return 2
end
return 1
"""

# Set a field only on an existing device hash: HSET alone would resurrect an expired device
# as a key without TTL.
_SET_IF_EXISTS = """
if redis.call('exists', KEYS[1]) == 1 then
  redis.call('hset', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
"""

# A job's target devices and, for each, whether the provider already accepted this job's push to
# it: one round trip instead of SMEMBERS + HGETALL pipeline + one EXISTS per device.
# KEYS[1]: the AOR's device set. ARGV[1]: device key prefix, ARGV[2]: the job's sent-mark prefix
# (both under the AOR's hash tag, so every key is in KEYS[1]'s slot, also on Redis Cluster),
# ARGV[3..]: the wanted device ids (none: all). Returns one JSON string
# `[[id, {field: value...}, sent 0|1], ...]`: parsing one string is far cheaper for redis-py than
# a nested reply of ~25 bulk strings per device. Ids whose hash expired are removed from the set
# on the way (as `devices` does).
_JOB_DEVICES = """
local wanted = nil
if #ARGV > 2 then
  wanted = {}
  for i = 3, #ARGV do wanted[ARGV[i]] = true end
end
local out, stale = {}, {}
for _, id in ipairs(redis.call('smembers', KEYS[1])) do
  if wanted == nil or wanted[id] then
    local h = redis.call('hgetall', ARGV[1] .. id)
    if #h == 0 then
      stale[#stale + 1] = id
    else
      local fields = {}
      for i = 1, #h, 2 do fields[h[i]] = h[i + 1] end
      out[#out + 1] = cjson.encode({id, fields, redis.call('exists', ARGV[2] .. id)})
    end
  elseif redis.call('exists', ARGV[1] .. id) == 0 then
    stale[#stale + 1] = id
  end
end
if #stale > 0 then redis.call('srem', KEYS[1], unpack(stale)) end
return '[' .. table.concat(out, ',') .. ']'
"""

# XREADGROUP without blocking, answered as one JSON string `[[id, {field: value...}], ...]`:
# redis-py parses the plain reply (~16 bulk strings per entry) about five times slower. Same
# effect on the group as XREADGROUP (entries enter the consumer's pending list). Scripts cannot
# block, so the dispatcher only uses this while a backlog is likely. KEYS[1]: the stream.
# ARGV: group, consumer, count.
_READ_NOWAIT = """
local reply = redis.call('xreadgroup', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', KEYS[1], '>')
if not reply then return '[]' end
local out = {}
for _, entry in ipairs(reply[1][2]) do
  local fields, flat = {}, entry[2]
  for i = 1, #flat, 2 do fields[flat[i]] = flat[i + 1] end
  out[#out + 1] = cjson.encode({entry[1], fields})
end
return '[' .. table.concat(out, ',') .. ']'
"""


class AsyncStore:
    """The dispatcher's reads and writes (see module doc)."""

    def __init__(self, redis_url: str, settings: Settings) -> None:
        self.settings = settings
        # Its socket timeout (redisconn.DISPATCHER_SOCKET_TIMEOUT) exceeds the XREADGROUP block time.
        self._r: Any = async_client(redis_url)
        self._cluster = is_cluster(self._r)
        self._remove_token = self._r.register_script(_REMOVE_TOKEN)
        self._set_if_exists = self._r.register_script(_SET_IF_EXISTS)
        self._job_devices = self._r.register_script(_JOB_DEVICES)
        self._read_nowait = self._r.register_script(_READ_NOWAIT)

    @property
    def client(self) -> Any:
        """The underlying redis.asyncio client, for the dispatcher's other Redis users
        (`reregister.Claimer`): one connection pool per dispatcher."""
        return self._r

    async def aclose(self) -> None:
        await self._r.aclose()

    # --- devices, apps ---------------------------------------------------------------------------

    async def job_devices_many(
        self, requests: Sequence[tuple[str, str, Sequence[str]]]
    ) -> list[list[tuple[Device, bool]]]:
        """For each (aor, job_id, device_ids): the job's target devices (`device_ids`, or all of
        the AOR's when empty) ordered by registered_at, each with True when `mark_sent_many`
        marked (job, device). One round trip (pipelined EVALSHA, not atomic across requests);
        answers in request order. Ids whose hash expired are removed from the AOR's set on the
        way (as `SyncStore.devices` does)."""
        with unavailable_on_connection_error("job_devices"):
            replies = await self._eval_job_devices(requests)
            if any(isinstance(r, NoScriptError) for r in replies):
                # Redis restarted or its script cache was flushed: load it once and ask again
                # (the script only reads, and drops already-expired ids: safe to repeat).
                await self._r.script_load(_JOB_DEVICES)
                replies = await self._eval_job_devices(requests)
        answers: list[list[tuple[Device, bool]]] = []
        for (aor, _, _), reply in zip(requests, replies, strict=True):
            if isinstance(reply, Exception):
                raise reply
            answers.append(_decoded_job_devices(aor, json.loads(reply)))
        return answers

    async def _eval_job_devices(self, requests: Sequence[tuple[str, str, Sequence[str]]]) -> list[Any]:
        # Plain EVALSHA: a registered Script object would add a SCRIPT EXISTS round trip.
        args = [(self._job_devices.sha, 1, schema.devices_key(aor), schema.device_key(aor, ""),
                 schema.sent_key(aor, job_id, ""), *device_ids) for aor, job_id, device_ids in requests]
        if len(args) == 1:
            # An idle dispatcher's lookup: redis-py's pipeline machinery costs ~50 us more than
            # a direct call, on every push's path. A command error is answered as the pipeline
            # would (raise_on_error=False); connection errors raise in both cases.
            return [await self._evalsha_or_error(args[0])]
        if self._cluster:
            # redis-py's cluster pipelines refuse EVALSHA; concurrent calls, each routed to the
            # node of its AOR, cost about one round trip too.
            return list(await asyncio.gather(*(self._evalsha_or_error(one) for one in args)))
        pipe = self._r.pipeline(transaction=False)
        for one in args:
            pipe.evalsha(*one)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    async def _evalsha_or_error(self, args: Sequence[Any]) -> Any:
        """EVALSHA's reply, or the server's error reply as an exception object (as a pipeline with
        raise_on_error=False answers); connection errors raise."""
        try:
            return await self._r.evalsha(*args)
        except ResponseError as exc:
            if isinstance(exc, ClusterDownError | TryAgainError):  # an outage, not a reply
                raise
            return exc

    async def app(self, provider: str, app_id: str) -> AppCredentials | None:
        """The app a device names by `app_id`, its own id or one of its aliases, in one HGETALL
        (an alias's key holds a copy of its app: the answer's `app_id` is the app's own)."""
        with unavailable_on_connection_error("app"):
            raw = await self._r.hgetall(schema.app_key(provider, app_id))
        return schema.decode_or_log(schema.decode_app, raw, provider, app_id) if raw else None

    async def parked_device_state(self, aor: str, key: str, device_id: str) -> str | None:
        """The state of `device_id` in the call parked as `key` (`calls.call_key`) for `aor`:
        `schema.PUSHED` until the device re-registers, then `schema.WOKEN`; None when the call is
        no longer parked (its hash is deleted when it ends) or does not list the device."""
        with unavailable_on_connection_error("parked_device_state"):
            state = await self._r.hget(schema.call_key(aor, key), schema.parked_device_field(device_id))
        return None if state is None else str(state)

    # --- outcome helpers ------------------------------------------------------------------------

    async def remove_token(self, aor: str, device_id: str, token: str) -> bool:
        """A provider said `token` is dead: remove it from the device. When no token is left the
        device stays as a tombstone (`Device.dead`, `schema.DEVICE_DEAD_FIELD`): same TTL, no
        token, never pushed, so the SIP side can see that the phone's binding is dead. Idempotent:
        False when the token is no longer on the device (already removed, or the device
        re-registered with a new one)."""
        with unavailable_on_connection_error("remove_token"):
            result = int(await self._remove_token(
                keys=[schema.device_key(aor, device_id)], args=[token, schema.DEVICE_DEAD_FIELD],
            ))
        if result:
            log.info("store: dead token removed aor=%s device=%s token=%s%s", aor, device_id,
                     token_prefix(token), " (no token left: device marked dead)" if result == 2 else "")
        return result > 0

    async def quarantine_device(self, aor: str, device_id: str, now: float | None = None) -> bool:
        """Skip this device for QUARANTINE_SECONDS (its next REGISTER clears it). False when the
        device no longer exists."""
        until = (time.time() if now is None else now) + QUARANTINE_SECONDS
        with unavailable_on_connection_error("quarantine_device"):
            done = int(await self._set_if_exists(
                keys=[schema.device_key(aor, device_id)], args=["quarantined_until", repr(until)],
            ))
        if done:
            log.warning("store: device quarantined aor=%s device=%s until=%.0f", aor, device_id, until)
        return bool(done)

    async def mark_sent_many(self, marks: Iterable[tuple[str, str, str]], ttl: int = SENT_MARK_TTL) -> None:
        """Record that the provider accepted these (aor, job_id, device_id) pushes, so a reclaimed
        job skips them. One round trip; all are written when this returns (not atomically: each
        mark stands alone)."""
        with unavailable_on_connection_error("mark_sent"):
            pipe = self._r.pipeline(transaction=False)
            for aor, job_id, device_id in marks:
                pipe.set(schema.sent_key(aor, job_id, device_id), "1", ex=ttl)
            await pipe.execute()

    async def record_outcomes(
        self,
        counts: Mapping[tuple[str, str, str], int],
        windows: Mapping[tuple[str, str], Iterable[str]],
        check: Collection[tuple[str, str]] = (),
        now: float | None = None,
        *,
        increments: Mapping[tuple[str, str], int | float] | None = None,
    ) -> list[tuple[str, str]]:
        """Count final push outcomes and feed the environment-suspicion windows: add `counts`
        ((provider, app_id, outcome value) -> n) to the apps' counters, push `windows` ((provider,
        app_id) -> `schema.window_entry`s, oldest first) onto their sliding windows, then evaluate
        the environment suspicion of the apps in `check` (those that just got a BadDeviceToken):
        an app is flagged when most of its recent pushes got BadDeviceToken (Apple answers that
        when sandbox/production are mixed up). One round trip (plus one per newly flagged app);
        returns the apps this call flagged. `increments`: (hash key, field) -> amount added in the
        same round trip (the dispatcher's `metrics.MetricsBuffer`; a float adds with HINCRBYFLOAT)."""
        now = time.time() if now is None else now
        # Not MULTI: the apps' keys live in different slots on a cluster, and nothing here
        # needs all-or-nothing (a counter or window entry more or less is harmless).
        with unavailable_on_connection_error("record_outcome"):
            pipe = self._r.pipeline(transaction=False)
            for (key, name), amount in (increments or {}).items():
                if isinstance(amount, float):
                    pipe.hincrbyfloat(key, name, amount)
                else:
                    pipe.hincrby(key, name, amount)
            for (provider, app_id, outcome), n in counts.items():
                pipe.hincrby(schema.app_status_key(provider, app_id), f"count:{outcome}", n)
            for provider, app_id in dict.fromkeys((p, a) for p, a, _ in counts):
                pipe.expire(schema.app_status_key(provider, app_id), schema.APP_STATUS_TTL)
            for (provider, app_id), entries in windows.items():
                newest = list(entries)[-ENV_WINDOW_PUSHES:]  # older ones would be trimmed anyway
                if not newest:
                    continue
                wkey = schema.app_window_key(provider, app_id)
                pipe.lpush(wkey, *newest)
                pipe.ltrim(wkey, 0, ENV_WINDOW_PUSHES - 1)
                pipe.expire(wkey, schema.ENV_WINDOW_SECONDS)
            checked = list(dict.fromkeys(check))
            for provider, app_id in checked:
                pipe.lrange(schema.app_window_key(provider, app_id), 0, -1)
            results = await pipe.execute()
            flagged: list[tuple[tuple[str, str], str]] = []
            for (provider, app_id), window in zip(checked, results[len(results) - len(checked):], strict=True):
                total, n_bad = schema.env_suspicious(window, now)
                if n_bad < ENV_SUSPECT_MIN_BAD or n_bad * 2 <= total:
                    continue
                message = (f"{n_bad} of the last {total} pushes got BadDeviceToken: the app's APNs "
                           f"environment (sandbox/production) is probably wrong")
                skey = schema.app_status_key(provider, app_id)
                if await self._r.hsetnx(skey, "env_suspect", message):
                    await self._r.hset(skey, "env_suspect_at", repr(now))
                    await self._r.expire(skey, schema.APP_STATUS_TTL)
                    flagged.append(((provider, app_id), message))
        for (provider, app_id), message in flagged:
            log.warning("store: app %s:%s %s", provider, app_id, message)
        return [app for app, _ in flagged]

    async def record_app_error(self, provider: str, app_id: str, text: str, now: float | None = None) -> None:
        """Keep the app's last configuration error (text + time) for operators (the status hash's
        TTL is refreshed: see schema.APP_STATUS_TTL)."""
        now = time.time() if now is None else now
        skey = schema.app_status_key(provider, app_id)
        with unavailable_on_connection_error("record_app_error"):
            pipe = self._r.pipeline(transaction=False)
            pipe.hset(skey, mapping={"last_error": text[:500], "last_error_at": repr(now)})
            pipe.expire(skey, schema.APP_STATUS_TTL)
            await pipe.execute()

    # --- job stream -------------------------------------------------------------------------------

    async def ensure_group(self) -> None:
        """Create the consumer group (and the stream) if missing; jobs queued before the group
        existed are read too (their deadline decides whether they are still sent)."""
        try:
            with unavailable_on_connection_error("ensure_group"):
                await self._r.xgroup_create(self.settings.stream, self.settings.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read_new(self, consumer: str, count: int, block_ms: int) -> list[tuple[str, dict[str, str]]]:
        """New entries for this consumer (they enter its pending list)."""
        with unavailable_on_connection_error("read_new"):
            reply = await self._r.xreadgroup(
                self.settings.group, consumer, {self.settings.stream: ">"}, count=count, block=block_ms,
            )
        return [(eid, fields or {}) for _, entries in (reply or []) for eid, fields in entries]

    async def read_new_nowait(self, consumer: str, count: int) -> list[tuple[str, dict[str, str]]]:
        """`read_new` without blocking (an empty list when nothing is waiting); cheaper to
        parse, for when a backlog is likely."""
        with unavailable_on_connection_error("read_new"):
            reply: str = await self._read_nowait(
                keys=[self.settings.stream], args=[self.settings.group, consumer, count],
            )
        # cjson encodes an entry without fields as an empty object: still a dict.
        return [(str(eid), fields) for eid, fields in json.loads(reply)]

    async def reclaim(
        self, consumer: str, min_idle_ms: int, start: str, count: int
    ) -> tuple[str, list[tuple[str, dict[str, str]]], list[str]]:
        """XAUTOCLAIM entries idle longer than `min_idle_ms`: (next start, entries, ids of entries
        already deleted from the stream, which the caller acks)."""
        with unavailable_on_connection_error("reclaim"):
            reply = await self._r.xautoclaim(
                self.settings.stream, self.settings.group, consumer, min_idle_ms, start_id=start, count=count,
            )
        next_start, entries = reply[0], reply[1]
        deleted = list(reply[2]) if len(reply) > 2 else []
        live = [(eid, fields) for eid, fields in entries if fields]
        deleted += [eid for eid, fields in entries if not fields]
        return str(next_start), live, deleted

    async def touch(self, consumer: str, entry_ids: list[str]) -> None:
        """Reset the idle time of entries this consumer is still working on, so another
        dispatcher's reclaim sweep does not take them over."""
        if not entry_ids:
            return
        with unavailable_on_connection_error("touch"):
            await self._r.xclaim(
                self.settings.stream, self.settings.group, consumer, 0, entry_ids, justid=True,
            )

    async def finish(self, entry_ids: list[str]) -> None:
        """Final outcome reached: ack and delete the entries (the stream keeps only live work)."""
        if not entry_ids:
            return
        with unavailable_on_connection_error("finish"):
            pipe = self._r.pipeline(transaction=True)
            pipe.xack(self.settings.stream, self.settings.group, *entry_ids)
            pipe.xdel(self.settings.stream, *entry_ids)
            await pipe.execute()

    async def mark_sent_and_finish(
        self, marks: Sequence[tuple[str, str, str]], entry_ids: Sequence[str], ttl: int = SENT_MARK_TTL
    ) -> None:
        """`mark_sent_many(marks)` and `finish(entry_ids)` as one script call per chunk, in one
        round trip: marks and acks of a batch are written together, all or nothing (so an entry is
        never acked without the marks written with it). A SET per mark and a MULTI per ack cost
        the dispatcher a quarter of its Redis time. On a Redis Cluster (marks and stream on other
        nodes) it is the two calls, one after the other."""
        if self._cluster:
            await self.mark_sent_many(marks, ttl)
            await self.finish(list(entry_ids))
            return
        keys = [schema.sent_key(aor, job_id, device_id) for aor, job_id, device_id in marks]
        calls: list[tuple[Any, ...]] = []
        stream, group = self.settings.stream, self.settings.group
        for i in range(0, max(len(keys), len(entry_ids)), _BATCH_CHUNK):
            chunk_keys, chunk_ids = keys[i:i + _BATCH_CHUNK], entry_ids[i:i + _BATCH_CHUNK]
            calls.append((_MARK_AND_ACK_SHA, 1 + len(chunk_keys), stream, *chunk_keys, ttl, group, *chunk_ids))
        if calls:
            with unavailable_on_connection_error("mark_sent_and_finish"):
                await self._evalsha_loading(calls, _MARK_AND_ACK)

    async def job_devices_batch(
        self, requests: Sequence[tuple[str, str, Sequence[str]]]
    ) -> list[list[tuple[Device, bool]]]:
        """`job_devices_many`'s answer, from one script call for the whole batch instead of one per
        request (the per-call cost in redis-py and Redis was most of the lookup). When the server
        refuses the batch (a key of the wrong type...) `job_devices_many` answers it, error
        replies included, as before; on a Redis Cluster (an AOR per slot) it is `job_devices_many`."""
        if self._cluster or len(requests) < 2:
            return await self.job_devices_many(requests)
        keys: list[str] = []
        args: list[Any] = []
        for aor, job_id, device_ids in requests:
            keys.append(schema.devices_key(aor))
            args += [schema.device_key(aor, ""), schema.sent_key(aor, job_id, ""), len(device_ids), *device_ids]
        try:
            with unavailable_on_connection_error("job_devices"):
                [reply] = await self._evalsha_loading([(_JOB_DEVICES_BATCH_SHA, len(keys), *keys, *args)],
                                                      _JOB_DEVICES_BATCH)
        except ResponseError:
            return await self.job_devices_many(requests)
        return [_decoded_job_devices(aor, devices)
                for (aor, _, _), devices in zip(requests, json.loads(reply), strict=True)]

    async def _evalsha_loading(self, calls: Sequence[tuple[Any, ...]], source: str) -> list[Any]:
        """Pipelined EVALSHA `calls` of the script `source` (one round trip); when Redis lost its
        scripts (restart, SCRIPT FLUSH) the script is loaded and the calls made again, so the
        script must be safe to repeat. Plain EVALSHA + SCRIPT LOAD (what the dispatcher's ACL
        user may run), no registered Script (its SCRIPT EXISTS would be a round trip per call)."""
        for attempt in (1, 2):
            pipe = self._r.pipeline(transaction=False)
            for call in calls:
                pipe.evalsha(*call)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            if attempt == 1 and any(isinstance(r, NoScriptError) for r in replies):
                await self._r.script_load(source)
                continue
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return replies
        raise AssertionError("unreachable")


def _script_sha(source: str) -> str:
    """The SHA1 EVALSHA names `source` by."""
    import hashlib

    return hashlib.sha1(source.encode()).hexdigest()


# The marks and acks of a batch in one call (see mark_sent_and_finish). KEYS[1]: the stream,
# KEYS[2..]: sent marks to set. ARGV[1]: their TTL, ARGV[2]: the group, ARGV[3..]: entries to ack
# and delete. Safe to repeat. A plain Redis only: the marks are in their AORs' slots.
_MARK_AND_ACK = """
for i = 2, #KEYS do redis.call('set', KEYS[i], '1', 'EX', ARGV[1]) end
if #ARGV > 2 then
  redis.call('xack', KEYS[1], ARGV[2], unpack(ARGV, 3))
  redis.call('xdel', KEYS[1], unpack(ARGV, 3))
end
return 0
"""
_MARK_AND_ACK_SHA = _script_sha(_MARK_AND_ACK)

# _JOB_DEVICES for many jobs in one call (see job_devices_batch). KEYS[k]: the k-th job's AOR
# device set. ARGV, per job in order: device key prefix, sent-mark prefix, n, then n wanted device
# ids (n = 0: all). Returns one JSON array with _JOB_DEVICES's answer per job. A plain Redis only:
# the AORs are in different slots.
_JOB_DEVICES_BATCH = """
local out = {}
local a = 1
for k = 1, #KEYS do
  local dev_prefix, sent_prefix, n = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  local wanted = nil
  if n > 0 then
    wanted = {}
    for i = a + 3, a + 2 + n do wanted[ARGV[i]] = true end
  end
  a = a + 3 + n
  local found, stale = {}, {}
  for _, id in ipairs(redis.call('smembers', KEYS[k])) do
    if wanted == nil or wanted[id] then
      local h = redis.call('hgetall', dev_prefix .. id)
      if #h == 0 then
        stale[#stale + 1] = id
      else
        local fields = {}
        for i = 1, #h, 2 do fields[h[i]] = h[i + 1] end
        found[#found + 1] = cjson.encode({id, fields, redis.call('exists', sent_prefix .. id)})
      end
    elseif redis.call('exists', dev_prefix .. id) == 0 then
      stale[#stale + 1] = id
    end
  end
  if #stale > 0 then redis.call('srem', KEYS[k], unpack(stale)) end
  out[k] = '[' .. table.concat(found, ',') .. ']'
end
return '[' .. table.concat(out, ',') .. ']'
"""
_JOB_DEVICES_BATCH_SHA = _script_sha(_JOB_DEVICES_BATCH)
# Marks or acks per script call (Lua's unpack has a stack limit of a few thousand values).
_BATCH_CHUNK = 500


__all__ = ["AsyncStore"]


def _decoded_job_devices(aor: str, entries: Iterable[Sequence[Any]]) -> list[tuple[Device, bool]]:
    """The job-devices script's `[device id, hash fields, sent]` entries of one AOR as (device,
    already sent) pairs, oldest registration first; a corrupt record is logged and left out."""
    found: list[tuple[Device, bool]] = []
    for device_id, raw, sent in entries:
        device = schema.decode_or_log(schema.decode_device, raw, aor, str(device_id))
        if device is not None:
            found.append((device, bool(sent)))
    found.sort(key=lambda pair: pair[0].registered_at)
    return found
