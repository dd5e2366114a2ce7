"""pushlib against a real Redis Cluster on loopback (3 masters + 3 replicas, `harness.rediscluster`).

The store, parked-call, credential, message and dispatcher tests of tests/test_store.py,
tests/test_parked.py, tests/test_messages.py and tests/test_dispatcher.py run here again,
unchanged, against the cluster: this module's `redis_url` fixture (the cluster's
`redis+cluster://` URL, flushed before each test) replaces conftest's, and their raw-client
helpers are pointed at a cluster client. Then what only a cluster has: the dispatcher's stream
(enqueue, XREADGROUP, the no-wait script, ack, reclaim) through `AsyncStore`, listings that span
every master, and a master failover (graceful, and a killed master) during a run of calls.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from redis.crc import key_slot

import tests.test_dispatcher as test_dispatcher
import tests.test_store as test_store
from harness.rediscluster import RedisCluster, redis_cluster
from pushlib import schema
from pushlib.api.health import health
from pushlib.astore import AsyncStore
from pushlib.credentials import Subscribers, route_secret
from pushlib.models import AppCredentials, ParkedCall, Provider, PushJob, PushKind
from pushlib.parked import ParkedCalls
from pushlib.redisconn import StoreUnavailable, async_client, is_cluster, sync_client
from pushlib.settings import Settings
from pushlib.store import SyncStore
from tests.test_dispatcher import (  # noqa: F401 - collected here: they run against the cluster
    env,
    test_dead_tokens_disappear_and_a_device_without_any_is_dead,
    test_every_kind_arrives_on_both_platforms,
    test_live_work_is_not_stolen_by_another_dispatchers_reclaim,
)
from tests.test_messages import (  # noqa: F401
    store,
    test_chain_lock_one_per_binding_taken_over_by_a_new_binding,
    test_each_device_gets_each_message_once_in_order,
    test_limits_refuse_without_touching_what_is_stored,
)
from tests.test_parked import (  # noqa: F401
    test_a_device_pushed_later_joins_the_parked_call,
    test_park_wake_finish,
    test_subscribers_store_ha1_only,
)
from tests.test_store import (  # noqa: F401
    test_a_device_refreshing_its_record_takes_one_round_trip,
    test_a_refresh_also_says_whether_a_key_of_the_user_exists,
    test_a_refresh_never_keeps_a_duplicate_of_another_device,
    test_a_woken_device_refresh_records_its_wake_in_the_same_round_trip,
    test_app_index_lists_apps_without_their_secrets,
    test_async_store_reads_what_the_sync_store_wrote,
    test_batched_outcomes_count_and_feed_the_window,
    test_corrupt_records_are_ignored_not_fatal,
    test_dead_token_removed_once_then_device_marked_dead,
    test_device_round_trip_keeps_every_field,
    test_device_ttl_follows_expiry_with_a_floor,
    test_eleventh_device_evicts_the_oldest_registered,
    test_enqueue_writes_flat_fields_the_dispatcher_decodes,
    test_expired_device_ids_are_cleaned_from_the_aor_set,
    test_idempotency_marks,
    test_job_devices_returns_targets_with_their_sent_marks,
    test_quarantine_is_set_and_a_new_register_clears_it,
    test_remove_device,
    test_save_device_plans_again_when_the_set_changed_meanwhile,
    test_stream_is_trimmed_to_about_maxlen,
)

pytestmark = pytest.mark.timeout(60)

# "works again" after a failover: generous, the measured windows are ~0 s (graceful) and ~2-3 s
# (killed master, node timeout 1 s); bench/cluster_failover.py measures them
RECOVERY_BOUND = 10.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with redis_cluster() as c:
        yield c


@pytest.fixture()
def redis_url(cluster: RedisCluster) -> str:
    """The cluster's URL, every master flushed (overrides conftest's single-server fixture)."""
    cluster.flush()
    return cluster.url


def _raw(url: str) -> Any:
    return sync_client(url, 2.0)


def _evalsha_calls(cluster: RedisCluster) -> int:
    """EVALSHA calls served by all masters (test_store counts round trips with it)."""
    total = 0
    for node in cluster.masters():
        with node.client() as c:
            total += int(c.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
    return total


def _stream_done(cfg: Settings) -> bool:
    r = _raw(cfg.redis_url)
    try:
        groups = {g["name"]: g for g in r.xinfo_groups(cfg.stream)} if r.exists(cfg.stream) else {}
        if cfg.group not in groups:
            return False
        return bool(r.xlen(cfg.stream) == 0 and groups[cfg.group]["pending"] == 0)
    finally:
        r.close()


@pytest.fixture(autouse=True)
def cluster_helpers(monkeypatch: pytest.MonkeyPatch, cluster: RedisCluster) -> None:
    """The reused tests' raw-client helpers, on the cluster."""
    monkeypatch.setattr(test_store, "raw_client", _raw)
    monkeypatch.setattr(test_store, "_evalsha_calls", lambda url: _evalsha_calls(cluster))
    monkeypatch.setattr(test_dispatcher, "raw", lambda cfg: _raw(cfg.redis_url))
    monkeypatch.setattr(test_dispatcher, "stream_done", _stream_done)


