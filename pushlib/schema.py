"""The Redis schema: every key pushlib reads or writes, its TTL, and the (de)serialisation.

The SIP workers (`store.SyncStore`, `parked.ParkedCalls`, `credentials.Subscribers`) and the push
dispatcher (`astore.AsyncStore`) read and write the same keys, so the layout and the field
encodings live here, once, as builder functions (or constants for fixed keys). Keys that are used
together carry the same hash tag (`{<aor>}`, `{<provider>:<app_id>}`) so multi-key transactions and
scripts also work on Redis Cluster. Deployed data depends on these strings: never change one.

Per user (AOR hash tag):
- `pn:{<aor>}:dev:<device_id>` (`device_key`) hash, one device (`encode_device`). TTL: until its
  contact expires (`expires_at`), at least MIN_DEVICE_TTL; set on every save.
- `pn:{<aor>}:devs` (`devices_key`) set of the AOR's device ids, cleaned lazily of expired ids. TTL:
  the longest TTL of the devices it lists, set on every save (`plan_device_save`).
- `pn:{<aor>}:sent:<job_id>:<device_id>` (`sent_key`) string `1`, idempotency mark: the provider
  accepted this push. TTL: SENT_MARK_TTL. Under the AOR's hash tag so one script reads a job's
  devices and their marks in one slot.
- `pn:{<aor>}:call:<call_key>` (`call_key`) hash, one parked call (`encode_parked_call`): call_id,
  cseq, caller_name, caller_number, deadline, and one field `dev:<device_id>` per pushed device
  (`pushed` or `woken`). TTL: the wait window + PARKED_TTL_MARGIN (`parked_ttl`); deleted when the
  call ends. A second call to the same user gets its own hash.
- `pn:{<aor>}:pend:<device_id>` (`pending_key`) set of the call keys the device was pushed for and
  has not woken for yet. TTL: that of the last call parked for it.
- `pn:{<aor>}:msgs` (`messages_key`) stream, the MESSAGEs queued for the user's sleeping devices
  (`messages.StoredMessage.fields` plus `for`: the device ids it waits for, comma-separated, and
  `size`). `pn:{<aor>}:msgmeta` (`message_meta_key`) hash: `bytes` (body bytes queued) and
  `left:<entry id>` (devices that still have to acknowledge that entry). `pn:{<aor>}:msgcur`
  (`message_cursor_key`) hash, device id -> the last entry id it acknowledged (2xx). An entry is
  deleted when its last device acknowledged it, or MESSAGE_TTL after it was queued. TTL of the
  three: MESSAGE_TTL after the last message queued (STORE_MESSAGE_LUA).
- `pn:{<aor>}:msglock:<device_id>` (`message_lock_key`) string, the token of the device's delivery
  chain in flight (one chain per device). TTL: MESSAGE_LOCK_TTL, refreshed at every MESSAGE sent.
  `pn:{<aor>}:msgagain:<device_id>` (`message_again_key`) string, the binding a REGISTER that found
  the chain busy wants it to go on to. TTL: MESSAGE_LOCK_TTL.

Apps (secrets live in the app hash by design; the SIP workers' Redis user needs only `pn:apps`):
- `pn:app:<provider>:<app_id>` (`app_key`, scan pattern APP_KEY_PATTERN) hash, app credentials
  (`encode_app`), with field `aliases` (comma-separated, omitted when none): the other names
  devices may give the app (an FCM device names it by its `pn-param`: the sender id or the
  package name as often as the project id). No TTL.
- `pn:app:<provider>:<alias>` (`app_key` of an alias) hash, one per alias: a copy of its app's
  hash (`encode_app_alias`: the same fields, `app_id` the app's own id, plus field `alias`), so the
  dispatcher resolves a device's app id, alias or not, with one HGETALL of one key (a pointer
  would cost a second read, and a script following it could cross Redis Cluster slots). No TTL;
  written with its app (save, enable, disable), removed with the alias or the app, repaired by
  reindex (`SyncStore.save_app`, `remove_app`, `reindex_apps`). An app id or alias names one app.
- `pn:apps` (APP_INDEX_KEY) hash, `<provider>:<app_id>` (`app_index_field`) -> `enabled`/`disabled`
  (`app_index_value`): which apps exist, without their secrets (the SIP workers refuse REGISTERs
  naming an app not here), and one field `<provider>:<alias>` per alias, with its app's state. No
  TTL; written with the app, removed with it (an alias's field with the alias).
- `pn:appstatus:{<provider>:<app_id>}` (`app_status_key`) hash, operator status: last error, env
  suspicion, counters. TTL: APP_STATUS_TTL after its last write (every write refreshes it: an app
  that still pushes keeps its status, one nobody pushes to any more, or an app id invented by a
  REGISTER, goes away); removed with its app.
- `pn:appwin:{<provider>:<app_id>}` (`app_window_key`) list, recent push outcomes of the app
  (`window_entry`, newest first, at most `astore.ENV_WINDOW_PUSHES`). TTL: ENV_WINDOW_SECONDS,
  refreshed by every push; removed with its app.

Shared:
- `pn:uamap` (UAMAP_KEY) hash, UA mapping name -> JSON (`encode_ua_mapping`). No TTL.
- `pn:sub:<user>@<domain>` (`subscriber_key`) hash, SIP digest credentials: `ha1` (see
  `credentials.ha1`) and `realm`. No TTL; written by the operator CLI.
- `pn:rrsecret` (ROUTE_SECRET_KEY) string, the key that signs this deployment's Record-Route
  (`credentials.route_secret`): set once (SET NX) by the first Kamailio to start. No TTL.
Metrics (hash tag `{metrics}`; written by every dispatcher, read by `pushlib.metrics`; no TTL,
counters only grow; fields are built from fixed sets: providers, push kinds, outcome names, bucket
indexes, never from a request):
- `pn:{metrics}:pushes` (METRICS_PUSHES_KEY) hash, `<provider>|<kind>|<outcome>`
  (`metrics_push_field`) -> final outcomes of device pushes.
- `pn:{metrics}:latency` (METRICS_LATENCY_KEY) hash, `<provider>|<i>` (`metrics_bucket_field`) ->
  pushes whose latency (job created -> provider answered) fell in bucket i of
  METRICS_LATENCY_BUCKETS (not cumulative; i = len(buckets) is +Inf), `<provider>|sum` (seconds,
  HINCRBYFLOAT) and `<provider>|count`.
- `pn:{metrics}:events` (METRICS_EVENTS_KEY) hash, one of METRICS_EVENTS -> count.

- the job stream: `Settings.stream` (default `pn:jobs`, consumer group `Settings.group`), entries
  of flat string fields (`encode_job`). No TTL: XADD trims it to about `Settings.stream_maxlen`
  entries and the dispatcher deletes every entry that reached a final outcome.

HTTP API (`pushlib.api`; its keys share one hash tag each, so a transaction works on Redis Cluster):
- `pn:user:<user_uuid>` (`user_key`) string, the AOR (`sip:user@domain`) an API client's user uuid
  names (Wazo's `user_uuid`). No TTL; written by the API or `pushlib-admin users map`.
- `pn:{apikeys}:key:<key_id>` (`api_key_key`) hash, one API key (`apikeys.encode_api_key`): the
  sha256 of its secret (never the secret), scopes, tenant, name, created_at. No TTL.
- `pn:{apikeys}:ids` (API_KEY_IDS_KEY) set of the key ids. No TTL.
- `pn:{tenants}:t:<tenant_id>` (`tenant_key`) hash, one tenant: name, created_at. No TTL.
- `pn:{tenants}:ids` (TENANT_IDS_KEY) set of the tenant ids. No TTL.
- `pn:{tenants}:domains` (TENANT_DOMAINS_KEY) hash, SIP domain -> the tenant owning it. No TTL.
- `pn:{tenants}:apps` (TENANT_APPS_KEY) hash, `<provider>:<app_id>` -> the tenant owning the app.
  No TTL.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from pushlib.aor import ascii_lower
from pushlib.models import (
    AppCredentials,
    Device,
    ParkedCall,
    Provider,
    PushJob,
    PushKind,
    PushParams,
    UaMapping,
)

log = logging.getLogger(__name__)
_R = TypeVar("_R")
_T = TypeVar("_T")

UAMAP_KEY = "pn:uamap"
APP_INDEX_KEY = "pn:apps"
APP_KEY_PATTERN = "pn:app:*"
# How far back the per-app BadDeviceToken window looks.
ENV_WINDOW_SECONDS = 600
# An app's status hash lives this long after its last write (each write refreshes it).
APP_STATUS_TTL = 30 * 24 * 3600
# An idempotency mark outlives any job's deadline by far.
SENT_MARK_TTL = 24 * 3600
# A parked call's keys outlive its wait window by this much (seconds).
PARKED_TTL_MARGIN = 60


class DecodeError(ValueError):
    """A stored record or a stream entry that cannot be turned back into a model object."""


def finite_float(raw: str | float, what: str) -> float:
    """`raw` as a finite float; ValueError for NaN, +/-inf and anything that is not a number
    (a NaN deadline would compare False with every time, an infinite one would never pass)."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{what} is not a number: {str(raw)[:40]!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} is not a finite number: {value!r}")
    return value


