"""Prometheus metrics of the push side: what every dispatcher counted, read back from Redis.

Several dispatchers may run (standalone ones, and in-process ones inside Kamailio workers), so no
process can answer a scrape from its own memory: each dispatcher buffers its counts in a
`MetricsBuffer` and adds them to shared Redis hashes (`schema.METRICS_*_KEY`) with the per-app
outcome counters, in the pipeline it writes anyway about once a second (`AsyncStore.record_outcomes`).
`render_metrics` reads those hashes, the job stream's consumer group and the apps' status, and
renders them with prometheus_client (a one-scrape collector in its own registry).

Every label value comes from a fixed set (providers, push kinds, outcome names) or from the
configured apps (`pn:apps`); unknown fields found in Redis are ignored, so a scrape's series stay
bounded whatever was written.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from pushlib import schema
from pushlib.models import Outcome, Provider, PushKind
from pushlib.settings import Settings

#: The Content-Type of `render_metrics`' answer: the Prometheus text format 0.0.4, which every
#: Prometheus version reads (all our names are legacy-valid, so the 1.0.0 text would be identical).
CONTENT_TYPE: str = CONTENT_TYPE_PLAIN_0_0_4

_PROVIDERS = frozenset(p.value for p in Provider)
_KINDS = frozenset(k.value for k in PushKind)
_OUTCOMES = frozenset(schema.METRICS_PUSH_OUTCOMES)
_APP_OUTCOMES = frozenset(o.value for o in Outcome)
_BUCKETS = schema.METRICS_LATENCY_BUCKETS
_Increments = dict[tuple[str, str], int | float]


# --- write side (the dispatcher) ------------------------------------------------------------------


class MetricsBuffer:
    """A dispatcher's counts not yet added to Redis, as (key, field) -> increment (a float only
    for the latency sum). Bounded: fields come from fixed sets, anything else is dropped."""

    def __init__(self) -> None:
        self.increments: _Increments = {}

    def _add(self, key: str, name: str, n: int | float = 1) -> None:
        self.increments[(key, name)] = self.increments.get((key, name), 0) + n

    def push(self, provider: str, kind: str, outcome: str) -> None:
        """One device push reached its final `outcome` (a `schema.METRICS_PUSH_OUTCOMES` name)."""
        if provider in _PROVIDERS and kind in _KINDS and outcome in _OUTCOMES:
            self._add(schema.METRICS_PUSHES_KEY, schema.metrics_push_field(provider, kind, outcome))

    def latency(self, provider: str, seconds: float) -> None:
        """A provider answered a push `seconds` after its job was created."""
        if provider not in _PROVIDERS or seconds != seconds:  # NaN: a clock gone wrong
            return
        seconds = max(0.0, seconds)
        key = schema.METRICS_LATENCY_KEY
        self._add(key, schema.metrics_bucket_field(provider, schema.metrics_bucket_index(seconds)))
        self._add(key, schema.metrics_bucket_field(provider, "count"))
        self._add(key, schema.metrics_bucket_field(provider, "sum"), float(seconds))

    def event(self, name: str) -> None:
        """One of `schema.METRICS_EVENTS` happened."""
        if name in schema.METRICS_EVENTS:
            self._add(schema.METRICS_EVENTS_KEY, name)

    def take(self) -> _Increments:
        taken, self.increments = self.increments, {}
        return taken

    def put_back(self, taken: Mapping[tuple[str, str], int | float]) -> None:
        """Return what a failed write took."""
        for (key, name), n in taken.items():
            self._add(key, name, n)


# --- read side (GET /metrics) ---------------------------------------------------------------------


def _s(value: Any) -> str:
    """A reply element as str, whatever the client's decode_responses."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _str_map(raw: Any) -> dict[str, str]:
    if isinstance(raw, Exception) or not raw:
        return {}
    return {_s(k): _s(v) for k, v in dict(raw).items()}


def _number(raw: str | None) -> float | None:
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


@dataclass
class _AppStatus:
    provider: str
    app_id: str
    enabled: bool
    status: dict[str, str]


@dataclass
class _Snapshot:
    """Everything one scrape reports, read from Redis before the collector renders it."""

    pushes: dict[str, str]
    latency: dict[str, str]
    events: dict[str, str]
    stream_length: int | None = None
    group_found: bool = False
    lag: int | None = None
    pending: int | None = None
    oldest_pending_age: float | None = None
    consumers: int | None = None
    apps: list[_AppStatus] = field(default_factory=list)


