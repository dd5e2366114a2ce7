"""SyncStore turns every Redis failure into StoreUnavailable, so a SIP worker always answers."""

from __future__ import annotations

import time

import pytest
import redis

from pushlib.models import Device, Provider, PushJob, PushKind, PushParams
from pushlib.redisconn import StoreUnavailable
from pushlib.settings import Settings
from pushlib.store import SyncStore


def test_server_refusing_writes_is_store_unavailable(redis_url: str) -> None:
    admin = redis.Redis.from_url(redis_url)
    store = SyncStore(redis_url, Settings())
    device = Device("alice@example.com", "d1", PushParams(Provider.FCM, "proj", alert_token="tok"),
                    registered_at=time.time(), expires_at=time.time() + 60)
    admin.config_set("maxmemory", "1")  # every write now fails with OOM, a server (not connection) error
    try:
        with pytest.raises(StoreUnavailable, match="redis refused save_device"):
            store.save_device(device)
        with pytest.raises(StoreUnavailable, match="redis refused enqueue"):
            store.enqueue(PushJob("j1", PushKind.MISSED_CALL, "alice@example.com", deadline=time.time() + 60))
        assert store.devices("alice@example.com") == []  # reads still work
    finally:
        admin.config_set("maxmemory", "0")
        admin.close()
    store.save_device(device)
    assert [d.device_id for d in store.devices("alice@example.com")] == ["d1"]
    store.close()