def device_key(aor: str, device_id: str) -> str:
    return f"pn:{{{aor}}}:dev:{device_id}"


def devices_key(aor: str) -> str:
    return f"pn:{{{aor}}}:devs"


def app_key(provider: str, app_id: str) -> str:
    return f"pn:app:{provider}:{app_id}"


def app_index_field(provider: str, app_id: str) -> str:
    return f"{provider}:{app_id}"


def app_index_value(enabled: bool) -> str:
    return "enabled" if enabled else "disabled"


def app_status_key(provider: str, app_id: str) -> str:
    return f"pn:appstatus:{{{provider}:{app_id}}}"


def app_window_key(provider: str, app_id: str) -> str:
    return f"pn:appwin:{{{provider}:{app_id}}}"


# Operator-facing status fields that saving new credentials resets.
APP_STATUS_RESET_FIELDS = ("last_error", "last_error_at", "env_suspect", "env_suspect_at")


def sent_key(aor: str, job_id: str, device_id: str) -> str:
    return f"pn:{{{aor}}}:sent:{job_id}:{device_id}"


def call_key(aor: str, key: str) -> str:
    """A parked call's hash (`call_key(aor, "")` is the prefix of the AOR's calls)."""
    return f"pn:{{{aor}}}:call:{key}"


def pending_key(aor: str, device_id: str) -> str:
    return f"pn:{{{aor}}}:pend:{device_id}"


