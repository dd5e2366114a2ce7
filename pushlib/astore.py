"""The asyncio Redis store used by the push dispatcher (redis.asyncio).

Same keys and serialisation as `pushlib.store.SyncStore` (both use `pushlib.keys`), plus what
the dispatcher needs: the job stream (consumer group, reclaim, ack), idempotency marks, and
the outcome helpers (dead tokens, device quarantine, per-app error and environment status).
Connection failures raise `StoreUnavailable`, as in the sync store.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis.asyncio as aredis
from redis.exceptions import ResponseError

from pushlib import keys
from pushlib.logutil import token_prefix
from pushlib.models import AppCredentials, Device, Outcome, PushJob, UaMapping
from pushlib.settings import Settings
from pushlib.store import StoreUnavailable, _decode_or_log, _unavailable_on_connection_errors

log = logging.getLogger(__name__)

QUARANTINE_SECONDS = 24 * 3600
SENT_MARK_TTL = 24 * 3600
# Sliding window used to suspect a wrong APNs environment (sandbox vs production) for an app.
ENV_WINDOW_PUSHES = 100
ENV_SUSPECT_MIN_BAD = 5

# Remove one dead token from a device; drop the device when no token is left.
# Returns 0 (token not on the device any more: no-op), 1 (token removed), 2 (device removed).
_REMOVE_TOKEN = """
local field = nil
if redis.call('hget', KEYS[1], 'voip_token') == ARGV[1] then field = 'voip_token'
elseif redis.call('hget', KEYS[1], 'alert_token') == ARGV[1] then field = 'alert_token' end
if not field then return 0 end
redis.call('hdel', KEYS[1], field)
if redis.call('hexists', KEYS[1], 'voip_token') == 0
   and redis.call('hexists', KEYS[1], 'alert_token') == 0 then
  redis.call('del', KEYS[1])
  redis.call('srem', KEYS[2], ARGV[2])
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


