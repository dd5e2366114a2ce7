"""Parked-call state (pushlib.parked) and SIP digest credentials (pushlib.credentials), against a real redis."""

from __future__ import annotations

import time

import pytest
import redis

from pushlib import schema
from pushlib.credentials import Subscribers, ha1
from pushlib.models import ParkedCall
from pushlib.parked import ParkedCalls
from pushlib.redisconn import StoreUnavailable, sync_client

AOR = "sip:b@h"


def _call(key: str, pushed: tuple[str, ...], window: float = 30) -> ParkedCall:
    return ParkedCall(AOR, key, f"cid-{key}", "1", "A", "1", time.time() + window, pushed)


def test_park_wake_finish(redis_url: str) -> None:
    st = ParkedCalls(sync_client(redis_url))
    st.warm_up()
    now = time.time()
    assert st.park(_call("k1", ("d1", "d2")), now)
    assert not st.park(_call("k1", ("d1", "d2")), now)  # retransmission / duplicate: no second park
    assert st.park(_call("k2", ("d1",)), now)  # a second call to the same user is its own
    assert st.wake(AOR, "d1") == ["k1", "k2"]
    assert st.wake(AOR, "d1") == []  # a second REGISTER adds no second branch
    ended = st.finish(AOR, "k1")
    assert ended is not None and ended.pushed == ("d1", "d2") and ended.woken == ("d1",)
    assert ended.call_id == "cid-k1" and ended.caller_name == "A" and ended.cseq == "1"
    assert st.finish(AOR, "k1") is None  # only one ender wins
    assert st.wake(AOR, "d2") == []  # k1 is gone; d2 was never pushed for k2


def test_parked_keys_live_the_window_plus_a_margin(redis_url: str) -> None:
    st = ParkedCalls(sync_client(redis_url))
    assert st.park(_call("k1", ("d1",), window=30), time.time())
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    # the deployed layout: one hash tag per AOR, so the wake script's keys share a slot
    assert r.hget("pn:{sip:b@h}:call:k1", "dev:d1") == "pushed"
    assert r.smembers("pn:{sip:b@h}:pend:d1") == {"k1"}
    for key in (schema.call_key(AOR, "k1"), schema.pending_key(AOR, "d1")):
        assert 30 + schema.PARKED_TTL_MARGIN - 2 <= r.ttl(key) <= 30 + schema.PARKED_TTL_MARGIN
    st.finish(AOR, "k1")
    assert not r.exists(schema.call_key(AOR, "k1")) and not r.sismember(schema.pending_key(AOR, "d1"), "k1")


def test_a_device_pushed_later_joins_the_parked_call(redis_url: str) -> None:
    st = ParkedCalls(sync_client(redis_url))
    now = time.time()
    assert st.park(_call("k3", ("d1",)), now)
    assert st.add_pushed(AOR, "k3", "d2", now)  # a silent phone rung directly, pushed afterwards
    assert not st.add_pushed(AOR, "k3", "d2", now)  # once
    assert not st.add_pushed(AOR, "gone", "d2", now)  # no call, nothing to join
    assert st.wake(AOR, "d2") == ["k3"]
    ended = st.finish(AOR, "k3")
    assert ended is not None and ended.pushed == ("d1", "d2") and ended.woken == ("d2",)
    assert st.wake(AOR, "d2") == []


def test_subscribers_store_ha1_only(redis_url: str) -> None:
    client = sync_client(redis_url)
    subs = Subscribers(client)
    subs.set_password("bob", "example.com", "s3cret")
    subs.set_password("carol", "example.com", "pw", realm="other.realm")
    assert subs.ha1("bob", "example.com") == ha1("bob", "example.com", "s3cret")
    assert subs.ha1("carol", "example.com") == ha1("carol", "other.realm", "pw")
    stored = client.hgetall("pn:sub:bob@example.com")
    assert stored == {"ha1": ha1("bob", "example.com", "s3cret"), "realm": "example.com"}
    assert subs.ha1("eve", "example.com") is None
    subs.remove([("bob", "example.com"), ("carol", "example.com")])
    subs.remove([])
    assert subs.ha1("bob", "example.com") is None and subs.ha1("carol", "example.com") is None


def test_ha1_is_the_digest_md5_of_user_realm_password() -> None:
    # RFC 2617 section 3.5
    assert ha1("Mufasa", "testrealm@host.com", "Circle Of Life") == "939e7578ed9e3c518a452acee763bce9"


def test_redis_down_is_store_unavailable() -> None:
    client = sync_client("redis://127.0.0.1:1/0", timeout=0.2)
    with pytest.raises(StoreUnavailable):
        ParkedCalls(client).wake(AOR, "d1")
    with pytest.raises(StoreUnavailable):
        ParkedCalls(client).warm_up()
    with pytest.raises(StoreUnavailable):
        Subscribers(client).ha1("bob", "example.com")


def test_server_refusing_writes_is_store_unavailable(redis_url: str) -> None:
    admin = redis.Redis.from_url(redis_url)
    st = ParkedCalls(sync_client(redis_url))
    admin.config_set("maxmemory", "1")  # every write now fails with OOM, a server (not connection) error
    try:
        with pytest.raises(StoreUnavailable, match="redis refused park"):
            st.park(_call("k1", ("d1",)), time.time())
        with pytest.raises(StoreUnavailable, match="redis refused set_password"):
            Subscribers(sync_client(redis_url)).set_password("bob", "example.com", "pw")
    finally:
        admin.config_set("maxmemory", "0")
        admin.close()