def messages_key(aor: str) -> str:
    return f"pn:{{{aor}}}:msgs"


def message_meta_key(aor: str) -> str:
    return f"pn:{{{aor}}}:msgmeta"


def message_cursor_key(aor: str) -> str:
    return f"pn:{{{aor}}}:msgcur"


def message_lock_key(aor: str, device_id: str) -> str:
    return f"pn:{{{aor}}}:msglock:{device_id}"


def message_again_key(aor: str, device_id: str) -> str:
    return f"pn:{{{aor}}}:msgagain:{device_id}"


ROUTE_SECRET_KEY = "pn:rrsecret"

METRICS_PUSHES_KEY = "pn:{metrics}:pushes"
METRICS_LATENCY_KEY = "pn:{metrics}:latency"
METRICS_EVENTS_KEY = "pn:{metrics}:events"
#: Upper bounds (seconds) of the push latency histogram's buckets: a call push must land well
#: inside the wait window, so the resolution is where a ringing phone notices (10 ms .. 10 s).
METRICS_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: The outcome names a device push is counted under (`metrics_push_field`): the dispatcher's
#: final outcomes, `suspect` being Outcome.DEVICE_SUSPECT.
METRICS_PUSH_OUTCOMES = ("delivered", "token_dead", "suspect", "retryable", "config_error", "rejected",
                         "deadline_dropped", "quarantined_skipped", "dead_skipped", "already_sent", "no_token")
#: The dispatcher's event counters (METRICS_EVENTS_KEY fields).
METRICS_EVENTS = ("dead_tokens_removed", "devices_quarantined", "jobs_deadline_dropped", "jobs_malformed",
                  "jobs_failed")


def metrics_push_field(provider: str, kind: str, outcome: str) -> str:
    return f"{provider}|{kind}|{outcome}"


def metrics_bucket_field(provider: str, index: int | str) -> str:
    """`<provider>|<bucket index>`, or `<provider>|sum` / `<provider>|count`."""
    return f"{provider}|{index}"


def metrics_bucket_index(seconds: float) -> int:
    """The METRICS_LATENCY_BUCKETS index a latency falls in (len(buckets) for +Inf)."""
    for i, bound in enumerate(METRICS_LATENCY_BUCKETS):
        if seconds <= bound:
            return i
    return len(METRICS_LATENCY_BUCKETS)


def subscriber_key(user: str, domain: str) -> str:
    # the domain in the AOR's spelling (pushlib.aor): REGISTER's To and the CLI meet on one key
    return f"pn:sub:{user}@{ascii_lower(domain)}"


def user_key(user_uuid: str) -> str:
    return f"pn:user:{user_uuid}"


API_KEY_IDS_KEY = "pn:{apikeys}:ids"
TENANT_IDS_KEY = "pn:{tenants}:ids"
TENANT_DOMAINS_KEY = "pn:{tenants}:domains"
TENANT_APPS_KEY = "pn:{tenants}:apps"


def api_key_key(key_id: str) -> str:
    return f"pn:{{apikeys}}:key:{key_id}"


def tenant_key(tenant_id: str) -> str:
    return f"pn:{{tenants}}:t:{tenant_id}"


def window_entry(ts: float, bad: bool) -> str:
    """One entry of an app's environment window list (read back by `env_suspicious`)."""
    return f"{ts!r}:{int(bad)}"


def decode_or_log(decode: Callable[[_R], _T], raw: _R, scope: str, name: str) -> _T | None:
    """Decode a stored record; a corrupt one is logged (without its content: it may hold
    secrets) and treated as absent rather than breaking every caller."""
    try:
        return decode(raw)
    except DecodeError as exc:
        log.error("store: ignoring corrupt record %s/%s: %s", scope, name, str(exc)[:120])
        return None


# --- devices -------------------------------------------------------------------------------

# Token fields are omitted from the hash when None, so "no token" is one unambiguous state.
_OPTIONAL_DEVICE_FIELDS = ("voip_token", "alert_token", "team_id")
TOKEN_FIELDS = ("voip_token", "alert_token")


#: The device hash field that marks a tombstone (`Device.dead`): "1" once every token died at the
#: provider (`astore.AsyncStore.remove_token`); absent on a live device.
DEVICE_DEAD_FIELD = "dead"


