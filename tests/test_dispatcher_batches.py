"""The dispatcher's batched Redis work: one script call for the device lookups of a batch of jobs,
one for the sent marks and acks of a batch, reads sized to the free job slots under a backlog;
and the payload ids drawn from a block of random bytes."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import redis
from redis.exceptions import ResponseError

from pushlib import schema
from pushlib.astore import AsyncStore
from pushlib.models import Device, Provider, PushJob, PushKind, PushParams
from pushlib.payloads import apns_id
from pushlib.settings import Settings
from pushlib.store import SyncStore
from pushsandbox.process import SandboxHandle
from tests.support import ios, run_dispatcher, stream_done

BUNDLE = "com.example.phone"


def _raw(url: str) -> Any:
    return redis.Redis.from_url(url, decode_responses=True)


def _with_store(url: str, body: Callable[[AsyncStore], Coroutine[Any, Any, Any]]) -> Any:
    async def main() -> Any:
        store = AsyncStore(url, Settings(redis_url=url))
        try:
            return await body(store)
        finally:
            await store.aclose()

    return asyncio.run(main())


def _device(aor: str, name: str, registered_at: float) -> Device:
    params = PushParams(Provider.APNS, BUNDLE, alert_token=secrets.token_hex(32))
    return Device(aor, name, params, registered_at=registered_at, expires_at=time.time() + 3600)


def test_marks_and_acks_are_written_together(redis_url: str) -> None:
    cfg = Settings(redis_url=redis_url)
    r = _raw(redis_url)
    r.xgroup_create(cfg.stream, cfg.group, id="0", mkstream=True)
    ids = [r.xadd(cfg.stream, {"n": str(i)}) for i in range(4)]
    r.xreadgroup(cfg.group, "c1", {cfg.stream: ">"})
    marks = [("sip:a@example.com", "j1", "d1"), ("sip:b@example.com", "j2", "d1")]

    _with_store(redis_url, lambda store: store.mark_sent_and_finish(marks, ids[:3]))
    assert all(r.get(schema.sent_key(*mark)) == "1" for mark in marks)
    assert all(0 < r.ttl(schema.sent_key(*mark)) <= schema.SENT_MARK_TTL for mark in marks)
    assert [e[0] for e in r.xrange(cfg.stream)] == ids[3:]  # acked and deleted
    assert r.xpending(cfg.stream, cfg.group)["pending"] == 1

    r.script_flush()  # a restarted Redis has no scripts: loaded again, nothing lost
    _with_store(redis_url, lambda store: store.mark_sent_and_finish([("sip:c@example.com", "j3", "d")], ids[3:]))
    assert r.exists(schema.sent_key("sip:c@example.com", "j3", "d")) and r.xlen(cfg.stream) == 0
    assert r.xpending(cfg.stream, cfg.group)["pending"] == 0
    _with_store(redis_url, lambda store: store.mark_sent_and_finish([], []))  # nothing to do


def test_batched_lookup_answers_as_the_per_job_one(redis_url: str) -> None:
    sync = SyncStore(redis_url, Settings(redis_url=redis_url))
    now = time.time()
    aors = [f"sip:user{i}@example.com" for i in range(5)]
    for i, aor in enumerate(aors[:4]):
        for j in range(i + 1):
            sync.save_device(_device(aor, f"dev{j}", now - j))
    sync.close()
    r = _raw(redis_url)
    r.sadd(schema.devices_key(aors[1]), "expired")  # no hash any more: dropped on the way
    r.set(schema.sent_key(aors[2], "job2", "dev1"), "1")
    requests = [(aors[0], "job0", ()), (aors[1], "job1", ()), (aors[2], "job2", ("dev1", "dev2", "nope")),
                (aors[3], "job3", ()), (aors[4], "job4", ())]

    async def both(store: AsyncStore) -> tuple[Any, Any]:
        batched = await store.job_devices_batch(requests)
        r.sadd(schema.devices_key(aors[1]), "expired")
        return batched, await store.job_devices_many(requests)

    batched, single = _with_store(redis_url, both)
    assert batched == single
    assert [[(d.device_id, sent) for d, sent in found] for found in batched] == [
        [("dev0", False)],
        [("dev1", False), ("dev0", False)],  # by registration time
        [("dev2", False), ("dev1", True)],
        [("dev3", False), ("dev2", False), ("dev1", False), ("dev0", False)],
        [],
    ]
    assert not r.sismember(schema.devices_key(aors[1]), "expired")


def test_batched_lookup_falls_back_on_a_refused_batch(redis_url: str) -> None:
    r = _raw(redis_url)
    r.set(schema.devices_key("sip:bad@example.com"), "not a set")
    requests = [("sip:bad@example.com", "j1", ()), ("sip:good@example.com", "j2", ())]
    for method in ("job_devices_batch", "job_devices_many"):
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            _with_store(redis_url, lambda store, m=method: getattr(store, m)(requests))  # type: ignore[misc]


def test_a_backlog_is_read_and_looked_up_in_batches(
    push_env: tuple[SandboxHandle, SyncStore, Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 queued jobs, 32 job slots: reads wait for a quarter of the slots, and the jobs of one
    read share one device lookup; every job is still pushed once, marked and acked."""
    sandbox, store, cfg = push_env
    calls = {"read": 0, "lookup": 0, "write": 0}

    def counting(name: str, original: Any) -> Any:
        async def wrapper(self: AsyncStore, *args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return await original(self, *args, **kwargs)
        return wrapper

    for name, method in (("read", "read_new"), ("read", "read_new_nowait"), ("lookup", "job_devices_batch"),
                         ("write", "mark_sent_and_finish")):
        monkeypatch.setattr(AsyncStore, method, counting(name, getattr(AsyncStore, method)))
    jobs = []
    for i in range(200):
        aor = f"sip:user{i}@example.com"
        store.save_device(ios(aor, "iphone", alert=secrets.token_hex(32)))
        jobs.append(PushJob(uuid.uuid4().hex, PushKind.MESSAGE, aor, time.time() + 60,
                            data={"message": "hi", "sender": "Bob"}, created_at=time.time()))
    for job in jobs:
        store.enqueue(job)

    d = run_dispatcher(cfg, lambda: stream_done(cfg))

    assert d.stats["delivered"] == 200 and len(sandbox.control.pushes()) == 200
    r = _raw(cfg.redis_url)
    assert all(r.exists(schema.sent_key(j.aor, j.job_id, "iphone")) for j in jobs)
    # 32 slots: the first read takes 32, every later one at least 8 (blocking reads that find
    # nothing while idle at the end add a few)
    assert calls["read"] <= 1 + (200 - 32) // 8 + 10, calls
    assert calls["lookup"] <= 2 * calls["read"], calls
    assert 0 < calls["write"] <= 200, calls


def test_apns_ids_are_uuid4_and_a_forked_child_draws_its_own() -> None:
    ids = [apns_id() for _ in range(2000)]
    assert len(set(ids)) == 2000
    assert all(uuid.UUID(i).version == 4 and str(uuid.UUID(i)) == i for i in ids)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first id after the fork, from fresh random bytes
        try:
            os.write(write_end, apns_id().encode())
        finally:
            os._exit(0)
    os.close(write_end)
    child = os.read(read_end, 100).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    assert uuid.UUID(child).version == 4
    assert child != apns_id()  # a block shared across the fork would give both the same id next
