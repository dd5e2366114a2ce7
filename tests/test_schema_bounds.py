"""Bounds on what Redis and the dispatcher keep, and on what a job or a repr may carry: non-finite
deadlines are malformed jobs, app status hashes expire and go with their app, the dispatcher's
per-app cache is bounded, and reprs never show a token."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import redis

from pushlib import dispatcher as dispatcher_mod
from pushlib import schema
from pushlib.astore import AsyncStore
from pushlib.dispatcher import Dispatcher
from pushlib.models import (
    ApnsRequest,
    AppCredentials,
    Device,
    FcmMessage,
    Outcome,
    Provider,
    PushJob,
    PushKind,
    PushParams,
)
from pushlib.settings import Settings
from pushlib.store import SyncStore
from tests.support import record_outcome

VOIP = "a1" * 32
ALERT = "b2" * 32
FCM = "fcm-registration-token-" + "c3" * 20
JWT = "bearer eyJhbGciOiJFUzI1NiJ9.e30.SIGNATURE"


def _fields(**over: str) -> dict[str, str]:
    base = schema.encode_job(PushJob("j1", PushKind.MESSAGE, "sip:a@example.com", time.time() + 30, created_at=1e9))
    base.update(over)
    return base


# --- non-finite deadlines ------------------------------------------------------------------------


@pytest.mark.parametrize("deadline", ["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "soon", ""])
def test_job_with_a_non_finite_or_non_numeric_deadline_is_a_decode_error(deadline: str) -> None:
    with pytest.raises(schema.DecodeError, match="deadline"):
        schema.decode_job(_fields(deadline=deadline))


@pytest.mark.parametrize("created_at", ["nan", "inf", "-inf", "yesterday"])
def test_job_with_a_non_finite_created_at_is_a_decode_error(created_at: str) -> None:
    with pytest.raises(schema.DecodeError, match="created_at"):
        schema.decode_job(_fields(created_at=created_at))


def test_a_finite_job_still_round_trips() -> None:
    job = PushJob("j1", PushKind.MESSAGE, "sip:a@example.com", 1e9 + 0.5, ("d1",), {"title": "t"}, 1e9)
    assert schema.decode_job(schema.encode_job(job)) == job


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_job_is_never_queued(bad: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        schema.encode_job(PushJob("j1", PushKind.MESSAGE, "sip:a@example.com", bad))
    with pytest.raises(ValueError, match="finite"):
        schema.encode_job(PushJob("j1", PushKind.MESSAGE, "sip:a@example.com", 1e9, created_at=bad))


def test_a_device_record_with_a_non_finite_time_is_a_decode_error() -> None:
    device = Device("sip:a@example.com", "d1", PushParams(Provider.APNS, "com.x", voip_token=VOIP))
    raw = schema.encode_device(device)
    raw["expires_at"] = "nan"
    with pytest.raises(schema.DecodeError):
        schema.decode_device(raw)


# --- reprs -------------------------------------------------------------------------------------


def test_reprs_hold_no_token_or_secret() -> None:
    params = PushParams(Provider.APNS, "com.x", voip_token=VOIP, alert_token=ALERT, team_id="TEAM000001")
    device = Device("sip:a@example.com", "d1", params, contact=f"<sip:a@10.0.0.1;pn-prid={VOIP}>",
                    user_agent="Phone/1.0")
    apns = ApnsRequest(VOIP, {"apns-topic": "com.x.voip", "authorization": JWT}, b'{"aps":{}}')
    fcm = FcmMessage(FCM, json.dumps({"message": {"token": FCM}}).encode())
    job = PushJob("j1", PushKind.INCOMING_CALL, "sip:a@example.com", 1e9, ("d1",), {"call_id": "c1"})
    app = AppCredentials(Provider.APNS, "com.x", apns_key_pem="-----BEGIN PRIVATE KEY-----SECRET")
    for obj in (params, device, apns, fcm, job, app):
        text = repr(obj)
        for secret in (VOIP, ALERT, FCM, JWT, "SECRET", "eyJhbGci"):
            assert secret not in text, (type(obj).__name__, secret)
    assert "com.x" in repr(params) and "d1" in repr(device) and "Phone/1.0" in repr(device)


def test_hidden_fields_still_count_for_equality() -> None:
    a = PushParams(Provider.APNS, "com.x", voip_token=VOIP)
    assert a == PushParams(Provider.APNS, "com.x", voip_token=VOIP)
    assert a != PushParams(Provider.APNS, "com.x", voip_token=ALERT)
    assert ApnsRequest(VOIP, {}, b"") != ApnsRequest(ALERT, {}, b"")
    assert FcmMessage(FCM, b"1") != FcmMessage(FCM, b"2")
    d = Device("sip:a@x", "d1", a, contact="c1")
    assert d != Device("sip:a@x", "d1", a, contact="c2")


# --- app status TTL and removal ----------------------------------------------------------------


def _raw(url: str) -> Any:
    return redis.Redis.from_url(url, decode_responses=True)


def test_app_status_gets_a_ttl_on_every_write(redis_url: str) -> None:
    skey = schema.app_status_key("apns", "com.invented")
    r = _raw(redis_url)

    async def error_then_outcomes() -> None:
        store = AsyncStore(redis_url, Settings())
        try:
            await store.record_app_error("apns", "com.invented", "no credentials stored for this app")
            assert 0 < r.ttl(skey) <= schema.APP_STATUS_TTL
            r.expire(skey, 100)  # an older write's TTL is refreshed by the next one
            await record_outcome(store, "apns", "com.invented", Outcome.DELIVERED)
            assert r.ttl(skey) > schema.APP_STATUS_TTL - 60
            r.delete(skey)
            # a flush that only checks the window (no counters) may create the hash with
            # env_suspect: it gets the TTL too
            app = ("apns", "com.invented")
            bad = [schema.window_entry(time.time(), True)] * 6
            assert await store.record_outcomes({}, {app: bad}, check=[app]) == [app]
        finally:
            await store.aclose()

    asyncio.run(error_then_outcomes())
    assert r.hget(skey, "env_suspect")
    assert 0 < r.ttl(skey) <= schema.APP_STATUS_TTL
    assert schema.APP_STATUS_TTL == 30 * 24 * 3600


def test_app_status_and_window_go_with_their_app(redis_url: str) -> None:
    store = SyncStore(redis_url, Settings())
    store.save_app(AppCredentials(Provider.FCM, "proj", fcm_service_account="{}"))

    async def outcomes() -> None:
        astore = AsyncStore(redis_url, Settings())
        try:
            await astore.record_app_error("fcm", "proj", "403 SenderIdMismatch")
            await record_outcome(astore, "fcm", "proj", Outcome.DELIVERED)
        finally:
            await astore.aclose()

    asyncio.run(outcomes())
    r = _raw(redis_url)
    assert r.exists(schema.app_status_key("fcm", "proj"), schema.app_window_key("fcm", "proj")) == 2
    assert store.remove_app("fcm", "proj") is True
    assert r.exists(schema.app_key("fcm", "proj"), schema.app_status_key("fcm", "proj"),
                    schema.app_window_key("fcm", "proj")) == 0
    assert store.remove_app("fcm", "proj") is False
    store.close()


# --- the dispatcher's per-app cache ------------------------------------------------------------


class _CountingStore:
    def __init__(self) -> None:
        self.reads: list[tuple[str, str]] = []

    async def app(self, provider: str, app_id: str) -> AppCredentials | None:
        self.reads.append((provider, app_id))
        return None


def test_dispatcher_app_cache_is_bounded_lru(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatcher_mod, "APP_CACHE_MAX", 3)
    d = Dispatcher(Settings())
    store = _CountingStore()
    d._store = store  # type: ignore[assignment]

    async def scenario() -> None:
        for i in range(10):  # app ids invented by REGISTERs: the cache does not grow with them
            await d._app("apns", f"com.invented.{i}")
        assert len(d._apps) == 3
        assert list(d._apps) == [("apns", f"com.invented.{i}") for i in (7, 8, 9)]
        await d._app("apns", "com.invented.7")  # a hit: no read, and now the most recent
        assert len(store.reads) == 10
        await d._app("apns", "com.new")
        assert list(d._apps) == [("apns", "com.invented.9"), ("apns", "com.invented.7"), ("apns", "com.new")]

    asyncio.run(scenario())


def test_a_record_holding_the_same_phone_is_evicted_first() -> None:
    """A push token of one app is one device, whatever id it was saved under."""
    from pushlib.models import Device, Provider, PushParams
    from pushlib.schema import plan_device_save, same_phone

    phone = Device("sip:a@b", "instance-id", PushParams(Provider.APNS, "com.x", voip_token="ab" * 32),
                   registered_at=100.0, expires_at=4000.0)
    assert same_phone(phone, "apns", "com.x", "ab" * 32, None)
    assert not same_phone(phone, "apns", "com.other", "ab" * 32, None)
    assert not same_phone(phone, "fcm", "com.x", "ab" * 32, None)
    assert not same_phone(phone, "apns", "com.x", "cd" * 32, None)
    others = {"token-id": (50.0, 3000.0), "tablet": (10.0, 3000.0)}
    plan = plan_device_save(phone, others, 10, 100.0, frozenset({"token-id"}))
    assert plan.evict == ("token-id",)
    plan = plan_device_save(phone, others, 2, 100.0, frozenset({"token-id"}))
    assert plan.evict == ("token-id",)  # the duplicate made room: the tablet stays