def encode_device(device: Device) -> dict[str, str]:
    """Every Device and PushParams field as flat hash fields (absent optional fields omitted)."""
    p = device.params
    out = {
        "aor": device.aor,
        "device_id": device.device_id,
        "provider": p.provider.value,
        "app_id": p.app_id,
        "sandbox": "1" if p.sandbox else "0",
        "contact": device.contact,
        "user_agent": device.user_agent,
        "registered_at": repr(float(device.registered_at)),
        "expires_at": repr(float(device.expires_at)),
        "quarantined_until": repr(float(device.quarantined_until)),
    }
    if device.dead:  # absent = alive (records written before tombstones existed have no field)
        out[DEVICE_DEAD_FIELD] = "1"
    for name in _OPTIONAL_DEVICE_FIELDS:
        value = getattr(p, name)
        if value is not None:
            out[name] = value
    return out


def decode_device(raw: Mapping[str, str]) -> Device:
    """Inverse of `encode_device`; raises DecodeError on a missing or malformed field."""
    try:
        params = PushParams(
            provider=Provider(raw["provider"]),
            app_id=raw["app_id"],
            voip_token=raw.get("voip_token") or None,
            alert_token=raw.get("alert_token") or None,
            team_id=raw.get("team_id") or None,
            sandbox=raw.get("sandbox") == "1",
        )
        return Device(
            aor=raw["aor"],
            device_id=raw["device_id"],
            params=params,
            contact=raw.get("contact", ""),
            user_agent=raw.get("user_agent", ""),
            registered_at=finite_float(raw.get("registered_at", "0"), "registered_at"),
            expires_at=finite_float(raw.get("expires_at", "0"), "expires_at"),
            quarantined_until=finite_float(raw.get("quarantined_until", "0"), "quarantined_until"),
            dead=raw.get(DEVICE_DEAD_FIELD) == "1",
        )
    except (KeyError, ValueError) as exc:
        raise DecodeError(f"bad device record: {exc!r}") from exc


# --- apps ------------------------------------------------------------------------------------

_APP_BOOL_FIELDS = ("enabled", "sandbox")
_APP_STR_FIELDS = tuple(
    f.name for f in fields(AppCredentials) if f.name not in ("provider", "app_id", "aliases", *_APP_BOOL_FIELDS)
)
# The field of an alias's copy of its app's hash that names the alias (`encode_app_alias`).
APP_ALIAS_FIELD = "alias"


def check_app_name(name: str) -> str:
    """`name` if it can be an app id or alias in the stored encoding (non-empty, no comma: the
    `aliases` field joins them with commas; no whitespace or control characters); ValueError
    otherwise. What a device can actually name is the push-parameter parser's business."""
    if not name or "," in name or any(c.isspace() or not c.isprintable() for c in name):
        raise ValueError(f"not a usable app name: {name[:80]!r}")
    return name


def encode_app(app: AppCredentials) -> dict[str, str]:
    """Every AppCredentials field as hash fields (None fields and an empty alias list omitted).
    ValueError for an alias `check_app_name` refuses."""
    out = {
        "provider": app.provider.value,
        "app_id": app.app_id,
        "enabled": "1" if app.enabled else "0",
        "sandbox": "1" if app.sandbox else "0",
    }
    for name in _APP_STR_FIELDS:
        value = getattr(app, name)
        if value is not None:
            out[name] = value
    if app.aliases:
        out["aliases"] = ",".join(check_app_name(a) for a in app.aliases)
    return out


def encode_app_alias(app: AppCredentials, alias: str) -> dict[str, str]:
    """The hash stored under `app_key(provider, alias)`: the app's own fields (so it decodes to
    the app itself, `app_id` included) plus APP_ALIAS_FIELD naming the alias."""
    return {**encode_app(app), APP_ALIAS_FIELD: check_app_name(alias)}


