"""The synchronous Redis store used by Kamailio SIP workers (redis-py): devices, apps, UA
mappings, job enqueueing.

The sync side of the data layer: SyncStore, `parked.ParkedCalls` and `credentials.Subscribers`
share one `redisconn.sync_client` per process (`SyncStore.client`). Contract: every method either
completes or raises `redisconn.StoreUnavailable` quickly (socket timeouts of 0.5 s, one immediate
reconnect after a connection error, none after a timeout), so a SIP worker never hangs on a dead
Redis and works again by itself as soon as Redis is back (the pool reconnects on the next call).
Key layout and serialisation: `pushlib.schema` (shared with the async store of the dispatcher).
Create one SyncStore per process, after the fork (Kamailio `child_init`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pushlib import schema
from pushlib.models import AppCredentials, Device, PushJob, UaMapping
from pushlib.redisconn import SIP_SOCKET_TIMEOUT, sync_client, unavailable_on_error
from pushlib.settings import Settings

log = logging.getLogger(__name__)


class SyncStore:
    """Devices, apps, UA mappings and job enqueueing for Kamailio workers (see module doc)."""

    def __init__(self, redis_url: str, settings: Settings, timeout: float = SIP_SOCKET_TIMEOUT) -> None:
        self.settings = settings
        self._r: Any = sync_client(redis_url, timeout)

    @property
    def client(self) -> Any:
        """The underlying client (`redisconn.sync_client`), for the process's other Redis users
        (`parked.ParkedCalls`, `credentials.Subscribers`): one connection pool per process."""
        return self._r

    def close(self) -> None:
        self._r.close()

    def ping(self) -> bool:
        """True when Redis answers; raises StoreUnavailable when it does not."""
        with unavailable_on_error("ping"):
            return bool(self._r.ping())

    # --- devices ------------------------------------------------------------------------------

    def save_device(self, device: Device) -> list[str]:
        """Upsert a device (replacing any previous record with the same id, which also clears a
        quarantine), expire it at `device.expires_at` (at least MIN_DEVICE_TTL from now), and keep
        at most `max_devices_per_user` devices for the AOR by evicting the oldest registered.
        Returns the evicted device ids."""
        dkey = schema.device_key(device.aor, device.device_id)
        skey = schema.devices_key(device.aor)
        encoded = schema.encode_device(device)

        def txn(pipe: Any) -> list[str]:
            members = [m for m in pipe.smembers(skey) if m != device.device_id]
            reads = self._r.pipeline(transaction=False)
            for m in members:
                reads.hmget(schema.device_key(device.aor, m), "registered_at", "expires_at")
            others: dict[str, tuple[float, float] | None] = {}
            for m, (reg, exp) in zip(members, reads.execute(), strict=True):
                others[m] = None if reg is None else (float(reg), float(exp or 0))
            plan = schema.plan_device_save(device, others, self.settings.max_devices_per_user, time.time())
            pipe.multi()
            pipe.delete(dkey)  # drop fields the new record no longer has (e.g. a removed token)
            pipe.hset(dkey, mapping=encoded)
            pipe.expire(dkey, plan.device_ttl)
            pipe.sadd(skey, device.device_id)
            gone = plan.evict + plan.stale
            if gone:
                pipe.srem(skey, *gone)
                pipe.delete(*(schema.device_key(device.aor, i) for i in plan.evict))
            pipe.expire(skey, plan.set_ttl)
            return list(plan.evict)

        with unavailable_on_error("save_device"):
            evicted: list[str] = self._r.transaction(txn, skey, value_from_callable=True)
        for i in evicted:
            log.info("store: evicted device aor=%s device=%s (over %d devices)",
                     device.aor, i, self.settings.max_devices_per_user)
        return evicted

    def remove_device(self, aor: str, device_id: str) -> bool:
        """Delete a device; True when it existed."""
        with unavailable_on_error("remove_device"):
            pipe = self._r.pipeline(transaction=True)
            pipe.delete(schema.device_key(aor, device_id))
            pipe.srem(schema.devices_key(aor), device_id)
            deleted, _ = pipe.execute()
        return bool(deleted)

    def devices(self, aor: str) -> list[Device]:
        """The AOR's live devices (ordered by registered_at); ids whose hash expired are
        removed from the AOR set on the way."""
        skey = schema.devices_key(aor)
        with unavailable_on_error("devices"):
            ids = sorted(self._r.smembers(skey))
            if not ids:
                return []
            pipe = self._r.pipeline(transaction=False)
            for i in ids:
                pipe.hgetall(schema.device_key(aor, i))
            raws: list[dict[str, str]] = pipe.execute()
            stale = [i for i, raw in zip(ids, raws, strict=True) if not raw]
            if stale:
                self._r.srem(skey, *stale)
        found = [
            schema.decode_or_log(schema.decode_device, raw, aor, i) for i, raw in zip(ids, raws, strict=True) if raw
        ]
        return sorted((d for d in found if d is not None), key=lambda d: d.registered_at)

    # --- jobs -----------------------------------------------------------------------------------

    def enqueue(self, job: PushJob) -> str:
        """Append a job to the stream (approximate MAXLEN trim); returns the stream entry id."""
        fields = schema.encode_job(job)
        with unavailable_on_error("enqueue"):
            entry_id = self._r.xadd(
                self.settings.stream, fields,
                maxlen=self.settings.stream_maxlen, approximate=True,
            )
        return str(entry_id)

    # --- apps -----------------------------------------------------------------------------------

    def save_app(self, app: AppCredentials) -> None:
        """Replace an app's credentials. Clears its recorded last error and environment suspicion
        (an operator saving credentials is fixing them); counters are kept."""
        with unavailable_on_error("save_app"):
            pipe = self._r.pipeline(transaction=False)
            pipe.delete(schema.app_key(app.provider, app.app_id))
            pipe.hset(schema.app_key(app.provider, app.app_id), mapping=schema.encode_app(app))
            pipe.hset(schema.APP_INDEX_KEY, schema.app_index_field(app.provider, app.app_id),
                      schema.app_index_value(app.enabled))
            pipe.hdel(schema.app_status_key(app.provider, app.app_id), *schema.APP_STATUS_RESET_FIELDS)
            pipe.execute()
        log.info("store: saved app %s", schema.describe_app(app))

    def app_enabled(self, provider: str, app_id: str) -> bool | None:
        """Whether an app is configured (None: it is not) and enabled, from the app index alone:
        no credentials are read (the SIP workers' Redis user cannot read them)."""
        with unavailable_on_error("app_enabled"):
            value = self._r.hget(schema.APP_INDEX_KEY, schema.app_index_field(provider, app_id))
        return None if value is None else value == schema.app_index_value(True)

    def reindex_apps(self) -> int:
        """Rebuild the app index from the stored credentials (apps saved before the index existed);
        returns how many apps it lists."""
        with unavailable_on_error("reindex_apps"):
            found: dict[str, str] = {}
            for key in self._r.scan_iter(match=schema.APP_KEY_PATTERN, count=500):
                raw = self._r.hgetall(key)
                app = schema.decode_or_log(schema.decode_app, raw, "app", str(key)) if raw else None
                if app is not None:
                    found[schema.app_index_field(app.provider, app.app_id)] = schema.app_index_value(app.enabled)
            pipe = self._r.pipeline(transaction=True)
            pipe.delete(schema.APP_INDEX_KEY)
            if found:
                pipe.hset(schema.APP_INDEX_KEY, mapping=found)
            pipe.execute()
        return len(found)

    def app(self, provider: str, app_id: str) -> AppCredentials | None:
        with unavailable_on_error("app"):
            raw = self._r.hgetall(schema.app_key(provider, app_id))
        return schema.decode_or_log(schema.decode_app, raw, provider, app_id) if raw else None

    def app_status(self, provider: str, app_id: str) -> dict[str, Any]:
        """Operator view of an app's health (see schema.app_status_view)."""
        with unavailable_on_error("app_status"):
            raw: dict[str, str] = self._r.hgetall(schema.app_status_key(provider, app_id))
            window: list[str] = self._r.lrange(schema.app_window_key(provider, app_id), 0, -1)
        return schema.app_status_view(raw, window, time.time())

    def remove_app(self, provider: str, app_id: str) -> bool:
        """Delete an app's credentials with its status and outcome window; True when the app
        existed. (Separate DELs: the keys live in different Redis Cluster slots.)"""
        with unavailable_on_error("remove_app"):
            pipe = self._r.pipeline(transaction=False)
            pipe.delete(schema.app_key(provider, app_id))
            pipe.delete(schema.app_status_key(provider, app_id))
            pipe.delete(schema.app_window_key(provider, app_id))
            pipe.hdel(schema.APP_INDEX_KEY, schema.app_index_field(provider, app_id))
            existed, _, _, _ = pipe.execute()
        return bool(existed)

    # --- UA mappings --------------------------------------------------------------------------

    def save_ua_mapping(self, m: UaMapping) -> None:
        with unavailable_on_error("save_ua_mapping"):
            self._r.hset(schema.UAMAP_KEY, m.name, schema.encode_ua_mapping(m))

    def remove_ua_mapping(self, name: str) -> bool:
        with unavailable_on_error("remove_ua_mapping"):
            return bool(self._r.hdel(schema.UAMAP_KEY, name))

    def ua_mappings(self) -> list[UaMapping]:
        """All mappings, ordered by name (the order the parser tries them in)."""
        with unavailable_on_error("ua_mappings"):
            raw: dict[str, str] = self._r.hgetall(schema.UAMAP_KEY)
        found = [schema.decode_or_log(schema.decode_ua_mapping, raw[name], "uamap", name) for name in sorted(raw)]
        return [m for m in found if m is not None]
