"""The push side's Prometheus metrics: the dispatcher's counts shared through Redis, rendered by
`pushlib.metrics.render_metrics` and read back with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
import redis
import redis.asyncio
from prometheus_client.parser import text_string_to_metric_families

from pushlib import metrics, schema
from pushlib.astore import AsyncStore
from pushlib.models import AppCredentials, Provider, PushJob, PushKind
from pushlib.settings import Settings
from pushlib.store import SyncStore
from pushsandbox.process import SandboxHandle
from tests.support import BUNDLE, FCM_PROJECT, android, apns_token, fcm_token, ios, run_dispatcher, stream_done

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def render(redis_url: str, **kw: Any) -> str:
    async def main() -> bytes:
        client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
        try:
            return await metrics.render_metrics(client, **kw)
        finally:
            await client.aclose()

    return asyncio.run(main()).decode()


def samples(text: str) -> Samples:
    """Every sample of an exposition, parsed by prometheus_client: (name, sorted labels) -> value."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def job(kind: PushKind, aor: str, ttl: float = 30.0) -> PushJob:
    return PushJob(uuid.uuid4().hex, kind, aor, time.time() + ttl, data={"call_id": "c1", "caller_name": "Bob",
                   "caller_number": "+15550100", "message": "hi", "sender": "Bob"}, created_at=time.time())


# --- pure parts ---------------------------------------------------------------------------------


def test_buffer_counts_only_known_label_values() -> None:
    buf = metrics.MetricsBuffer()
    buf.push("apns", "incomingCall", "delivered")
    buf.push("apns", "incomingCall", "delivered")
    buf.push("apns", "incomingCall", "made-up-outcome")
    buf.push("mqtt", "incomingCall", "delivered")
    buf.push("fcm", "<script>", "delivered")
    buf.latency("fcm", 0.03)
    buf.latency("fcm", float("nan"))
    buf.latency("nope", 1.0)
    buf.event("dead_tokens_removed")
    buf.event("anything-else")
    taken = buf.take()
    assert taken == {
        (schema.METRICS_PUSHES_KEY, "apns|incomingCall|delivered"): 2,
        (schema.METRICS_LATENCY_KEY, "fcm|2"): 1,  # 0.025 < 0.03 <= 0.05
        (schema.METRICS_LATENCY_KEY, "fcm|count"): 1,
        (schema.METRICS_LATENCY_KEY, "fcm|sum"): 0.03,
        (schema.METRICS_EVENTS_KEY, "dead_tokens_removed"): 1,
    }
    assert buf.take() == {}
    buf.put_back(taken)
    buf.push("apns", "incomingCall", "delivered")
    assert buf.take()[(schema.METRICS_PUSHES_KEY, "apns|incomingCall|delivered")] == 3


def test_latency_bucket_index_edges() -> None:
    bounds = schema.METRICS_LATENCY_BUCKETS
    assert schema.metrics_bucket_index(0.0) == 0
    assert schema.metrics_bucket_index(bounds[0]) == 0  # `le`: the bound belongs to its bucket
    assert schema.metrics_bucket_index(bounds[0] + 1e-9) == 1
    assert schema.metrics_bucket_index(bounds[-1]) == len(bounds) - 1
    assert schema.metrics_bucket_index(bounds[-1] + 1) == len(bounds)  # +Inf


def test_content_type_is_prometheus_text() -> None:
    assert metrics.CONTENT_TYPE.startswith("text/plain; version=0.0.4")


# --- against a real Redis -----------------------------------------------------------------------


def test_empty_redis_renders_zeroes_and_no_stream(redis_url: str) -> None:
    found = samples(render(redis_url))
    assert value(found, "pushlib_dead_tokens_removed_total") == 0
    assert value(found, "pushlib_jobs_dropped_total", reason="deadline") == 0
    assert value(found, "pushlib_dispatcher_group_present") == 0
    assert value(found, "pushlib_dispatcher_stream_lag") is None  # no stream: nothing to report
    assert not [k for k in found if k[0].startswith("pushlib_pushes")]