def decode_app(raw: Mapping[str, str]) -> AppCredentials:
    """Inverse of `encode_app` (an alias's copy decodes to its app)."""
    try:
        optional: dict[str, str | None] = {name: raw.get(name) or None for name in _APP_STR_FIELDS}
        return AppCredentials(
            provider=Provider(raw["provider"]),
            app_id=raw["app_id"],
            enabled=raw.get("enabled", "1") == "1",
            sandbox=raw.get("sandbox") == "1",
            aliases=tuple(a for a in raw.get("aliases", "").split(",") if a),
            **optional,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise DecodeError(f"bad app record: {exc!r}") from exc


def describe_app(app: AppCredentials) -> str:
    """A log-safe description of an app: never the secrets (the dataclass repr would print them)."""
    if app.apns_key_pem:
        auth = f"token key_id={app.apns_key_id} team={app.apns_team_id}"
    elif app.apns_cert_pem:
        auth = "certificate"
    elif app.fcm_service_account:
        auth = "service-account"
    else:
        auth = "no-credentials"
    host = f" host={app.custom_host}" if app.custom_host else ""
    aliases = f" aliases={','.join(app.aliases)}" if app.aliases else ""
    return (f"{app.provider.value}:{app.app_id} auth={auth} sandbox={app.sandbox} enabled={app.enabled}"
            f"{host}{aliases}")


# --- UA mappings ---------------------------------------------------------------------------


def encode_ua_mapping(m: UaMapping) -> str:
    return json.dumps({f.name: getattr(m, f.name) for f in fields(UaMapping)}, sort_keys=True)


def decode_ua_mapping(raw: str) -> UaMapping:
    try:
        obj = json.loads(raw)
        if not isinstance(obj, dict):
            raise ValueError("not an object")
        known = {f.name for f in fields(UaMapping)}
        return UaMapping(**{k: str(v) for k, v in obj.items() if k in known})
    except (ValueError, TypeError) as exc:
        raise DecodeError(f"bad UA mapping: {exc!r}") from exc


# --- parked calls ------------------------------------------------------------------------------

PARKED_DEVICE_PREFIX = "dev:"  # field `dev:<device_id>` of a parked call: `pushed` or `woken`
PUSHED = "pushed"
WOKEN = "woken"


def parked_device_field(device_id: str) -> str:
    return f"{PARKED_DEVICE_PREFIX}{device_id}"


def parked_ttl(deadline: float, now: float) -> int:
    """Seconds a parked call's keys live: its wait window plus PARKED_TTL_MARGIN, at least 1."""
    return max(1, int(deadline - now) + PARKED_TTL_MARGIN)


def encode_parked_call(call: ParkedCall) -> dict[str, str]:
    """A parked call's hash fields; every pushed device starts as `pushed`."""
    out = {
        "call_id": call.call_id,
        "cseq": call.cseq,
        "caller_name": call.caller_name,
        "caller_number": call.caller_number,
        "deadline": f"{call.deadline:.3f}",
    }
    out.update({parked_device_field(d): PUSHED for d in call.pushed})
    return out


def decode_parked_call(aor: str, key: str, raw: Mapping[str, str]) -> ParkedCall | None:
    """Inverse of `encode_parked_call` (with the devices' current states); None for a hash that
    is gone or was never completed."""
    if not raw or "call_id" not in raw:
        return None
    devices = {f.removeprefix(PARKED_DEVICE_PREFIX): v for f, v in raw.items() if f.startswith(PARKED_DEVICE_PREFIX)}
    return ParkedCall(
        aor=aor,
        key=key,
        call_id=raw["call_id"],
        cseq=raw.get("cseq", ""),
        caller_name=raw.get("caller_name", ""),
        caller_number=raw.get("caller_number", ""),
        deadline=float(raw.get("deadline", "0") or 0),
        pushed=tuple(sorted(devices)),
        woken=tuple(sorted(d for d, state in devices.items() if state == WOKEN)),
    )


# --- jobs --------------------------------------------------------------------------------------


def encode_job(job: PushJob) -> dict[str, str]:
    """A job as flat string stream fields. Device ids must not contain commas; the deadline and
    creation time must be finite numbers (ValueError otherwise, as `decode_job` would refuse them)."""
    finite_float(job.deadline, "deadline")
    finite_float(job.created_at, "created_at")
    for device_id in job.device_ids:
        if "," in device_id:
            raise ValueError(f"device id with a comma cannot be queued: {device_id!r}")
    return {
        "job_id": job.job_id,
        "kind": job.kind.value,
        "aor": job.aor,
        "deadline": repr(float(job.deadline)),
        "device_ids": ",".join(job.device_ids),
        "data": json.dumps(dict(job.data), separators=(",", ":"), ensure_ascii=False),
        "created_at": repr(float(job.created_at)),
    }


def decode_job(raw: Mapping[str, str]) -> PushJob:
    """Inverse of `encode_job`; raises DecodeError on anything malformed, including a deadline or
    creation time that is not a finite number."""
    try:
        data = json.loads(raw.get("data", "{}"))
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()
        ):
            raise ValueError("data must be a JSON object of strings")
        device_ids = tuple(d for d in raw.get("device_ids", "").split(",") if d)
        job_id = raw["job_id"]
        aor = raw["aor"]
        if not job_id or not aor:
            raise ValueError("empty job_id or aor")
        return PushJob(
            job_id=job_id,
            kind=PushKind(raw["kind"]),
            aor=aor,
            deadline=finite_float(raw["deadline"], "deadline"),
            device_ids=device_ids,
            data=data,
            created_at=finite_float(raw.get("created_at", "0"), "created_at"),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise DecodeError(f"bad job entry: {exc!r}") from exc


# --- device save planning (shared by both clients so the cap and TTL rules live once) -------

MIN_DEVICE_TTL = 5  # seconds: a device that is (almost) expired still lives long enough to be read back


def ttl_until(expires_at: float, now: float) -> int:
    """Seconds a key should live to expire at `expires_at`, never below MIN_DEVICE_TTL."""
    return max(MIN_DEVICE_TTL, int(expires_at - now + 0.999))


@dataclass(frozen=True)
class SavePlan:
    """What `save_device` changes: ids to evict (returned to the caller), stale ids (hash already
    expired, dropped silently from the set), the device key TTL and the AOR set TTL."""

    evict: tuple[str, ...]
    stale: tuple[str, ...]
    device_ttl: int
    set_ttl: int


def same_phone(device: Device, provider: str | None, app_id: str | None, voip_token: str | None,
               alert_token: str | None) -> bool:
    """Whether a stored record (its provider, app and tokens) is the phone `device` is: a push
    token of one app is one device, whatever device id (+sip.instance or not) it was saved under."""
    p = device.params
    if provider != p.provider.value or app_id != p.app_id:
        return False
    return bool((p.voip_token and p.voip_token == voip_token) or (p.alert_token and p.alert_token == alert_token))


# --- scripts: one round trip per SIP event -----------------------------------------------------
# Every key a script touches shares the AOR's hash tag (one Redis Cluster slot); keys built inside
# a script come from a prefix passed in ARGV, as for the other scripts of this schema.

#: KEYS[1]: an AOR's device set. ARGV[1]: the prefix of its device hashes (`device_key(aor, "")`).
#: Returns {[id, [field, value, ...], ...] for the live devices, [ids whose hash expired]}. Read
#: only (flag no-writes: it runs even when Redis refuses writes); save_device drops the expired ids.
DEVICES_LUA = """#!lua flags=no-writes
local live, stale = {}, {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local raw = redis.call('HGETALL', ARGV[1] .. id)
  if #raw == 0 then table.insert(stale, id) else table.insert(live, id); table.insert(live, raw) end
end
return {live, stale}
"""

#: KEYS[1]: the device hash, KEYS[2]: the AOR's device set. ARGV: [1] the other members the plan
#: was made from (sorted, NUL-separated), [2] the device id, [3] device TTL, [4] set TTL, [5] the
#: prefix of device hashes, [6] how many ids to drop from the set (n), [7] how many of those are
#: evicted hashes to delete (the first m), then the n ids, then the device's field/value pairs.
#: Returns 0 (nothing written) when the set changed since it was read: the caller plans again.
#: (A script with a shebang is refused as a whole when Redis refuses writes, e.g. out of memory:
#: never half a save.)
SAVE_DEVICE_LUA = """#!lua
local others = {}
for _, m in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if m ~= ARGV[2] then table.insert(others, m) end
end
table.sort(others)
if table.concat(others, '\\0') ~= ARGV[1] then return 0 end
local n, m = tonumber(ARGV[6]), tonumber(ARGV[7])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 8 + n))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[2])
for i = 8, 7 + n do
  redis.call('SREM', KEYS[2], ARGV[i])
  if i < 8 + m then redis.call('DEL', ARGV[5] .. ARGV[i]) end
end
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
"""

#: The common REGISTER, a device refreshing the record it already has (same tokens, still listed,
#: not dead), in one round trip. KEYS[1]: the device hash, KEYS[2]: the AOR's device set, then
#: the optional keys ARGV[3] names. ARGV: [1] the device id, [2] the device's TTL, [3] what else to
#: do: '' or a mix of 'p' (KEYS[3] is a key of the AOR whose existence to report: its message
#: queue) and 'w' (the device woke for parked calls: the last key is its pending set; the wake
#: of PARKED_WAKE_LUA is done with ARGV[4..6]: the prefix of the AOR's call keys, the device's
#: field in a call hash, its woken state), [7] n, then n identity field/value pairs that must hold
#: (an absent field reads ''), then the hash's field/value pairs. Returns 0 when any identity
#: differs, with nothing written or woken (SAVE_DEVICE_LUA's full save then decides evictions),
#: else 1, or 2 when the 'p' key exists. No other device can hold the same tokens (the full save
#: evicted such duplicates when these tokens were written) and the device count is unchanged, so
#: there is nothing to evict; the set's TTL only grows.
REFRESH_DEVICE_LUA = """#!lua
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 0 then return 0 end
local n = tonumber(ARGV[7])
for i = 8, 6 + 2 * n, 2 do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if (v or '') ~= ARGV[i + 1] then return 0 end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 8 + 2 * n))
redis.call('EXPIRE', KEYS[1], ARGV[2])
if redis.call('TTL', KEYS[2]) < tonumber(ARGV[2]) then redis.call('EXPIRE', KEYS[2], ARGV[2]) end
if string.find(ARGV[3], 'w', 1, true) then
  local pend = KEYS[#KEYS]
  for _, k in ipairs(redis.call('SMEMBERS', pend)) do
    local ck = ARGV[4] .. k
    if redis.call('EXISTS', ck) == 1 then redis.call('HSET', ck, ARGV[5], ARGV[6]) end
  end
  redis.call('DEL', pend)
end
if string.find(ARGV[3], 'p', 1, true) and redis.call('EXISTS', KEYS[3]) == 1 then return 2 end
return 1
"""

#: The wake of a device that re-registered (see ParkedCalls.wake): KEYS[1] its pending set, ARGV
#: the prefix of the AOR's call keys, the device's field in a call hash, its woken state.
WakeArgs = tuple[str, str, str, str]


def wake_args(aor: str, device_id: str) -> WakeArgs:
    """(pending set key, call key prefix, device field, woken state) for a device's wake."""
    return pending_key(aor, device_id), call_key(aor, ""), parked_device_field(device_id), WOKEN


#: The fields whose values make a device record "the same phone" (see `same_phone`) or dead:
#: a save that changes none of them can take REFRESH_DEVICE_LUA's one round trip.
DEVICE_IDENTITY_FIELDS = ("provider", "app_id", "voip_token", "alert_token", DEVICE_DEAD_FIELD)


def device_identity(device: Device) -> list[str]:
    """REFRESH_DEVICE_LUA's identity pairs for `device`, flattened."""
    fields = encode_device(device)
    return [x for name in DEVICE_IDENTITY_FIELDS for x in (name, fields.get(name, ""))]


#: KEYS[1]: the parked call's hash. ARGV: [1] TTL, [2] the prefix of the AOR's pending sets,
#: [3] the call's key, [4] how many devices were pushed (n), then the n device ids, then the
#: hash's field/value pairs. Returns 0 when the call was already parked (a retransmission).
PARK_LUA = """#!lua
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local n = tonumber(ARGV[4])
redis.call('HSET', KEYS[1], unpack(ARGV, 5 + n))
redis.call('EXPIRE', KEYS[1], ARGV[1])
for i = 5, 4 + n do
  redis.call('SADD', ARGV[2] .. ARGV[i], ARGV[3])
  redis.call('EXPIRE', ARGV[2] .. ARGV[i], ARGV[1])
end
return 1
"""

#: KEYS[1]: the parked call's hash. ARGV: [1] the field prefix of its devices, [2] the prefix of
#: the AOR's pending sets, [3] the call's key. Deletes the hash and takes the call out of its
#: devices' pending sets; returns the hash as it was ([] when another process ended it first).
FINISH_LUA = """
local raw = redis.call('HGETALL', KEYS[1])
if #raw == 0 then return raw end
redis.call('DEL', KEYS[1])
local plen = string.len(ARGV[1])
for i = 1, #raw, 2 do
  if string.sub(raw[i], 1, plen) == ARGV[1] then
    redis.call('SREM', ARGV[2] .. string.sub(raw[i], plen + 1), ARGV[3])
  end
end
return raw
"""


def pairs_to_dict(flat: Sequence[str]) -> dict[str, str]:
    """A script's HGETALL reply (field, value, field, value, ...) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def members_token(ids: Iterable[str]) -> str:
    """How SAVE_DEVICE_LUA compares the set it finds with the one a plan was made from."""
    return "\0".join(sorted(ids))


def plan_device_save(
    device: Device, others: Mapping[str, tuple[float, float] | None], max_devices: int, now: float,
    duplicates: frozenset[str] = frozenset(),
) -> SavePlan:
    """Decide a save: `others` maps every other id in the AOR set to (registered_at, expires_at),
    or None when its hash is gone; `duplicates` are other ids holding the same phone (same_phone).
    Evicts the duplicates, then keeps at most `max_devices` live devices, evicting the oldest by
    registered_at (never the one being saved)."""
    stale = tuple(sorted(i for i, v in others.items() if v is None))
    dups = tuple(sorted(i for i in duplicates if others.get(i) is not None))
    live = sorted(((v[0], i) for i, v in others.items() if v is not None and i not in duplicates))
    overflow = max(0, len(live) + 1 - max(1, max_devices))
    evict = dups + tuple(i for _, i in live[:overflow])
    kept_expiry = [exp for (_, exp) in (others[i] or (0.0, 0.0) for _, i in live[overflow:])]
    device_ttl = ttl_until(device.expires_at, now)
    set_ttl = max([device_ttl, *(ttl_until(e, now) for e in kept_expiry)])
    return SavePlan(evict=evict, stale=stale, device_ttl=device_ttl, set_ttl=set_ttl)


# --- app status (operator view) ----------------------------------------------------------------


def env_suspicious(window: list[str], now: float) -> tuple[int, int]:
    """(recent pushes, recent BadDeviceToken) from window entries `<ts>:<0|1>` in the last
    ENV_WINDOW_SECONDS."""
    total = bad = 0
    for entry in window:
        ts, _, flag = entry.partition(":")
        try:
            if float(ts) < now - ENV_WINDOW_SECONDS:
                continue
        except ValueError:
            continue
        total += 1
        bad += flag == "1"
    return total, bad


def app_status_view(raw: Mapping[str, str], window: list[str], now: float) -> dict[str, Any]:
    """Operator view of an app: last_error (+_at), env_suspect (+_at), counters per outcome and the
    recent window (pushes, bad_device_token)."""
    total, bad = env_suspicious(window, now)

    def as_float(name: str) -> float | None:
        return float(raw[name]) if name in raw else None

    return {
        "last_error": raw.get("last_error"),
        "last_error_at": as_float("last_error_at"),
        "env_suspect": raw.get("env_suspect"),
        "env_suspect_at": as_float("env_suspect_at"),
        "counters": {k.removeprefix("count:"): int(v) for k, v in raw.items() if k.startswith("count:")},
        "recent": {"pushes": total, "bad_device_token": bad},
    }


# --- messages to sleeping devices (pushlib.msgstore) --------------------------------------------
# KEYS of the three: [1] `messages_key`, [2] `message_meta_key`, [3] `message_cursor_key` of one
# AOR (one hash tag). Times are Redis's own (TIME): the stream ids are made from that clock too.

#: ARGV: [1] MESSAGE_TTL in ms, [2] most messages queued, [3] most body bytes queued, [4] this
#: message's size, [5] how many devices it is for, [6] their ids (comma-separated), then the
#: message's field/value pairs. Drops the expired entries first. Returns {1, entry id}, or
#: {-1, messages queued} / {-2, bytes queued} when it does not fit (nothing is written then).
STORE_MESSAGE_LUA = """#!lua
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', tostring(now - ttl - 1), 'COUNT', 1000)) do
  local f = e[2]
  for i = 1, #f, 2 do
    if f[i] == 'size' then redis.call('HINCRBY', KEYS[2], 'bytes', -tonumber(f[i + 1])) end
  end
  redis.call('HDEL', KEYS[2], 'left:' .. e[1])
  redis.call('XDEL', KEYS[1], e[1])
end
local count = redis.call('XLEN', KEYS[1])
if count >= tonumber(ARGV[2]) then return {-1, count} end
local bytes = tonumber(redis.call('HGET', KEYS[2], 'bytes') or '0')
if bytes + tonumber(ARGV[4]) > tonumber(ARGV[3]) then return {-2, bytes} end
local id = redis.call('XADD', KEYS[1], '*', 'for', ARGV[6], 'size', ARGV[4], unpack(ARGV, 7))
redis.call('HINCRBY', KEYS[2], 'bytes', ARGV[4])
redis.call('HSET', KEYS[2], 'left:' .. id, ARGV[5])
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ttl + 60000) end
return {1, id}
"""

#: KEYS: [1] the stream, [2] the cursor hash. ARGV: [1] device id, [2] MESSAGE_TTL in ms. The
#: oldest unexpired entry for the device after its cursor ({id, {field, value, ...}}), or {}.
NEXT_MESSAGE_LUA = """#!lua flags=no-writes
local t = redis.call('TIME')
local oldest = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[2])
local cur = redis.call('HGET', KEYS[2], ARGV[1]) or '0-0'
local dev = ',' .. ARGV[1] .. ','
while true do
  local batch = redis.call('XRANGE', KEYS[1], '(' .. cur, '+', 'COUNT', 50)
  if #batch == 0 then return {} end
  for _, e in ipairs(batch) do
    local f = e[2]
    if tonumber(string.match(e[1], '^(%d+)')) >= oldest then
      for i = 1, #f, 2 do
        if f[i] == 'for' and string.find(',' .. f[i + 1] .. ',', dev, 1, true) then return e end
      end
    end
    cur = e[1]
  end