class _SnapshotCollector(Collector):
    """Renders one `_Snapshot` (a fresh registry per scrape: no state kept between scrapes)."""

    def __init__(self, snap: _Snapshot) -> None:
        self._snap = snap

    def collect(self) -> Iterator[Metric]:
        snap = self._snap
        yield self._pushes(snap.pushes)
        yield self._latency(snap.latency)
        events = {name: _number(snap.events.get(name)) or 0.0 for name in schema.METRICS_EVENTS}
        yield CounterMetricFamily("pushlib_dead_tokens_removed", "Push tokens removed because the provider "
                                  "said they are dead (APNs 410, FCM UNREGISTERED).",
                                  value=events["dead_tokens_removed"])
        yield CounterMetricFamily("pushlib_devices_quarantined", "Devices put in quarantine (pushes to them "
                                  "stopped for a day) after the provider refused their token.",
                                  value=events["devices_quarantined"])
        dropped = CounterMetricFamily("pushlib_jobs_dropped", "Whole push jobs dropped before any push: too "
                                      "late when read, malformed, or failed on a bug.", labels=["reason"])
        for reason, event in (("deadline", "jobs_deadline_dropped"), ("malformed", "jobs_malformed"),
                              ("failed", "jobs_failed")):
            dropped.add_metric([reason], events[event])
        yield dropped
        yield from self._stream(snap)
        yield from self._apps(snap.apps)

    @staticmethod
    def _pushes(raw: Mapping[str, str]) -> Metric:
        family = CounterMetricFamily("pushlib_pushes", "Device pushes by provider, push kind and final outcome.",
                                     labels=["provider", "kind", "outcome"])
        for name, value in sorted(raw.items()):
            parts = name.split("|")
            n = _number(value)
            if (len(parts) == 3 and parts[0] in _PROVIDERS and parts[1] in _KINDS and parts[2] in _OUTCOMES
                    and n is not None):
                family.add_metric(parts, n)
        return family

    @staticmethod
    def _latency(raw: Mapping[str, str]) -> Metric:
        family = HistogramMetricFamily(
            "pushlib_push_latency_seconds",
            "Time from a push job's creation to the provider's answer, per provider.", labels=["provider"])
        for provider in sorted(_PROVIDERS):
            count = _number(raw.get(schema.metrics_bucket_field(provider, "count")))
            if count is None:
                continue
            cumulative = 0.0
            buckets: list[tuple[str, float]] = []
            for i, bound in enumerate(_BUCKETS):
                cumulative += _number(raw.get(schema.metrics_bucket_field(provider, i))) or 0.0
                buckets.append((repr(bound), cumulative))  # 0.01, 1.0: as prometheus_client writes `le`
            cumulative += _number(raw.get(schema.metrics_bucket_field(provider, len(_BUCKETS)))) or 0.0
            # +Inf is the count of every observation: the bucket fields and the count are added in
            # one pipeline, so they agree unless a write was cut in half (then trust the buckets).
            buckets.append(("+Inf", cumulative))
            family.add_metric([provider], buckets,
                              _number(raw.get(schema.metrics_bucket_field(provider, "sum"))) or 0.0)
        return family

    @staticmethod
    def _stream(snap: _Snapshot) -> Iterator[Metric]:
        yield GaugeMetricFamily("pushlib_dispatcher_group_present", "1 when the dispatchers' consumer group "
                                "exists on the job stream (0: no dispatcher ever started).",
                                value=1.0 if snap.group_found else 0.0)
        if snap.stream_length is not None:
            yield GaugeMetricFamily("pushlib_job_stream_length", "Entries in the push job stream.",
                                    value=float(snap.stream_length))
        if snap.lag is not None:
            yield GaugeMetricFamily("pushlib_dispatcher_stream_lag", "Push jobs in the stream that no "
                                    "dispatcher has read yet.", value=float(snap.lag))
        if snap.pending is not None:
            yield GaugeMetricFamily("pushlib_dispatcher_pending", "Push jobs read by a dispatcher and not "
                                    "finished yet (in flight, or left by a dead dispatcher).",
                                    value=float(snap.pending))
        if snap.consumers is not None:
            yield GaugeMetricFamily("pushlib_dispatcher_consumers", "Consumers known to the dispatchers' "
                                    "group (dead ones stay listed).", value=float(snap.consumers))
        if snap.oldest_pending_age is not None:
            yield GaugeMetricFamily("pushlib_dispatcher_oldest_pending_age_seconds", "Age of the oldest "
                                    "pending push job (since it was queued).", value=snap.oldest_pending_age)

    @staticmethod
    def _apps(apps: Iterable[_AppStatus]) -> Iterator[Metric]:
        labels = ["provider", "app_id"]
        enabled = GaugeMetricFamily("pushlib_app_enabled", "1 for an enabled app, 0 for a disabled one.",
                                    labels=labels)
        pushes = CounterMetricFamily("pushlib_app_pushes", "Final push outcomes per app (kept while the app "
                                     "pushes; see the app status in pushlib-admin).", labels=[*labels, "outcome"])
        error_at = GaugeMetricFamily("pushlib_app_last_error_timestamp_seconds", "When the app last got a "
                                     "configuration error (bad credentials, topic...).", labels=labels)
        error_status = GaugeMetricFamily("pushlib_app_last_error_status", "HTTP status of the app's last "
                                         "configuration error (0: no answer, e.g. no credentials stored).",
                                         labels=labels)
        suspect = GaugeMetricFamily("pushlib_app_env_suspect", "1 when most recent pushes of the app got "
                                    "BadDeviceToken (wrong APNs sandbox/production setting).", labels=labels)
        for app in apps:
            names = [app.provider, app.app_id]
            enabled.add_metric(names, 1.0 if app.enabled else 0.0)
            suspect.add_metric(names, 1.0 if app.status.get("env_suspect") else 0.0)
            for name, value in sorted(app.status.items()):
                outcome = name.removeprefix("count:")
                n = _number(value)
                if name.startswith("count:") and outcome in _APP_OUTCOMES and n is not None:
                    pushes.add_metric([*names, outcome], n)
            at = _number(app.status.get("last_error_at"))
            if at is not None:
                error_at.add_metric(names, at)
                head = app.status.get("last_error", "").split(" ", 1)[0]
                error_status.add_metric(names, float(head) if head.isdigit() else 0.0)
        yield from (enabled, pushes, error_at, error_status, suspect)


