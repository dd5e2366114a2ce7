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
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from pushlib import schema
from pushlib.models import AppCredentials, Device, PushJob, UaMapping
from pushlib.redisconn import SIP_SOCKET_TIMEOUT, StoreUnavailable, sync_client, unavailable_on_error
from pushlib.settings import Settings

log = logging.getLogger(__name__)

_SAVE_ATTEMPTS = 5  # save_device plans again when another REGISTER of the user changed the set meanwhile


class AppNameConflict(ValueError):
    """An app id or alias that already names another app (as its id or one of its aliases)."""

    def __init__(self, provider: str, name: str, owner: str) -> None:
        what = "the id" if name == owner else "an alias"
        super().__init__(f"{provider}:{name} is already {what} of app {provider}:{owner}")
        self.provider, self.name, self.owner = provider, name, owner


class SyncStore:
    """Devices, apps, UA mappings and job enqueueing for Kamailio workers (see module doc)."""

    def __init__(self, redis_url: str, settings: Settings, timeout: float = SIP_SOCKET_TIMEOUT) -> None:
        self.settings = settings
        self._r: Any = sync_client(redis_url, timeout)
        self._devices = self._r.register_script(schema.DEVICES_LUA)
        self._save_device = self._r.register_script(schema.SAVE_DEVICE_LUA)
        self._refresh_device = self._r.register_script(schema.REFRESH_DEVICE_LUA)

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
        Returns the evicted device ids.

        One round trip when the device refreshes the record it has (same tokens: the wake-up and
        refresh REGISTERs; REFRESH_DEVICE_LUA). Otherwise two more: the AOR's devices are read
        (DEVICES_LUA), the plan is made here (`schema.plan_device_save`), and SAVE_DEVICE_LUA writes
        it only if the device set is still the one the plan was made from (else the plan is made
        again: a concurrent REGISTER of another device of the same user)."""
        return self.save_device_probing(device, None)[0]

    def save_device_probing(self, device: Device, probe: str | None,
                            wake: schema.WakeArgs | None = None) -> tuple[list[str], bool, bool]:
        """`save_device`, also telling whether the key `probe` (of the device's AOR: same hash tag)
        exists and recording the device's `wake` for its parked calls (`schema.wake_args`), in the
        same round trip when the device only refreshes its record. Returns (evicted, probe exists
        (True, "look", when the full save ran), the wake was recorded (False: the caller records
        it, ParkedCalls.wake))."""
        fields = [x for kv in schema.encode_device(device).items() for x in kv]
        identity = schema.device_identity(device)
        keys = [schema.device_key(device.aor, device.device_id), schema.devices_key(device.aor)]
        flags = ""
        if probe:
            keys.append(probe)
            flags += "p"
        wake_rest: list[str] = ["", "", ""]
        if wake is not None:
            keys.append(wake[0])
            wake_rest = list(wake[1:])
            flags += "w"
        with unavailable_on_error("save_device"):
            refreshed = self._refresh_device(
                keys=keys,
                args=[device.device_id, schema.ttl_until(device.expires_at, time.time()), flags, *wake_rest,
                      len(identity) // 2, *identity, *fields],
            )
        if refreshed:
            return [], refreshed == 2, wake is not None
        return self._save_device_fully(device), True, False

    def _save_device_fully(self, device: Device) -> list[str]:
        for _ in range(_SAVE_ATTEMPTS):
            live, stale = self._device_hashes(device.aor)
            others: dict[str, dict[str, str] | None] = {i: raw for i, raw in live.items() if i != device.device_id}
            others.update({i: None for i in stale if i != device.device_id})
            evicted = self._write_device(device, others)
            if evicted is not None:
                break
        else:
            raise StoreUnavailable(f"save_device: the devices of {device.aor} kept changing")
        for i in evicted:
            log.info("store: evicted device aor=%s device=%s (same phone as %s, or over %d devices)",
                     device.aor, i, device.device_id, self.settings.max_devices_per_user)
        return evicted

    def _write_device(self, device: Device, others: dict[str, dict[str, str] | None]) -> list[str] | None:
        """One attempt of save_device's write (`others`: the other ids in the set, None for a hash
        that expired); None when the device set changed meanwhile."""
        times = {i: None if raw is None else (float(raw.get("registered_at", 0)), float(raw.get("expires_at", 0) or 0))
                 for i, raw in others.items()}
        # evicted with the duplicates: a dead record (no token left) never pushes, and its binding
        # goes with it (the router drops the bindings of evicted devices)
        duplicates = frozenset(i for i, raw in others.items() if raw is not None and (
            raw.get(schema.DEVICE_DEAD_FIELD) == "1" or schema.same_phone(
                device, raw.get("provider"), raw.get("app_id"), raw.get("voip_token"), raw.get("alert_token"))))
        plan = schema.plan_device_save(device, times, self.settings.max_devices_per_user, time.time(), duplicates)
        gone = [*plan.evict, *plan.stale]
        fields = [x for kv in schema.encode_device(device).items() for x in kv]
        with unavailable_on_error("save_device"):
            written = self._save_device(
                keys=[schema.device_key(device.aor, device.device_id), schema.devices_key(device.aor)],
                args=[schema.members_token(others), device.device_id, plan.device_ttl, plan.set_ttl,
                      schema.device_key(device.aor, ""), len(gone), len(plan.evict), *gone, *fields],
            )
        return list(plan.evict) if written else None

    def _device_hashes(self, aor: str) -> tuple[dict[str, dict[str, str]], list[str]]:
        """The AOR's live device hashes by id, and the ids in its set whose hash expired: one
        round trip (DEVICES_LUA)."""
        with unavailable_on_error("devices"):
            live, stale = self._devices(keys=[schema.devices_key(aor)], args=[schema.device_key(aor, "")])
        return {str(live[i]): schema.pairs_to_dict(live[i + 1]) for i in range(0, len(live), 2)}, list(stale)

    def remove_all_devices(self, aor: str) -> list[str]:
        """Delete every device of the AOR (also records that no longer decode); returns the ids
        the AOR's set listed. One transaction (the keys share the AOR's hash tag)."""
        skey = schema.devices_key(aor)
        with unavailable_on_error("remove_all_devices"):
            ids = sorted(self._r.smembers(skey))
            if not ids:
                return []
            pipe = self._r.pipeline(transaction=True)
            for i in ids:  # one DEL each: redis-py's cluster pipelines take one key per DEL
                pipe.delete(schema.device_key(aor, i))
            pipe.srem(skey, *ids)  # not DEL: a device saved meanwhile stays listed
            pipe.execute()
        return ids

    def remove_device(self, aor: str, device_id: str) -> bool:
        """Delete a device; True when it existed."""
        with unavailable_on_error("remove_device"):
            pipe = self._r.pipeline(transaction=True)
            pipe.delete(schema.device_key(aor, device_id))
            pipe.srem(schema.devices_key(aor), device_id)
            deleted, _ = pipe.execute()
        return bool(deleted)

    def devices(self, aor: str) -> list[Device]:
        """The AOR's live devices (ordered by registered_at), in one round trip (ids whose hash
        expired stay in the AOR set until the next save_device drops them)."""
        live, _ = self._device_hashes(aor)
        found = [schema.decode_or_log(schema.decode_device, raw, aor, i) for i, raw in live.items()]
        return sorted((d for d in found if d is not None), key=lambda d: (d.registered_at, d.device_id))

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

    def save_app(self, app: AppCredentials, *, reset_status: bool = True) -> None:
        """Replace an app's credentials and aliases, with the index entries and alias copies that
        go with them (see `schema`): aliases the stored app had and `app` has not stop resolving.
        Clears its recorded last error and environment suspicion (an operator saving credentials is
        fixing them; `reset_status=False` keeps them); counters are kept.

        Raises AppNameConflict when the app id or an alias already names another app (as its id
        or as one of its aliases), ValueError for an alias that is the app's own id, repeats one
        or cannot be stored (`schema.check_app_name`); nothing is written then. (Not one
        transaction: the keys live in different Redis Cluster slots. The index names an app or alias
        only once its hash is written, and drops an alias before its copy goes, so the SIP workers
        never accept a name the dispatcher cannot resolve; `reindex_apps` repairs what an
        interrupted save leaves.)"""
        provider, app_id = app.provider.value, app.app_id
        if app_id in app.aliases:
            raise ValueError(f"{provider}:{app_id}: an alias cannot be the app's own id")
        if len(set(app.aliases)) != len(app.aliases):
            raise ValueError(f"{provider}:{app_id}: an alias is given twice")
        names = (app_id, *app.aliases)
        encoded = schema.encode_app(app)  # refuses unusable aliases before anything is read
        with unavailable_on_error("save_app"):
            owners = self._owners(provider, names)
            for name, owner in zip(names, owners, strict=True):
                if owner is not None and owner != app_id:
                    raise AppNameConflict(provider, name, owner)
            previous = self._stored_aliases(provider, app_id)
            dropped = [a for a in previous if a not in app.aliases]
            dropped_owners = self._owners(provider, dropped)
            state = schema.app_index_value(app.enabled)
            pipe = self._r.pipeline(transaction=False)
            pipe.delete(schema.app_key(provider, app_id))
            pipe.hset(schema.app_key(provider, app_id), mapping=encoded)
            for alias in app.aliases:
                pipe.delete(schema.app_key(provider, alias))
                pipe.hset(schema.app_key(provider, alias), mapping=schema.encode_app_alias(app, alias))
            pipe.hset(schema.APP_INDEX_KEY, mapping={schema.app_index_field(provider, n): state for n in names})
            for alias, owner in zip(dropped, dropped_owners, strict=True):
                if owner in (None, app_id):  # never another app's name
                    pipe.hdel(schema.APP_INDEX_KEY, schema.app_index_field(provider, alias))
                    pipe.delete(schema.app_key(provider, alias))
            if reset_status:
                pipe.hdel(schema.app_status_key(provider, app_id), *schema.APP_STATUS_RESET_FIELDS)
            pipe.execute()
        log.info("store: saved app %s", schema.describe_app(app))

    def _owners(self, provider: str, names: Sequence[str]) -> list[str | None]:
        """For each name, the id of the app it names (its own id or one of its aliases), None when
        it names none. One round trip."""
        if not names:
            return []
        pipe = self._r.pipeline(transaction=False)
        for name in names:
            pipe.hget(schema.app_key(provider, name), "app_id")
        return list(pipe.execute())

    def _stored_aliases(self, provider: str, app_id: str) -> tuple[str, ...]:
        """The aliases stored with the app `app_id` (none when no such app is stored)."""
        raw = self._r.hget(schema.app_key(provider, app_id), "aliases")
        return tuple(a for a in (raw or "").split(",") if a)

    def app_enabled(self, provider: str, app_id: str) -> bool | None:
        """Whether an app is configured (None: it is not) and enabled, from the app index alone:
        no credentials are read (the SIP workers' Redis user cannot read them). `app_id` may be an
        alias of the app."""
        with unavailable_on_error("app_enabled"):
            value = self._r.hget(schema.APP_INDEX_KEY, schema.app_index_field(provider, app_id))
        return None if value is None else value == schema.app_index_value(True)

    def reindex_apps(self) -> int:
        """Rebuild the app index from the stored credentials (apps saved before the index existed),
        and repair the alias copies: every alias an app lists gets a fresh copy of the app, a copy
        whose alias no app lists any more is deleted (an alias that is another app's id, or that
        two apps list, is left out and logged). Returns how many apps it lists."""
        with unavailable_on_error("reindex_apps"):
            records: dict[str, dict[str, str]] = {}
            # (on a Redis Cluster, redis-py's scan_iter walks every master: app keys have no
            # common hash tag, they are spread over all of them)
            for key in self._r.scan_iter(match=schema.APP_KEY_PATTERN, count=500):
                raw = self._r.hgetall(key)
                if raw:
                    records[str(key)] = raw
            apps: dict[str, AppCredentials] = {}  # by key: the apps themselves, not alias copies
            copies: dict[str, AppCredentials] = {}
            corrupt: set[str] = set()
            for key, raw in sorted(records.items()):
                app = schema.decode_or_log(schema.decode_app, raw, "app", key)
                if app is None:
                    corrupt.add(key)
                elif key == schema.app_key(app.provider, app.app_id) and schema.APP_ALIAS_FIELD not in raw:
                    apps[key] = app
                elif schema.APP_ALIAS_FIELD in raw:
                    copies[key] = app
                else:
                    log.warning("store: reindex: %s holds app %s:%s under another name; left alone",
                                key, app.provider.value, app.app_id)
            aliases: dict[str, tuple[AppCredentials, str]] = {}  # alias copy key -> (app, alias)
            for app in apps.values():
                for alias in app.aliases:
                    akey = schema.app_key(app.provider, alias)
                    if akey in apps or akey in aliases:
                        other = apps[akey] if akey in apps else aliases[akey][0]
                        log.error("store: reindex: alias %s of %s:%s already names %s:%s; left out",
                                  alias, app.provider.value, app.app_id, other.provider.value, other.app_id)
                        continue
                    aliases[akey] = (app, alias)
            found = {schema.app_index_field(a.provider, a.app_id): schema.app_index_value(a.enabled)
                     for a in apps.values()}
            found.update({schema.app_index_field(a.provider, alias): schema.app_index_value(a.enabled)
                          for a, alias in aliases.values()})
            # (a copy of an app whose own record is corrupt is left alone: it still serves devices)
            stale = [key for key, app in copies.items() if key not in aliases
                     and schema.app_key(app.provider, app.app_id) not in corrupt]
            # as save_app: copies before the index names them, the index before stale copies go
            if aliases:
                pipe = self._r.pipeline(transaction=False)
                for akey, (app, alias) in aliases.items():
                    pipe.delete(akey)
                    pipe.hset(akey, mapping=schema.encode_app_alias(app, alias))
                pipe.execute()
            pipe = self._r.pipeline(transaction=True)  # one key: also atomic on a cluster
            pipe.delete(schema.APP_INDEX_KEY)
            if found:
                pipe.hset(schema.APP_INDEX_KEY, mapping=found)
            pipe.execute()
            if stale:
                pipe = self._r.pipeline(transaction=False)  # one DEL each: different cluster slots
                for key in stale:
                    pipe.delete(key)
                pipe.execute()
        for key in stale:
            log.info("store: reindex: removed %s (an alias its app no longer lists)", key)
        return len(apps)

    def app(self, provider: str, app_id: str) -> AppCredentials | None:
        """The app `app_id` names: its own id, or one of its aliases (the answer's `app_id` then
        differs from the one asked for)."""
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
        """Delete an app's credentials with its aliases, status and outcome window; True when the
        app existed. False, and nothing changed, when `app_id` is an alias of another app (remove
        the alias with `remove_app_alias`). (Separate DELs: the keys live in different Redis
        Cluster slots; the aliases go first, so none outlives its app.)"""
        with unavailable_on_error("remove_app"):
            [owner] = self._owners(provider, [app_id])
            if owner is not None and owner != app_id:
                return False
            aliases = self._stored_aliases(provider, app_id)
            alias_owners = self._owners(provider, aliases)
            pipe = self._r.pipeline(transaction=False)
            for alias, alias_owner in zip(aliases, alias_owners, strict=True):
                if alias_owner in (None, app_id):
                    pipe.hdel(schema.APP_INDEX_KEY, schema.app_index_field(provider, alias))
                    pipe.delete(schema.app_key(provider, alias))
            pipe.hdel(schema.APP_INDEX_KEY, schema.app_index_field(provider, app_id))
            pipe.delete(schema.app_key(provider, app_id))
            pipe.delete(schema.app_status_key(provider, app_id))
            pipe.delete(schema.app_window_key(provider, app_id))
            existed = pipe.execute()[-3]
        return bool(existed)

    def add_app_aliases(self, provider: str, app_id: str, aliases: Sequence[str]) -> AppCredentials:
        """Add aliases to the app `app_id` (those it already has are kept once); returns the app
        as saved. LookupError when there is no app `app_id` (an alias is not one); what
        `save_app` raises otherwise."""
        app = self._own_app(provider, app_id)
        added = tuple(a for a in dict.fromkeys(aliases) if a not in app.aliases)
        if not added:
            return app
        changed = replace(app, aliases=(*app.aliases, *added))
        self.save_app(changed, reset_status=False)
        return changed

    def remove_app_alias(self, provider: str, app_id: str, alias: str) -> bool:
        """Remove one alias of the app `app_id`: devices naming it stop resolving (REGISTERs get
        555, the dispatcher finds no credentials). False when the app has no such alias;
        LookupError when there is no app `app_id`."""
        app = self._own_app(provider, app_id)
        if alias not in app.aliases:
            return False
        self.save_app(replace(app, aliases=tuple(a for a in app.aliases if a != alias)), reset_status=False)
        return True

    def _own_app(self, provider: str, app_id: str) -> AppCredentials:
        app = self.app(provider, app_id)
        if app is None or app.app_id != app_id:
            raise LookupError(f"no app {provider}:{app_id}"
                              + (f" ({app_id} is an alias of {provider}:{app.app_id})" if app else ""))
        return app

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