end
"""

#: ARGV: [1] device id, [2] the entry id its 2xx acknowledges. Moves the device's cursor there and
#: counts the device off every entry for it up to there; an entry nobody waits for any more is
#: deleted. Returns 0 for an entry already acknowledged (a late or repeated 2xx), 1 otherwise.
ACK_MESSAGE_LUA = """#!lua
local function before(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local cur = redis.call('HGET', KEYS[3], ARGV[1]) or '0-0'
if not before(cur, ARGV[2]) then return 0 end
local dev = ',' .. ARGV[1] .. ','
for _, e in ipairs(redis.call('XRANGE', KEYS[1], '(' .. cur, ARGV[2])) do
  local f, size, mine = e[2], 0, false
  for i = 1, #f, 2 do
    if f[i] == 'for' then mine = string.find(',' .. f[i + 1] .. ',', dev, 1, true) ~= nil
    elseif f[i] == 'size' then size = tonumber(f[i + 1]) end
  end
  if mine and redis.call('HINCRBY', KEYS[2], 'left:' .. e[1], -1) <= 0 then
    redis.call('HDEL', KEYS[2], 'left:' .. e[1])
    redis.call('HINCRBY', KEYS[2], 'bytes', -size)
    redis.call('XDEL', KEYS[1], e[1])
  end
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[3], ttl) end
return 1
"""

#: KEYS[1]: a device's chain lock, `<token>\t<target>`. ARGV: [1] the new chain's value, [2] its
#: target (the binding it sends to), [3] ms to live. Taken when free, or taken over from a chain
#: towards another binding (the phone came back over a new connection: the old chain's MESSAGE in
#: flight may wait out tm's timeout, and its reply no longer counts); returns 0 when a chain
#: towards this same binding is in flight (it goes on), 1 when taken.
CLAIM_MESSAGE_LOCK_LUA = """#!lua
local cur = redis.call('GET', KEYS[1])
if cur then
  local tab = string.find(cur, '\t', 1, true)
  if tab and string.sub(cur, tab + 1) == ARGV[2] then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
"""

#: KEYS[1]: a device's chain lock. ARGV: [1] the chain's lock value, [2] ms to live (0: release). Acts
#: only when the lock is still this chain's; returns 1 then, else 0.
MESSAGE_LOCK_LUA = """#!lua
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) else redis.call('DEL', KEYS[1]) end
return 1
"""
