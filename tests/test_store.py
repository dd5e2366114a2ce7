"""The Redis store: key layout, serialisation, device caps/TTLs, outages, outcome helpers."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import replace
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from pushlib import schema
from pushlib.astore import AsyncStore
from pushlib.models import (
    AppCredentials,
    Device,
    Outcome,
    ParkedCall,
    Provider,
    PushJob,
    PushKind,
    PushParams,
    UaMapping,
)
from pushlib.parked import ParkedCalls
from pushlib.redisconn import StoreUnavailable
from pushlib.settings import Settings
from pushlib.store import SyncStore
from tests.support import job_devices, mark_sent, record_outcome, redis_server, stored_device

SECRET = "-----BEGIN PRIVATE KEY-----SECRETSECRET-----END PRIVATE KEY-----"


def make_device(i: int = 0, aor: str = "sip:alice@example.com", **kw: object) -> Device:
    now = time.time()
    params = PushParams(
        provider=Provider.APNS, app_id="com.example.app", voip_token=f"{i:02x}" * 32,
        alert_token=f"{i + 100:03x}" * 16, team_id="TEAM000001", sandbox=True,
    )
    base = Device(
        aor=aor, device_id=f"dev{i}", params=params, contact=f"<sip:alice@10.0.0.{i}:5060;pn-prid=x>",
        user_agent="Linphone/5.2 (iPhone)", registered_at=now + i, expires_at=now + 3600,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def raw_client(url: str) -> Any:
    return redis.Redis.from_url(url, decode_responses=True)


def test_device_round_trip_keeps_every_field(redis_url: str) -> None:
    store = SyncStore(redis_url, Settings())
    dev = make_device(1, quarantined_until=123.5)
    assert store.save_device(dev) == []
    assert stored_device(store, dev.aor, dev.device_id) == dev
    assert store.devices(dev.aor) == [dev]
    assert raw_client(redis_url).sismember(schema.devices_key(dev.aor), dev.device_id)


@settings(max_examples=60, deadline=None)
@given(
    provider=st.sampled_from(list(Provider)),
    voip=st.one_of(st.none(), st.text(min_size=1, max_size=40)),
    alert=st.one_of(st.none(), st.text(min_size=1, max_size=40)),
    team=st.one_of(st.none(), st.text(min_size=1, max_size=10)),
    sandbox=st.booleans(),
    ua=st.text(max_size=30),
    reg=st.floats(min_value=0, max_value=2e9),
)
def test_device_codec_is_lossless(provider, voip, alert, team, sandbox, ua, reg) -> None:
    params = PushParams(provider, "app.id", voip, alert, team, sandbox)
    dev = Device("sip:a@b", "id", params, "c", ua, reg, reg + 60.25, reg / 3)
    assert schema.decode_device(schema.encode_device(dev)) == dev


def test_device_ttl_follows_expiry_with_a_floor(redis_url: str) -> None:
    store = SyncStore(redis_url, Settings())
    r = raw_client(redis_url)
    store.save_device(make_device(1, expires_at=time.time() + 600))
    assert 590 <= r.ttl(schema.device_key("sip:alice@example.com", "dev1")) <= 600
    store.save_device(make_device(2, expires_at=time.time() - 100))  # already expired: still readable briefly
    assert 1 <= r.ttl(schema.device_key("sip:alice@example.com", "dev2")) <= schema.MIN_DEVICE_TTL
    assert r.ttl(schema.devices_key("sip:alice@example.com")) >= 590


def test_expired_device_ids_are_cleaned_from_the_aor_set(redis_url: str) -> None:
    store = SyncStore(redis_url, Settings())
    r = raw_client(redis_url)
    store.save_device(make_device(1))
    store.save_device(make_device(2))
    r.delete(schema.device_key("sip:alice@example.com", "dev1"))  # what expiry does
    assert [d.device_id for d in store.devices("sip:alice@example.com")] == ["dev2"]
    # (the lookup is read-only: it runs while Redis refuses writes) the next save drops the id
    store.save_device(make_device(3))
    assert r.smembers(schema.devices_key("sip:alice@example.com")) == {"dev2", "dev3"}


def test_eleventh_device_evicts_the_oldest_registered(redis_url: str) -> None:
    store = SyncStore(redis_url, Settings(max_devices_per_user=10))
    # Saved in a shuffled order: eviction follows registered_at, not insertion order.
    for i in [5, 3, 9, 0, 7, 1, 8, 2, 6, 4]:
        assert store.save_device(make_device(i + 1)) == []
    assert store.save_device(make_device(11)) == ["dev1"]
    ids = {d.device_id for d in store.devices("sip:alice@example.com")}
    assert ids == {f"dev{i}" for i in range(2, 12)}
    assert stored_device(store, "sip:alice@example.com", "dev1") is None


def test_resaving_a_device_replaces_it(redis_url: str) -> None:
    store = SyncStore(redis_url, Settings(max_devices_per_user=2))
    store.save_device(make_device(1))
    store.save_device(make_device(2))
    newer = make_device(1, params=PushParams(Provider.FCM, "proj-1", alert_token="fcmtok"))
    assert store.save_device(newer) == []  # same id: no eviction
    got = stored_device(store, "sip:alice@example.com", "dev1")
    assert got == newer and got.params.voip_token is None and got.params.team_id is None


def test_remove_device(redis_url: str) -> None:
    store = SyncStore(redis_url, Settings())
    store.save_device(make_device(1))
    assert store.remove_device("sip:alice@example.com", "dev1") is True
    assert store.remove_device("sip:alice@example.com", "dev1") is False
    assert store.devices("sip:alice@example.com") == []


def test_enqueue_writes_flat_fields_the_dispatcher_decodes(redis_url: str) -> None:
    cfg = Settings(stream="pn:test-jobs")
    store = SyncStore(redis_url, cfg)
    job = PushJob("j1", PushKind.INCOMING_CALL, "sip:alice@example.com", 1e9 + 0.25, ("a", "b"),
                  {"call_id": "c1", "caller_name": "Zoë \"Q\" 📞"}, 1e9)
    entry_id = store.enqueue(job)
    [(got_id, fields)] = raw_client(redis_url).xrange(cfg.stream)
    assert got_id == entry_id
    assert fields["device_ids"] == "a,b" and fields["kind"] == "incomingCall"
    assert schema.decode_job(fields) == job


@pytest.mark.parametrize(
    "fields",
    [{}, {"job_id": "x", "kind": "nope", "aor": "a", "deadline": "1"},
     {"job_id": "x", "kind": "custom", "aor": "a", "deadline": "soon"},
     {"job_id": "x", "kind": "custom", "aor": "a", "deadline": "1", "data": "[1]"}],
)
def test_malformed_job_fields_raise_decode_error(fields: dict[str, str]) -> None:
    with pytest.raises(schema.DecodeError):
        schema.decode_job(fields)


def test_stream_is_trimmed_to_about_maxlen(redis_url: str) -> None:
    cfg = Settings(stream="pn:trim", stream_maxlen=100)
    store = SyncStore(redis_url, cfg)
    for i in range(1000):
        store.enqueue(PushJob(f"j{i}", PushKind.CUSTOM, "sip:a@b", 1e10))
    assert raw_client(redis_url).xlen(cfg.stream) < 300


def test_app_round_trip_and_secrets_never_logged(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    store = SyncStore(redis_url, Settings())
    app = AppCredentials(
        Provider.APNS, "com.example.app", enabled=False, sandbox=True,
        apns_key_pem=SECRET, apns_key_id="KEY1",
        apns_team_id="TEAM1", apns_cert_pem="CERT", apns_cert_key_pem=SECRET, fcm_service_account="{}",
        custom_host="127.0.0.1:1", ca_pem="CA",
    )
    caplog.set_level(logging.DEBUG)
    store.save_app(app)
    assert store.app("apns", "com.example.app") == app
    assert store.app("fcm", "com.example.app") is None
    assert "SECRET" not in caplog.text and "SECRET" not in schema.describe_app(app)
    assert "com.example.app" in caplog.text


def test_app_index_lists_apps_without_their_secrets(redis_url: str) -> None:
    """The SIP workers check REGISTERs against `pn:apps`, which holds no credentials."""
    store = SyncStore(redis_url, Settings())
    app = AppCredentials(Provider.APNS, "com.example.indexed", apns_key_pem=SECRET, apns_key_id="K",
                         apns_team_id="T")
    assert store.app_enabled("apns", "com.example.indexed") is None
    store.save_app(app)
    assert store.app_enabled("apns", "com.example.indexed") is True
    assert store.app_enabled("fcm", "com.example.indexed") is None
    store.save_app(replace(app, enabled=False))
    assert store.app_enabled("apns", "com.example.indexed") is False
    index = raw_client(redis_url).hgetall(schema.APP_INDEX_KEY)
    assert index["apns:com.example.indexed"] == "disabled" and all("SECRET" not in v for v in index.values())
    # apps saved before the index existed: reindex finds them
    raw_client(redis_url).delete(schema.APP_INDEX_KEY)
    assert store.app_enabled("apns", "com.example.indexed") is None
    assert store.reindex_apps() >= 1
    assert store.app_enabled("apns", "com.example.indexed") is False
    assert store.remove_app("apns", "com.example.indexed")
    assert store.app_enabled("apns", "com.example.indexed") is None


def test_ua_mappings_round_trip_in_name_order(redis_url: str) -> None:
    store = SyncStore(redis_url, Settings())
    b = UaMapping("b-kazoo", "^Kazoo", "app", "type", "tok")
    a = UaMapping("a-linphone", "Linphone/[34]")
    store.save_ua_mapping(b)
    store.save_ua_mapping(a)
    assert store.ua_mappings() == [a, b]
    assert store.remove_ua_mapping("a-linphone") is True
    assert store.ua_mappings() == [b]


def test_corrupt_records_are_ignored_not_fatal(redis_url: str) -> None:
    store = SyncStore(redis_url, Settings())
    r = raw_client(redis_url)
    r.hset(schema.UAMAP_KEY, "bad", "{not json")
    r.hset(schema.device_key("sip:a@b", "x"), mapping={"aor": "sip:a@b"})
    r.sadd(schema.devices_key("sip:a@b"), "x")
    assert store.ua_mappings() == []
    assert store.devices("sip:a@b") == []


def test_outage_raises_store_unavailable_then_recovers() -> None:
    with redis_server() as server:
        store = SyncStore(server.url, Settings())
        assert store.ping() is True
        store.save_device(make_device(1))
        server.stop()
        for call in (store.ping, lambda: store.devices("sip:alice@example.com"),
                     lambda: store.save_device(make_device(2)),
                     lambda: store.enqueue(PushJob("j", PushKind.CUSTOM, "sip:a@b", 1e10))):
            with pytest.raises(StoreUnavailable):
                call()
        server.start_again()  # data is gone (no persistence): the store must simply work again
        assert store.ping() is True
        store.save_device(make_device(3))
        assert [d.device_id for d in store.devices("sip:alice@example.com")] == ["dev3"]
        store.close()


def test_a_frozen_server_costs_one_timeout_not_two() -> None:
    """A Redis that accepts nothing (paused process) holds a SIP worker one socket timeout: the
    client reconnects once after a connection error, never after a timeout."""
    with redis_server() as server:
        store = SyncStore(server.url, Settings())
        assert store.ping() is True
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="Timeout"):
                store.ping()
            assert time.monotonic() - started < 0.9  # one 0.5 s timeout, not two
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        store.close()


def test_key_layout_is_pinned() -> None:
    """Deployed data depends on these strings (and on the hash tags that keep an AOR's keys on
    one Redis Cluster slot): a change here strands every stored record."""
    aor = "sip:alice@example.com"
    assert schema.device_key(aor, "d1") == "pn:{sip:alice@example.com}:dev:d1"
    assert schema.devices_key(aor) == "pn:{sip:alice@example.com}:devs"
    assert schema.sent_key(aor, "j1", "d1") == "pn:{sip:alice@example.com}:sent:j1:d1"
    assert schema.call_key(aor, "k1") == "pn:{sip:alice@example.com}:call:k1"
    assert schema.pending_key(aor, "d1") == "pn:{sip:alice@example.com}:pend:d1"
    assert schema.app_key("apns", "com.x") == "pn:app:apns:com.x"
    assert (schema.APP_INDEX_KEY, schema.app_index_field("apns", "com.x")) == ("pn:apps", "apns:com.x")
    assert schema.app_status_key("apns", "com.x") == "pn:appstatus:{apns:com.x}"
    assert schema.app_window_key("apns", "com.x") == "pn:appwin:{apns:com.x}"
    assert schema.UAMAP_KEY == "pn:uamap"
    assert schema.subscriber_key("alice", "example.com") == "pn:sub:alice@example.com"
    assert Settings().stream == "pn:jobs"


def test_store_unavailable_is_a_connection_error() -> None:
    assert issubclass(StoreUnavailable, ConnectionError)


# --- AsyncStore: twins and the dispatcher's outcome helpers ------------------------------------


def test_async_store_reads_what_the_sync_store_wrote(redis_url: str) -> None:
    sync = SyncStore(redis_url, Settings())
    sync.save_device(make_device(1))
    app = AppCredentials(Provider.FCM, "proj", fcm_service_account='{"k": "v"}')
    sync.save_app(app)

    async def scenario() -> None:
        store = AsyncStore(redis_url, Settings())
        try:
            got = await job_devices(store, "sip:alice@example.com", "j1")
            assert [(d, sent) for d, sent in got] == [(stored_device(sync, "sip:alice@example.com", "dev1"), False)]
            assert await store.app("fcm", "proj") == app
            assert await store.app("fcm", "other") is None
        finally:
            await store.aclose()

    asyncio.run(scenario())


def test_dead_token_removed_once_then_device_marked_dead(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    sync = SyncStore(redis_url, Settings())
    dev = make_device(1)
    sync.save_device(dev)
    voip, alert = dev.params.voip_token, dev.params.alert_token
    assert voip and alert
    caplog.set_level(logging.INFO)

    async def scenario() -> None:
        store = AsyncStore(redis_url, Settings())
        try:
            assert await store.remove_token(dev.aor, dev.device_id, voip) is True
            assert await store.remove_token(dev.aor, dev.device_id, voip) is False  # idempotent
            left = stored_device(sync, dev.aor, dev.device_id)
            assert left is not None and left.params.voip_token is None and left.params.alert_token == alert
            assert await store.remove_token(dev.aor, dev.device_id, alert) is True
            assert await store.remove_token(dev.aor, dev.device_id, alert) is False
        finally:
            await store.aclose()

    asyncio.run(scenario())
    tomb = stored_device(sync, dev.aor, dev.device_id)  # a tombstone: no token, dead, same TTL
    assert tomb is not None and tomb.dead and tomb.params.voip_token is None and tomb.params.alert_token is None
    assert raw_client(redis_url).smembers(schema.devices_key(dev.aor)) == {dev.device_id}
    removal_lines = [r for r in caplog.records if "dead token removed" in r.getMessage()]
    assert len(removal_lines) == 2
    assert voip not in caplog.text and alert not in caplog.text  # only 8-char prefixes


def test_quarantine_is_set_and_a_new_register_clears_it(redis_url: str) -> None:
    sync = SyncStore(redis_url, Settings())
    dev = make_device(1)
    sync.save_device(dev)
    r = raw_client(redis_url)
    ttl_before = r.ttl(schema.device_key(dev.aor, dev.device_id))

    async def scenario() -> None:
        store = AsyncStore(redis_url, Settings())
        try:
            assert await store.quarantine_device(dev.aor, dev.device_id, now=1000.0) is True
            assert await store.quarantine_device(dev.aor, "gone") is False
        finally:
            await store.aclose()

    asyncio.run(scenario())
    got = stored_device(sync, dev.aor, dev.device_id)
    assert got is not None and got.quarantined_until == 1000.0 + 24 * 3600
    assert r.ttl(schema.device_key(dev.aor, dev.device_id)) > ttl_before - 5  # TTL kept
    assert not r.exists(schema.device_key(dev.aor, "gone"))  # not resurrected without TTL
    sync.save_device(replace(dev, registered_at=time.time()))  # the device REGISTERs again
    again = stored_device(sync, dev.aor, dev.device_id)
    assert again is not None and again.quarantined_until == 0.0


def test_mostly_bad_device_tokens_flag_the_app_environment(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)

    async def scenario() -> None:
        store = AsyncStore(redis_url, Settings())
        try:
            # 4 suspects among 6 pushes: not enough bad ones yet (at least 5 needed).
            for outcome in [Outcome.DELIVERED, Outcome.DEVICE_SUSPECT] * 2 + [Outcome.DEVICE_SUSPECT] * 2:
                assert await record_outcome(store, "apns", "com.x", outcome) is False
            assert SyncStore(redis_url, Settings()).app_status("apns", "com.x")["env_suspect"] is None
            assert await record_outcome(store, "apns", "com.x", Outcome.DEVICE_SUSPECT) is True  # 5 of 7
            assert await record_outcome(store, "apns", "com.x", Outcome.DEVICE_SUSPECT) is False  # once
            # Another app with mostly good pushes is not flagged.
            for _ in range(10):
                await record_outcome(store, "apns", "com.ok", Outcome.DELIVERED)
            for _ in range(6):
                assert await record_outcome(store, "apns", "com.ok", Outcome.DEVICE_SUSPECT) is False
            status = SyncStore(redis_url, Settings()).app_status("apns", "com.x")
            assert "BadDeviceToken" in status["env_suspect"] and status["env_suspect_at"] is not None
            assert status["counters"] == {"delivered": 2, "device_suspect": 6}
            assert status["recent"] == {"pushes": 8, "bad_device_token": 6}
            assert SyncStore(redis_url, Settings()).app_status("apns", "com.ok")["env_suspect"] is None
        finally:
            await store.aclose()

    asyncio.run(scenario())
    assert len([r for r in caplog.records if "environment" in r.getMessage()]) == 1
    # Saving fixed credentials clears the flag (counters stay).
    SyncStore(redis_url, Settings()).save_app(AppCredentials(Provider.APNS, "com.x", sandbox=True))

    status = SyncStore(redis_url, Settings()).app_status("apns", "com.x")
    assert status["env_suspect"] is None and status["counters"]["device_suspect"] == 6


def test_config_errors_are_recorded_for_operators(redis_url: str) -> None:
    async def scenario() -> None:
        store = AsyncStore(redis_url, Settings())
        try:
            await store.record_app_error("fcm", "proj", "403 SENDER_ID_MISMATCH", now=1234.0)
        finally:
            await store.aclose()

    asyncio.run(scenario())
    status = SyncStore(redis_url, Settings()).app_status("fcm", "proj")
    assert status["last_error"] == "403 SENDER_ID_MISMATCH" and status["last_error_at"] == 1234.0


def test_idempotency_marks(redis_url: str) -> None:
    r = raw_client(redis_url)

    async def scenario() -> None:
        store = AsyncStore(redis_url, Settings())
        try:
            await store.mark_sent_many([("sip:a@b", "j1", "d1"), ("sip:a@b", "j2", "d1")])
        finally:
            await store.aclose()

    assert not r.exists(schema.sent_key("sip:a@b", "j1", "d1"))
    asyncio.run(scenario())
    assert r.get(schema.sent_key("sip:a@b", "j1", "d1")) == "1" and r.exists(schema.sent_key("sip:a@b", "j2", "d1"))
    assert not r.exists(schema.sent_key("sip:a@b", "j1", "d2"))
    assert 0 < r.ttl(schema.sent_key("sip:a@b", "j1", "d1")) <= schema.SENT_MARK_TTL == 24 * 3600


def test_job_devices_returns_targets_with_their_sent_marks(redis_url: str) -> None:
    sync = SyncStore(redis_url, Settings())
    aor = "sip:alice@example.com"
    for i in range(3):
        sync.save_device(make_device(i, aor=aor))
    r = raw_client(redis_url)
    r.sadd(schema.devices_key(aor), "expired")  # its hash is gone: cleaned on the way

    async def scenario() -> None:
        store = AsyncStore(redis_url, Settings())
        try:
            await mark_sent(store, aor, "j1", "dev1")
            every = await job_devices(store, aor, "j1")
            assert [(d.device_id, sent) for d, sent in every] == [("dev0", False), ("dev1", True), ("dev2", False)]
            assert every[0][0] == stored_device(sync, aor, "dev0")  # decoded like the sync store does
            chosen = await job_devices(store, aor, "j1", ("dev2", "dev1", "nope"))
            assert [(d.device_id, sent) for d, sent in chosen] == [("dev1", True), ("dev2", False)]
            other_job = await store.job_devices_many([(aor, "j2", ()), ("sip:nobody@x", "j2", ())])
            assert [[s for _, s in found] for found in other_job] == [[False, False, False], []]
            r.script_flush()  # e.g. Redis restarted: the script is loaded again
            assert len(await job_devices(store, aor, "j1")) == 3
        finally:
            await store.aclose()

    asyncio.run(scenario())
    assert not r.sismember(schema.devices_key(aor), "expired")


def test_batched_outcomes_count_and_feed_the_window(redis_url: str) -> None:
    async def scenario() -> list[tuple[str, str]]:
        store = AsyncStore(redis_url, Settings())
        try:
            now = time.time()
            window = [schema.window_entry(now, False)] * 4 + [schema.window_entry(now, True)] * 5
            counts = {("apns", "com.x", "delivered"): 4, ("apns", "com.x", "device_suspect"): 5,
                      ("fcm", "p", "delivered"): 2}
            windows = {("apns", "com.x"): window, ("fcm", "p"): [schema.window_entry(now, False)] * 2}
            return await store.record_outcomes(counts, windows, check=[("apns", "com.x")])
        finally:
            await store.aclose()

    assert asyncio.run(scenario()) == [("apns", "com.x")]  # 5 bad of 9
    sync = SyncStore(redis_url, Settings())
    status = sync.app_status("apns", "com.x")
    assert status["counters"] == {"delivered": 4, "device_suspect": 5}
    assert status["recent"] == {"pushes": 9, "bad_device_token": 5} and status["env_suspect"]
    assert sync.app_status("fcm", "p")["recent"] == {"pushes": 2, "bad_device_token": 0}


def test_save_device_plans_again_when_the_set_changed_meanwhile(redis_url: str) -> None:
    """Two REGISTERs of one user at once: the write is refused when the device set is no longer
    the one its plan was read from, and save_device plans again (no device over the limit)."""
    store = SyncStore(redis_url, Settings(max_devices_per_user=2))
    store.save_device(make_device(1))
    real_read = store._device_hashes
    calls: list[str] = []

    def read_then_race(aor: str) -> tuple[dict[str, dict[str, str]], list[str]]:
        seen = real_read(aor)
        if not calls:  # another worker saves a device between this read and the write
            calls.append(aor)
            SyncStore(redis_url, Settings(max_devices_per_user=2)).save_device(make_device(2))
        return seen

    store._device_hashes = read_then_race  # type: ignore[method-assign]
    assert store.save_device(make_device(3)) == ["dev1"]  # planned again with dev2 in view
    assert [d.device_id for d in store.devices("sip:alice@example.com")] == ["dev2", "dev3"]


def _evalsha_calls(url: str) -> int:
    stats = raw_client(url).info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_a_device_refreshing_its_record_takes_one_round_trip(redis_url: str) -> None:
    """The wake-up REGISTER (same tokens): one script, the new contact and times written, a
    quarantine cleared, the TTLs extended; a changed token or a tombstone takes the full save."""
    store = SyncStore(redis_url, Settings())
    aor = "sip:refresh@example.com"
    first = make_device(1, aor=aor, expires_at=time.time() + 60)
    assert store.save_device(first) == []
    store.client.hset(schema.device_key(aor, first.device_id), "quarantined_until", repr(time.time() + 999))
    before = _evalsha_calls(redis_url)
    woken = replace(first, contact="<sip:alice@10.0.0.9:5999;pn-prid=x>", registered_at=time.time(),
                    expires_at=time.time() + 3600)
    assert store.save_device(woken) == []
    assert _evalsha_calls(redis_url) == before + 1
    assert stored_device(store, aor, first.device_id) == woken  # (quarantine gone with the old hash)
    r = raw_client(redis_url)
    assert r.ttl(schema.device_key(aor, first.device_id)) > 3000 and r.ttl(schema.devices_key(aor)) > 3000

    new_token = replace(woken, params=replace(woken.params, voip_token="ab" * 32))
    before = _evalsha_calls(redis_url)
    assert store.save_device(new_token) == []
    assert _evalsha_calls(redis_url) == before + 3  # refresh refused, then read + full save
    assert stored_device(store, aor, first.device_id) == new_token

    store.client.hset(schema.device_key(aor, first.device_id), schema.DEVICE_DEAD_FIELD, "1")
    before = _evalsha_calls(redis_url)
    assert store.save_device(new_token) == []  # a tombstone is not refreshed: it is replaced
    assert _evalsha_calls(redis_url) == before + 3
    assert stored_device(store, aor, first.device_id) == new_token


def test_a_refresh_never_keeps_a_duplicate_of_another_device(redis_url: str) -> None:
    """The same phone registering under a new id still evicts its old record (full save), and a
    refresh of the survivor stays one device."""
    store = SyncStore(redis_url, Settings())
    aor = "sip:dup@example.com"
    old = make_device(1, aor=aor)
    store.save_device(old)
    moved = replace(old, device_id="dev-new", registered_at=time.time() + 5)
    assert store.save_device(moved) == ["dev1"]
    assert store.save_device(replace(moved, registered_at=time.time() + 6)) == []
    assert [d.device_id for d in store.devices(aor)] == ["dev-new"]


def test_a_refresh_also_says_whether_a_key_of_the_user_exists(redis_url: str) -> None:
    """(the REGISTER learns in its one round trip whether messages wait for the user)"""
    store = SyncStore(redis_url, Settings())
    aor = "sip:probe@example.com"
    dev = make_device(1, aor=aor)
    probe = schema.messages_key(aor)
    assert store.save_device_probing(dev, probe) == ([], True, False)  # a full save cannot tell: "look"
    assert store.save_device_probing(replace(dev, registered_at=time.time()), probe) == ([], False, False)
    raw_client(redis_url).xadd(probe, {"m": "1"})
    assert store.save_device_probing(replace(dev, registered_at=time.time()), probe) == ([], True, False)


def test_a_woken_device_refresh_records_its_wake_in_the_same_round_trip(redis_url: str) -> None:
    """The woken REGISTER's one script also marks the device woken in its parked calls (what
    ParkedCalls.wake does) and clears its pending set; a full save leaves that to the caller."""
    store = SyncStore(redis_url, Settings())
    state = ParkedCalls(store.client)
    aor = "sip:woke@example.com"
    dev = make_device(1, aor=aor)
    store.save_device(dev)
    now = time.time()
    state.park(ParkedCall(aor, "k1", "c1", "1", "A", "1", now + 30, pushed=(dev.device_id,)), now)
    assert raw_client(redis_url).exists(schema.pending_key(aor, dev.device_id))
    before = _evalsha_calls(redis_url)
    woke = store.save_device_probing(replace(dev, registered_at=now), None, schema.wake_args(aor, dev.device_id))
    assert woke == ([], False, True) and _evalsha_calls(redis_url) == before + 1
    parked = state.parked(aor, "k1")
    assert parked is not None and parked.woken == (dev.device_id,)
    assert not raw_client(redis_url).exists(schema.pending_key(aor, dev.device_id))
    changed = replace(dev, params=replace(dev.params, voip_token="cd" * 32))
    assert store.save_device_probing(changed, None, schema.wake_args(aor, dev.device_id)) == ([], True, False)