async def _read_stream(redis: redis.asyncio.Redis, snap: _Snapshot, stream: str, group: str,
                       now: float) -> None:
    pipe = redis.pipeline(transaction=False)
    pipe.xlen(stream)
    pipe.xinfo_groups(stream)
    pipe.xpending(stream, group)
    length, groups, pending = await pipe.execute(raise_on_error=False)
    if not isinstance(length, Exception):
        snap.stream_length = int(length)
    if isinstance(groups, Exception):  # no stream yet: no dispatcher nor SIP node ever used it
        return
    for info in groups:
        info = {_s(k): v for k, v in dict(info).items()}
        if _s(info.get("name", "")) != group:
            continue
        snap.group_found = True
        # Redis answers nil for the lag when it cannot compute it (after XDEL of unread entries).
        snap.lag = int(info["lag"]) if info.get("lag") is not None else None
        snap.pending = int(info.get("pending", 0))
        snap.consumers = int(info.get("consumers", 0))
    if snap.group_found and not isinstance(pending, Exception) and pending:
        oldest = pending.get("min")
        if oldest:  # a stream id is `<ms since epoch>-<seq>`: the time the job was queued
            snap.oldest_pending_age = max(0.0, now - int(_s(oldest).split("-", 1)[0]) / 1000)


async def _read_apps(redis: redis.asyncio.Redis) -> list[_AppStatus]:
    index = _str_map(await redis.hgetall(schema.APP_INDEX_KEY))
    names: list[tuple[str, str, bool]] = []
    for name, state in sorted(index.items()):
        provider, sep, app_id = name.partition(":")
        if sep and provider in _PROVIDERS and app_id:
            names.append((provider, app_id, state == schema.app_index_value(True)))
    if not names:
        return []
    pipe = redis.pipeline(transaction=False)
    for provider, app_id, _ in names:
        pipe.hexists(schema.app_key(provider, app_id), schema.APP_ALIAS_FIELD)
        pipe.hgetall(schema.app_status_key(provider, app_id))
    replies = await pipe.execute(raise_on_error=False)
    apps = []
    for (provider, app_id, enabled), is_alias, status in zip(names, replies[::2], replies[1::2], strict=True):
        if is_alias is True or is_alias == 1:  # an alias shares its app's status: report the app once
            continue
        apps.append(_AppStatus(provider, app_id, enabled, _str_map(status)))
    return apps


async def collect_snapshot(redis: redis.asyncio.Redis, *, stream: str | None = None, group: str | None = None,
                           now: float | None = None) -> _Snapshot:
    """Read what one scrape reports (three small round trips)."""
    now = time.time() if now is None else now
    defaults = Settings()
    pipe = redis.pipeline(transaction=False)
    pipe.hgetall(schema.METRICS_PUSHES_KEY)
    pipe.hgetall(schema.METRICS_LATENCY_KEY)
    pipe.hgetall(schema.METRICS_EVENTS_KEY)
    pushes, latency, events = await pipe.execute()
    snap = _Snapshot(_str_map(pushes), _str_map(latency), _str_map(events))
    await _read_stream(redis, snap, stream or defaults.stream, group or defaults.group, now)
    snap.apps = await _read_apps(redis)
    return snap


async def render_metrics(redis: redis.asyncio.Redis, *, stream: str | None = None,
                         group: str | None = None) -> bytes:
    """The push side's metrics in the Prometheus text format (serve with CONTENT_TYPE). `stream`
    and `group` default to Settings' (`pn:jobs`, `pn-dispatchers`). Redis errors propagate
    (redis.exceptions.RedisError): a scrape that cannot read Redis must fail, not report zeros."""
    snap = await collect_snapshot(redis, stream=stream, group=group)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snap))
    return generate_latest(registry)