class AsyncStore:
    """Async twin of SyncStore plus the dispatcher's stream and outcome operations."""

    def __init__(self, redis_url: str, settings: Settings) -> None:
        self.settings = settings
        # socket_timeout must exceed the XREADGROUP block time used by the dispatcher.
        self._r: Any = aredis.Redis.from_url(
            redis_url, decode_responses=True, socket_timeout=10.0, socket_connect_timeout=2.0,
        )
        self._remove_token = self._r.register_script(_REMOVE_TOKEN)
        self._set_if_exists = self._r.register_script(_SET_IF_EXISTS)

    async def aclose(self) -> None:
        await self._r.aclose()

    async def ping(self) -> bool:
        with _unavailable_on_connection_errors("ping"):
            return bool(await self._r.ping())

    # --- devices, apps, mappings (twins of SyncStore) ---------------------------------------

    async def save_device(self, device: Device) -> list[str]:
        """Same contract as SyncStore.save_device."""
        dkey = keys.device_key(device.aor, device.device_id)
        skey = keys.devices_key(device.aor)
        with _unavailable_on_connection_errors("save_device"):
            async with self._r.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        await pipe.watch(skey)
                        members = [m for m in await pipe.smembers(skey) if m != device.device_id]
                        reads = self._r.pipeline(transaction=False)
                        for m in members:
                            reads.hmget(keys.device_key(device.aor, m), "registered_at", "expires_at")
                        others: dict[str, tuple[float, float] | None] = {}
                        for m, (reg, exp) in zip(members, await reads.execute(), strict=True):
                            others[m] = None if reg is None else (float(reg), float(exp or 0))
                        plan = keys.plan_device_save(
                            device, others, self.settings.max_devices_per_user, time.time()
                        )
                        pipe.multi()
                        pipe.delete(dkey)
                        pipe.hset(dkey, mapping=keys.encode_device(device))
                        pipe.expire(dkey, plan.device_ttl)
                        pipe.sadd(skey, device.device_id)
                        if plan.evict or plan.stale:
                            pipe.srem(skey, *plan.evict, *plan.stale)
                            pipe.delete(*(keys.device_key(device.aor, i) for i in plan.evict))
                        pipe.expire(skey, plan.set_ttl)
                        await pipe.execute()
                        break
                    except aredis.WatchError:
                        continue
        return list(plan.evict)

    async def remove_device(self, aor: str, device_id: str) -> bool:
        with _unavailable_on_connection_errors("remove_device"):
            pipe = self._r.pipeline(transaction=True)
            pipe.delete(keys.device_key(aor, device_id))
            pipe.srem(keys.devices_key(aor), device_id)
            deleted, _ = await pipe.execute()
        return bool(deleted)

    async def device(self, aor: str, device_id: str) -> Device | None:
        with _unavailable_on_connection_errors("device"):
            raw = await self._r.hgetall(keys.device_key(aor, device_id))
        return _decode_or_log(keys.decode_device, raw, aor, device_id) if raw else None

    async def devices(self, aor: str) -> list[Device]:
        """Same contract as SyncStore.devices (expired ids cleaned lazily)."""
        skey = keys.devices_key(aor)
        with _unavailable_on_connection_errors("devices"):
            ids = sorted(await self._r.smembers(skey))
            if not ids:
                return []
            pipe = self._r.pipeline(transaction=False)
            for i in ids:
                pipe.hgetall(keys.device_key(aor, i))
            raws: list[dict[str, str]] = await pipe.execute()
            stale = [i for i, raw in zip(ids, raws, strict=True) if not raw]
            if stale:
                await self._r.srem(skey, *stale)
        found = [
            _decode_or_log(keys.decode_device, raw, aor, i) for i, raw in zip(ids, raws, strict=True) if raw
        ]
        return sorted((d for d in found if d is not None), key=lambda d: d.registered_at)

    async def enqueue(self, job: PushJob) -> str:
        with _unavailable_on_connection_errors("enqueue"):
            entry_id = await self._r.xadd(
                self.settings.stream, keys.encode_job(job),
                maxlen=self.settings.stream_maxlen, approximate=True,
            )
        return str(entry_id)

    async def save_app(self, app: AppCredentials) -> None:
        """Same contract as SyncStore.save_app."""
        with _unavailable_on_connection_errors("save_app"):
            pipe = self._r.pipeline(transaction=False)
            pipe.delete(keys.app_key(app.provider, app.app_id))
            pipe.hset(keys.app_key(app.provider, app.app_id), mapping=keys.encode_app(app))
            pipe.hdel(keys.app_status_key(app.provider, app.app_id), *keys.APP_STATUS_RESET_FIELDS)
            await pipe.execute()
        log.info("store: saved app %s", keys.describe_app(app))

    async def app(self, provider: str, app_id: str) -> AppCredentials | None:
        with _unavailable_on_connection_errors("app"):
            raw = await self._r.hgetall(keys.app_key(provider, app_id))
        return _decode_or_log(keys.decode_app, raw, provider, app_id) if raw else None

    async def ua_mappings(self) -> list[UaMapping]:
        with _unavailable_on_connection_errors("ua_mappings"):
            raw: dict[str, str] = await self._r.hgetall(keys.UAMAP_KEY)
        found = [_decode_or_log(keys.decode_ua_mapping, raw[name], "uamap", name) for name in sorted(raw)]
        return [m for m in found if m is not None]

    # --- outcome helpers ------------------------------------------------------------------------

    async def remove_token(self, aor: str, device_id: str, token: str) -> bool:
        """A provider said `token` is dead: remove it from the device (the whole device when no
        token is left). Idempotent: False when the token is no longer on the device (already
        removed, or the device re-registered with a new one)."""
        with _unavailable_on_connection_errors("remove_token"):
            result = int(await self._remove_token(
                keys=[keys.device_key(aor, device_id), keys.devices_key(aor)], args=[token, device_id],
            ))
        if result:
            log.info("store: dead token removed aor=%s device=%s token=%s%s", aor, device_id,
                     token_prefix(token), " (device removed: no token left)" if result == 2 else "")
        return result > 0

    async def quarantine_device(self, aor: str, device_id: str, now: float | None = None) -> bool:
        """Skip this device for QUARANTINE_SECONDS (its next REGISTER clears it). False when the
        device no longer exists."""
        until = (time.time() if now is None else now) + QUARANTINE_SECONDS
        with _unavailable_on_connection_errors("quarantine_device"):
            done = int(await self._set_if_exists(
                keys=[keys.device_key(aor, device_id)], args=["quarantined_until", repr(until)],
            ))
        if done:
            log.warning("store: device quarantined aor=%s device=%s until=%.0f", aor, device_id, until)
        return bool(done)

    async def is_sent(self, job_id: str, device_id: str) -> bool:
        with _unavailable_on_connection_errors("is_sent"):
            return bool(await self._r.exists(keys.sent_key(job_id, device_id)))

    async def mark_sent(self, job_id: str, device_id: str, ttl: int = SENT_MARK_TTL) -> None:
        """Record that the provider accepted this (job, device) push, so a reclaimed job skips it."""
        with _unavailable_on_connection_errors("mark_sent"):
            await self._r.set(keys.sent_key(job_id, device_id), "1", ex=ttl)

    async def record_outcome(
        self, provider: str, app_id: str, outcome: Outcome, now: float | None = None
    ) -> bool:
        """Count a final push outcome for the app and feed the environment-suspicion window.
        Returns True when this call flagged the app's environment as likely wrong (most recent
        pushes got BadDeviceToken: Apple answers that when sandbox/production are mixed up)."""
        now = time.time() if now is None else now
        skey, wkey = keys.app_status_key(provider, app_id), keys.app_window_key(provider, app_id)
        bad = outcome is Outcome.DEVICE_SUSPECT
        with _unavailable_on_connection_errors("record_outcome"):
            pipe = self._r.pipeline(transaction=True)
            pipe.hincrby(skey, f"count:{outcome.value}", 1)
            pipe.lpush(wkey, f"{now!r}:{int(bad)}")
            pipe.ltrim(wkey, 0, ENV_WINDOW_PUSHES - 1)
            pipe.expire(wkey, keys.ENV_WINDOW_SECONDS)
            if bad:
                pipe.lrange(wkey, 0, -1)
            results = await pipe.execute()
            if not bad:
                return False
            total, n_bad = keys.env_suspicious(results[-1], now)
            if n_bad < ENV_SUSPECT_MIN_BAD or n_bad * 2 <= total:
                return False
            message = (f"{n_bad} of the last {total} pushes got BadDeviceToken: the app's APNs "
                       f"environment (sandbox/production) is probably wrong")
            flagged = bool(await self._r.hsetnx(skey, "env_suspect", message))
            if flagged:
                await self._r.hset(skey, "env_suspect_at", repr(now))
        if flagged:
            log.warning("store: app %s:%s %s", provider, app_id, message)
        return flagged

    async def record_app_error(self, provider: str, app_id: str, text: str, now: float | None = None) -> None:
        """Keep the app's last configuration error (text + time) for operators."""
        now = time.time() if now is None else now
        with _unavailable_on_connection_errors("record_app_error"):
            await self._r.hset(keys.app_status_key(provider, app_id),
                               mapping={"last_error": text[:500], "last_error_at": repr(now)})

    async def app_status(self, provider: str, app_id: str) -> dict[str, Any]:
        """Operator view: last_error (+_at), env_suspect (+_at), counters per outcome, and the
        recent window (pushes, bad_device_token)."""
        with _unavailable_on_connection_errors("app_status"):
            raw: dict[str, str] = await self._r.hgetall(keys.app_status_key(provider, app_id))
            window: list[str] = await self._r.lrange(keys.app_window_key(provider, app_id), 0, -1)
        return keys.app_status_view(raw, window, time.time())

    # --- job stream -------------------------------------------------------------------------------

    async def ensure_group(self) -> None:
        """Create the consumer group (and the stream) if missing; jobs queued before the group
        existed are read too (their deadline decides whether they are still sent)."""
        try:
            with _unavailable_on_connection_errors("ensure_group"):
                await self._r.xgroup_create(self.settings.stream, self.settings.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read_new(self, consumer: str, count: int, block_ms: int) -> list[tuple[str, dict[str, str]]]:
        """New entries for this consumer (they enter its pending list)."""
        with _unavailable_on_connection_errors("read_new"):
            reply = await self._r.xreadgroup(
                self.settings.group, consumer, {self.settings.stream: ">"}, count=count, block=block_ms,
            )
        return [(eid, fields or {}) for _, entries in (reply or []) for eid, fields in entries]

    async def reclaim(
        self, consumer: str, min_idle_ms: int, start: str, count: int
    ) -> tuple[str, list[tuple[str, dict[str, str]]], list[str]]:
        """XAUTOCLAIM entries idle longer than `min_idle_ms`: (next start, entries, ids of entries
        already deleted from the stream, which the caller acks)."""
        with _unavailable_on_connection_errors("reclaim"):
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
        with _unavailable_on_connection_errors("touch"):
            await self._r.xclaim(
                self.settings.stream, self.settings.group, consumer, 0, entry_ids, justid=True,
            )

    async def finish(self, entry_ids: list[str]) -> None:
        """Final outcome reached: ack and delete the entries (the stream keeps only live work)."""
        if not entry_ids:
            return
        with _unavailable_on_connection_errors("finish"):
            pipe = self._r.pipeline(transaction=True)
            pipe.xack(self.settings.stream, self.settings.group, *entry_ids)
            pipe.xdel(self.settings.stream, *entry_ids)
            await pipe.execute()


__all__ = ["AsyncStore", "StoreUnavailable"]