def _job(i: int, aor: str = "sip:q@example.com") -> PushJob:
    return PushJob(f"j{i}", PushKind.INCOMING_CALL, aor, time.time() + 30, ("d1",), {"n": str(i)}, time.time())


# --------------------------------------------------------------------------- the client


def test_the_cluster_url_gives_cluster_clients_that_span_every_master(redis_url: str, cluster: RedisCluster) -> None:
    sync = sync_client(redis_url)
    assert is_cluster(sync) and sync.ping()
    aors = [f"sip:u{i}@example.com" for i in range(60)]
    for aor in aors:
        sync.set(schema.subscriber_key(*aor.removeprefix("sip:").split("@")), "x")
    # the users' keys are spread over the three masters...
    owners = {cluster.master_of_slot(int(key_slot(schema.devices_key(a).encode()))).port for a in aors}
    assert len(owners) == 3
    # ...and listings walk every master
    assert len(list(sync.scan_iter(match="pn:sub:*", count=100))) == len(aors)
    sync.close()


def test_apps_are_listed_and_reindexed_across_masters(redis_url: str) -> None:
    sync = SyncStore(redis_url, Settings())
    apps = [AppCredentials(Provider.FCM, f"proj-{i}", fcm_service_account="{}") for i in range(12)]
    for app in apps:
        sync.save_app(app)
    sync.client.delete(schema.APP_INDEX_KEY)
    assert sync.reindex_apps() == len(apps)
    assert all(sync.app_enabled("fcm", a.app_id) for a in apps)
    assert sync.remove_all_devices("sip:nobody@example.com") == []
    sync.close()


def test_park_and_push_and_credentials(redis_url: str) -> None:
    sync = SyncStore(redis_url, Settings(stream="pn:cl-jobs"))
    parked = ParkedCalls(sync.client)
    parked.warm_up()
    now = time.time()
    call = ParkedCall("sip:p@example.com", "k1", "cid", "1", "A", "1", now + 30, ("d1", "d2"))
    parked.park_and_push(call, _job(1, call.aor), sync.settings, now)
    assert sync.client.xlen("pn:cl-jobs") == 1
    assert parked.wake(call.aor, "d1") == ["k1"]
    ended = parked.finish(call.aor, "k1")
    assert ended is not None and ended.woken == ("d1",)
    # the scripts were flushed (a restarted or promoted node): EVALSHA loads them again
    sync.client.script_flush()
    parked.park_and_push(call, _job(2, call.aor), sync.settings, now)
    assert parked.parked(call.aor, "k1") is not None
    subs = Subscribers(sync.client)
    subs.set_password("bob", "example.com", "pw")
    subs.set_password("carol", "example.org", "pw")
    subs.remove([("bob", "example.com"), ("carol", "example.org")])  # a DEL over two slots
    assert subs.ha1("bob", "example.com") is None and subs.ha1("carol", "example.org") is None
    assert route_secret(sync.client) == route_secret(sync.client)
    sync.close()


def test_a_bad_cluster_url_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="database 0 only"):
        sync_client("redis+cluster://127.0.0.1:7000/2")
    with pytest.raises(ValueError, match="host:port"):
        async_client("redis+cluster://:secret@127.0.0.1:7000,,x")


def test_no_reachable_node_is_store_unavailable() -> None:
    from harness.localrun import free_port
    with pytest.raises(StoreUnavailable):
        SyncStore(f"redis+cluster://127.0.0.1:{free_port()}", Settings(), timeout=0.2).ping()


# --------------------------------------------------------------------------- the dispatcher's stream