def test_garbage_in_the_metric_hashes_makes_no_series(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.hset(schema.METRICS_PUSHES_KEY, mapping={"apns|incomingCall|delivered": "4", "evil|x|y": "1",
                                               "fcm|custom|delivered": "not-a-number", "a|b": "1"})
    r.hset(schema.METRICS_EVENTS_KEY, mapping={"made_up": "5", "devices_quarantined": "2"})
    r.close()
    found = samples(render(redis_url))
    pushes = {k: v for k, v in found.items() if k[0] == "pushlib_pushes_total"}
    assert pushes == {("pushlib_pushes_total", (("kind", "incomingCall"), ("outcome", "delivered"),
                                                ("provider", "apns"))): 4.0}
    assert value(found, "pushlib_devices_quarantined_total") == 2
    assert not [k for k in found if "made_up" in k[0]]


def test_stream_lag_pending_and_oldest_age(redis_url: str) -> None:
    cfg = Settings(redis_url=redis_url, stream="pn:jobs-metrics", group="g1")
    store = SyncStore(redis_url, cfg)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        r.xgroup_create(cfg.stream, cfg.group, id="0", mkstream=True)
        for _ in range(5):
            store.enqueue(job(PushKind.MESSAGE, "sip:lag@example.com"))
        found = samples(render(redis_url, stream=cfg.stream, group=cfg.group))
        assert value(found, "pushlib_dispatcher_stream_lag") == 5
        assert value(found, "pushlib_dispatcher_pending") == 0
        assert value(found, "pushlib_job_stream_length") == 5
        time.sleep(0.05)
        r.xreadgroup(cfg.group, "c1", {cfg.stream: ">"}, count=2)  # read, never acked: pending
        found = samples(render(redis_url, stream=cfg.stream, group=cfg.group))
        assert value(found, "pushlib_dispatcher_stream_lag") == 3
        assert value(found, "pushlib_dispatcher_pending") == 2
        assert value(found, "pushlib_dispatcher_consumers") == 1
        age = value(found, "pushlib_dispatcher_oldest_pending_age_seconds")
        assert age is not None and 0.04 <= age < 30
        assert value(found, "pushlib_dispatcher_group_present") == 1
    finally:
        r.close()
        store.close()


def test_redis_down_is_an_error_not_zeroes() -> None:
    with pytest.raises(redis.exceptions.ConnectionError):
        render("redis://127.0.0.1:1/0")


# --- the dispatcher's counts, end to end with the sandbox ----------------------------------------


@pytest.fixture()
def env(push_env: tuple[SandboxHandle, SyncStore, Settings]) -> tuple[SandboxHandle, SyncStore, Settings]:
    return push_env


def test_dispatcher_pushes_are_counted_and_rendered(env: tuple[SandboxHandle, SyncStore, Settings]) -> None:
    sandbox, store, cfg = env
    alice, bob = "sip:alice@example.com", "sip:bob@example.com"
    voip, alert, pixel = apns_token(), apns_token(), fcm_token()
    dead, suspect, wrong_sender = apns_token(), apns_token(), fcm_token()
    store.save_device(ios(alice, "iphone", voip, alert))
    store.save_device(android(alice, "pixel", pixel))
    store.save_device(ios(bob, "old-iphone", voip=dead))
    store.save_device(ios(bob, "odd-iphone", alert=suspect))
    store.save_device(android(bob, "other-pixel", wrong_sender))
    sandbox.control.set_behaviour(dead, 410, "Unregistered")
    sandbox.control.set_behaviour(suspect, 400, "BadDeviceToken")
    sandbox.control.set_behaviour(wrong_sender, 403, "SENDER_ID_MISMATCH")
    store.enqueue(job(PushKind.INCOMING_CALL, alice))  # apns voip + fcm: delivered
    store.enqueue(job(PushKind.MESSAGE, alice))  # apns alert + fcm: delivered
    # old-iphone: dead token (410); odd-iphone has no VoIP token: rung by alert, BadDeviceToken;
    # other-pixel: 403, a configuration error of the FCM app
    store.enqueue(job(PushKind.INCOMING_CALL, bob))
    store.enqueue(job(PushKind.MESSAGE, bob, ttl=-1))  # too late when read: dropped whole

    run_dispatcher(cfg, lambda: stream_done(cfg))
    found = samples(render(redis_url=cfg.redis_url))

    def pushes(provider: str, kind: str, outcome: str) -> float | None:
        return value(found, "pushlib_pushes_total", provider=provider, kind=kind, outcome=outcome)

    assert pushes("apns", "incomingCall", "delivered") == 1
    assert pushes("fcm", "incomingCall", "delivered") == 1
    assert pushes("apns", "messageReceived", "delivered") == 1
    assert pushes("fcm", "messageReceived", "delivered") == 1
    assert pushes("apns", "incomingCall", "token_dead") == 1
    assert pushes("apns", "incomingCall", "suspect") == 1
    assert pushes("fcm", "incomingCall", "config_error") == 1
    assert value(found, "pushlib_dead_tokens_removed_total") == 1
    assert value(found, "pushlib_devices_quarantined_total") == 1
    assert value(found, "pushlib_jobs_dropped_total", reason="deadline") == 1
    # Latency: one observation per provider answer (4 apns, 3 fcm), cumulative buckets.
    assert value(found, "pushlib_push_latency_seconds_count", provider="apns") == 4
    assert value(found, "pushlib_push_latency_seconds_count", provider="fcm") == 3
    assert value(found, "pushlib_push_latency_seconds_bucket", provider="apns", le="+Inf") == 4
    apns_sum = value(found, "pushlib_push_latency_seconds_sum", provider="apns")
    assert apns_sum is not None and 0 < apns_sum < 4 * 10
    buckets = [value(found, "pushlib_push_latency_seconds_bucket", provider="fcm", le=repr(b))
               for b in schema.METRICS_LATENCY_BUCKETS]
    assert all(b is not None for b in buckets) and buckets == sorted(buckets)  # type: ignore[type-var]
    # The stream: everything done.
    assert value(found, "pushlib_dispatcher_group_present") == 1
    assert value(found, "pushlib_dispatcher_pending") == 0
    assert value(found, "pushlib_dispatcher_stream_lag") == 0
    # Per app: counters by outcome, the last configuration error, the environment flag.
    assert value(found, "pushlib_app_enabled", provider="fcm", app_id=FCM_PROJECT) == 1
    assert value(found, "pushlib_app_pushes_total", provider="fcm", app_id=FCM_PROJECT, outcome="delivered") == 2
    assert value(found, "pushlib_app_last_error_status", provider="fcm", app_id=FCM_PROJECT) == 403
    at = value(found, "pushlib_app_last_error_timestamp_seconds", provider="fcm", app_id=FCM_PROJECT)
    assert at is not None and time.time() - 60 < at <= time.time()
    assert value(found, "pushlib_app_last_error_status", provider="apns", app_id=BUNDLE) is None  # none
    assert value(found, "pushlib_app_env_suspect", provider="apns", app_id=BUNDLE) == 0

    # A second dispatcher (another process, or a Kamailio worker) adds to the same counters.
    store.enqueue(job(PushKind.MESSAGE, alice))
    run_dispatcher(cfg, lambda: stream_done(cfg))
    found = samples(render(redis_url=cfg.redis_url))
    assert value(found, "pushlib_pushes_total", provider="apns", kind="messageReceived", outcome="delivered") == 2
    assert value(found, "pushlib_push_latency_seconds_count", provider="apns") == 5


def test_an_alias_is_reported_once_under_its_app(env: tuple[SandboxHandle, SyncStore, Settings]) -> None:
    sandbox, store, cfg = env
    app = sandbox.control.fcm_app("aliased-project")
    store.save_app(AppCredentials(**{**app.__dict__, "aliases": ("123456789",), "enabled": False}))
    found = samples(render(cfg.redis_url))
    enabled = {dict(labels)["app_id"]: v for (name, labels), v in found.items() if name == "pushlib_app_enabled"}
    assert enabled == {BUNDLE: 1, FCM_PROJECT: 1, "aliased-project": 0}


def test_record_outcomes_adds_the_increments(redis_url: str) -> None:
    """The store writes a buffer's increments in the flush it does anyway (no other write)."""
    cfg = Settings(redis_url=redis_url)

    async def main() -> dict[tuple[str, str], int | float]:
        store = AsyncStore(redis_url, cfg)
        buf = metrics.MetricsBuffer()
        buf.push(Provider.APNS.value, PushKind.CUSTOM.value, "delivered")
        taken = buf.take()
        try:
            await store.record_outcomes({}, {}, increments=taken)
        finally:
            await store.aclose()
        return taken

    asyncio.run(main())
    found = samples(render(redis_url))
    assert value(found, "pushlib_pushes_total", provider="apns", kind="custom", outcome="delivered") == 1
