"""Redis key layout and (de)serialisation shared by the sync and async stores.

Both store clients and the dispatcher read and write the same keys, so the layout and the
field encodings live here, once. Keys that are changed together carry the same hash tag
(`{<aor>}`) so multi-key transactions also work on Redis Cluster.

Layout:
- `pn:{<aor>}:dev:<device_id>`  hash, one device (expires with its contact)
- `pn:{<aor>}:devs`             set of the AOR's device ids (cleaned lazily of expired ids)
- `pn:app:<provider>:<app_id>`  hash, app credentials (secrets live here by design)
- `pn:apps`                     hash, `<provider>:<app_id>` -> `enabled`/`disabled`: which apps exist,
  without their secrets (the SIP workers refuse REGISTERs naming an app not here, and need no
  access to the credentials to do so). Written with the app, removed with it.
- `pn:appstatus:{<provider>:<app_id>}`  hash, operator status: last error, env suspicion, counters.
  Expires APP_STATUS_TTL after its last write (every write refreshes it: an app that still pushes
  keeps its status, one nobody pushes to any more, or an app id invented by a REGISTER, goes away);
  removed with its app.
- `pn:appwin:{<provider>:<app_id>}`     list, recent push outcomes of the app (sliding window)
- `pn:uamap`                    hash, UA mapping name -> JSON
- `pn:{<aor>}:sent:<job_id>:<device_id>` string, idempotency mark: the provider accepted this
  push. Under the AOR's hash tag so one script reads a job's devices and their marks in one slot.
- the job stream is `Settings.stream` (flat string fields, see `encode_job`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from pushlib.models import AppCredentials, Device, Provider, PushJob, PushKind, PushParams, UaMapping

UAMAP_KEY = "pn:uamap"
APP_INDEX_KEY = "pn:apps"
APP_KEY_PATTERN = "pn:app:*"
# How far back the per-app BadDeviceToken window looks.
ENV_WINDOW_SECONDS = 600
# An app's status hash lives this long after its last write (each write refreshes it).
APP_STATUS_TTL = 30 * 24 * 3600


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


def window_entry(ts: float, bad: bool) -> str:
    """One entry of an app's environment window list (read back by `env_suspicious`)."""
    return f"{ts!r}:{int(bad)}"


# --- devices -------------------------------------------------------------------------------

# Token fields are omitted from the hash when None, so "no token" is one unambiguous state.
_OPTIONAL_DEVICE_FIELDS = ("voip_token", "alert_token", "team_id")
TOKEN_FIELDS = ("voip_token", "alert_token")


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
        )
    except (KeyError, ValueError) as exc:
        raise DecodeError(f"bad device record: {exc!r}") from exc


# --- apps ------------------------------------------------------------------------------------

_APP_BOOL_FIELDS = ("enabled", "sandbox")
_APP_STR_FIELDS = tuple(
    f.name for f in fields(AppCredentials) if f.name not in ("provider", "app_id", *_APP_BOOL_FIELDS)
)


def encode_app(app: AppCredentials) -> dict[str, str]:
    """Every AppCredentials field as hash fields (None fields omitted)."""
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
    return out


def decode_app(raw: Mapping[str, str]) -> AppCredentials:
    try:
        optional: dict[str, str | None] = {name: raw.get(name) or None for name in _APP_STR_FIELDS}
        return AppCredentials(
            provider=Provider(raw["provider"]),
            app_id=raw["app_id"],
            enabled=raw.get("enabled", "1") == "1",
            sandbox=raw.get("sandbox") == "1",
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
    return f"{app.provider.value}:{app.app_id} auth={auth} sandbox={app.sandbox} enabled={app.enabled}{host}"


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


def plan_device_save(
    device: Device, others: Mapping[str, tuple[float, float] | None], max_devices: int, now: float
) -> SavePlan:
    """Decide a save: `others` maps every other id in the AOR set to (registered_at, expires_at),
    or None when its hash is gone. Keeps at most `max_devices` live devices, evicting the
    oldest by registered_at (never the one being saved)."""
    stale = tuple(sorted(i for i, v in others.items() if v is None))
    live = sorted(((v[0], i) for i, v in others.items() if v is not None))
    overflow = max(0, len(live) + 1 - max(1, max_devices))
    evict = tuple(i for _, i in live[:overflow])
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