def test_the_dispatchers_stream_on_the_cluster(redis_url: str) -> None:
    cfg = Settings(redis_url=redis_url, stream="pn:cl-stream")
    sync = SyncStore(redis_url, cfg)
    ids = [sync.enqueue(_job(i)) for i in range(6)]

    async def scenario() -> None:
        a, b, api = AsyncStore(redis_url, cfg), AsyncStore(redis_url, cfg), async_client(redis_url)
        try:
            await a.ensure_group()
            await b.ensure_group()  # BUSYGROUP: already there
            got = await a.read_new("a", 2, 100)  # XREADGROUP
            assert [eid for eid, _ in got] == ids[:2]
            assert schema.decode_job(got[0][1]).job_id == "j0"
            rest = await a.read_new_nowait("a", 10)  # the script
            assert [eid for eid, _ in rest] == ids[2:]
            await a.finish(ids[:3])  # XACK + XDEL in one MULTI
            await asyncio.sleep(0.3)
            await a.touch("a", [ids[3]])  # still being worked on: not reclaimable
            _, reclaimed, deleted = await b.reclaim("b", 200, "0-0", 10)  # XAUTOCLAIM
            assert [eid for eid, _ in reclaimed] == ids[4:] and deleted == []
            reader = asyncio.create_task(b.read_new("b", 1, 1500))  # a dispatcher waiting for work
            await asyncio.sleep(0.2)
            doc = await health(api, cfg)
            assert doc["status"] == "ok" and doc["pending"] == 3 and doc["reading_clients"] >= 1
            assert await reader == []
            await b.finish(ids[3:])
            assert await api.xlen(cfg.stream) == 0
        finally:
            await a.aclose()
            await b.aclose()
            await api.aclose()

    asyncio.run(scenario())
    sync.close()


# --------------------------------------------------------------------------- failover


def _calls_during(cluster: RedisCluster, redis_url: str, fail: Any, promoted: Any) -> tuple[int, int]:
    """Park/finish calls of users whose keys live on one master while `fail(master)` takes it
    away; returns (calls, failed). Bounded: stops RECOVERY_BOUND s after the failover started,
    and asserts the calls work again by then (and that earlier data survived)."""
    sync = SyncStore(redis_url, Settings())
    parked = ParkedCalls(sync.client)
    aor = "sip:fo@example.com"
    kept = ParkedCall(aor, "kept", "cid", "1", "A", "1", time.time() + 60, ("d0",))
    assert parked.park(kept, time.time())
    master = cluster.master_of_slot(int(key_slot(schema.call_key(aor, "").encode())))
    replica = cluster.replica_of(master)
    calls = failed = 0
    started = None
    ok_after = 0
    end = time.monotonic() + RECOVERY_BOUND + 5
    while time.monotonic() < end:
        key = uuid.uuid4().hex[:8]
        try:
            now = time.time()
            assert parked.park(ParkedCall(aor, key, "c", "1", "A", "1", now + 30, ("d1",)), now)
            assert parked.finish(aor, key) is not None
            if started is not None and promoted(replica):
                ok_after += 1
        except StoreUnavailable:
            failed += 1
        calls += 1
        if calls == 50:
            started = time.monotonic()
            fail(master, replica)
        if ok_after >= 50:
            break
        time.sleep(0.002)
    assert started is not None
    assert ok_after >= 50, f"calls did not work again within {RECOVERY_BOUND}s of the failover"
    assert time.monotonic() - started < RECOVERY_BOUND + 5
    assert cluster.master_of_slot(int(key_slot(schema.call_key(aor, "").encode()))) is replica
    survived = parked.parked(aor, "kept")  # written before: replicated, so still there
    assert survived is not None and survived.call_id == "cid"
    sync.close()
    return calls, failed


def _is_master(cluster: RedisCluster) -> Any:
    def check(node: Any) -> bool:
        with node.client() as c:
            return bool(c.execute_command("ROLE")[0] == "master")
    return check


def test_calls_go_on_through_a_graceful_failover(redis_url: str, cluster: RedisCluster) -> None:
    calls, failed = _calls_during(cluster, redis_url, lambda master, replica: cluster.failover(replica),
                                  _is_master(cluster))
    print(f"graceful failover: {failed} of {calls} calls failed")


def test_calls_work_again_after_a_master_is_killed(redis_url: str, cluster: RedisCluster) -> None:
    killed: list[Any] = []

    def kill(master: Any, replica: Any) -> None:
        killed.append(master)
        cluster.kill(master)

    try:
        calls, failed = _calls_during(cluster, redis_url, kill, _is_master(cluster))
        print(f"killed master: {failed} of {calls} calls failed")
        assert failed > 0  # (the kill did hit the calls' master)
    finally:
        for node in killed:
            cluster.restart(node)
