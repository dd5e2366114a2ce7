"""Redis Cluster key rules, without a server: every Lua script call and every MULTI transaction
pushlib makes touches one hash slot.

Every Redis-backed class is built on a recording fake client and every method that runs a script
or a transaction is called; the test checks, with redis-py's own slot function
(`redis.crc.key_slot`), that each script's KEYS and the keys it builds from ARGV prefixes (every
argument starting with `pn:`) hash to one slot, and that each transaction's keys do. A guard
counts the `register_script(` call sites in pushlib: a new script, or a new class using one,
fails here until its calls are driven below (and so checked)."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from redis.crc import key_slot

import pushlib.astore as astore_module
import pushlib.parked as parked_module
from pushlib import mwi, reregister, schema
from pushlib.apikeys import ApiKeyStore, Scope
from pushlib.astore import AsyncStore
from pushlib.credentials import Subscribers
from pushlib.messages import MessageLimits, StoredMessage, new_message_id
from pushlib.models import Device, ParkedCall, Provider, PushJob, PushKind, PushParams
from pushlib.msgstore import MessageStore
from pushlib.parked import ParkedCalls
from pushlib.settings import Settings
from pushlib.store import SyncStore
from pushlib.tenants import TenantStore

ROOT = Path(__file__).resolve().parent.parent
# AORs whose keys must stay together: plain, and with braces (a `}` in the user part ends the hash
# tag early, but at the same place in every key of the AOR, so they still share a slot).
AORS = ("sip:alice@example.com", "sip:we{ird}@h.example", "sip:b}ob@x")


def slot(key: str | bytes) -> int:
    return int(key_slot(key.encode() if isinstance(key, str) else key))


@dataclass
class Recorder:
    """What the fakes saw: script runs (source, keys, args) and transactions (commands)."""

    scripts: list[tuple[str, list[str], list[str]]] = field(default_factory=list)
    transactions: list[list[tuple[str, tuple[Any, ...]]]] = field(default_factory=list)
    registered: set[str] = field(default_factory=set)
    replies: dict[str, Any] = field(default_factory=dict)

    def script(self, source: str, keys: list[Any], args: list[Any]) -> Any:
        self.scripts.append((source, [str(k) for k in keys], [str(a) for a in args]))
        return self.replies.get(source, 0)


# What a command the code under test does not care about answers here, by method name.
DEFAULT_REPLIES: dict[str, Any] = {
    "hgetall": {}, "smembers": set(), "sismember": 1, "hget": None, "lrange": [], "scan_iter": iter(()),
    "hsetnx": 1, "sadd": 1, "xlen": 0, "get": None, "getdel": None, "exists": 0, "hdel": 1, "delete": 1,
}


def _sha(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()


class FakeScript:
    def __init__(self, rec: Recorder, source: str) -> None:
        self.rec, self.source, self.sha = rec, source, _sha(source)

    def __call__(self, keys: Any = (), args: Any = (), client: Any = None) -> Any:
        return self.rec.script(self.source, list(keys), list(args))


class AsyncFakeScript(FakeScript):
    async def __call__(self, keys: Any = (), args: Any = (), client: Any = None) -> Any:
        return self.rec.script(self.source, list(keys), list(args))


class FakePipeline:
    def __init__(self, client: FakeClient, transaction: bool) -> None:
        self.client, self.transaction = client, transaction
        self.commands: list[tuple[str, tuple[Any, ...]]] = []

    def evalsha(self, sha: str, numkeys: int, *rest: Any) -> FakePipeline:
        self.commands.append(("evalsha", (sha, numkeys, *rest)))
        return self

    def __getattr__(self, name: str) -> Callable[..., FakePipeline]:
        def queue(*args: Any, **kwargs: Any) -> FakePipeline:
            self.commands.append((name, args))
            return self
        return queue

    def _run(self) -> list[Any]:
        if self.transaction:
            self.client.rec.transactions.append(list(self.commands))
        replies = []
        for name, args in self.commands:
            if name == "evalsha":
                source = self.client.sources[args[0]]
                replies.append(self.client.rec.script(source, list(args[2:2 + args[1]]), list(args[2 + args[1]:])))
            else:
                replies.append(self.client.answer(name))
        return replies

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        return self._run()


class AsyncFakePipeline(FakePipeline):
    async def execute(self, raise_on_error: bool = True) -> list[Any]:  # type: ignore[override]
        return self._run()


class FakeClient:
    """Answers every command with DEFAULT_REPLIES (or 1); records scripts and transactions."""

    script_class: type[FakeScript] = FakeScript
    pipeline_class: type[FakePipeline] = FakePipeline

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec
        self.sources: dict[str, str] = {}
        self.answers: dict[str, Any] = {}  # a test's own answers, before DEFAULT_REPLIES

    def answer(self, name: str) -> Any:
        return self.answers.get(name, DEFAULT_REPLIES.get(name, 1))

    def register_script(self, source: str) -> FakeScript:
        self.rec.registered.add(source)
        self.sources[_sha(source)] = source
        return self.script_class(self.rec, source)

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return self.pipeline_class(self, transaction)

    def evalsha(self, sha: str, numkeys: int, *rest: Any) -> Any:
        return self.rec.script(self.sources[sha], list(rest[:numkeys]), list(rest[numkeys:]))

    def __getattr__(self, name: str) -> Callable[..., Any]:
        return lambda *args, **kwargs: self.answer(name)


class AsyncFakeClient(FakeClient):
    script_class = AsyncFakeScript
    pipeline_class = AsyncFakePipeline

    async def evalsha(self, sha: str, numkeys: int, *rest: Any) -> Any:
        return self.rec.script(self.sources[sha], list(rest[:numkeys]), list(rest[numkeys:]))

    def __getattr__(self, name: str) -> Callable[..., Any]:
        async def command(*args: Any, **kwargs: Any) -> Any:
            return self.answer(name)
        return command


def _device(aor: str, i: int) -> Device:
    now = time.time()
    params = PushParams(Provider.APNS, "com.example.app", voip_token=f"{i:02x}" * 32, alert_token="ab" * 32)
    return Device(aor, f"dev{i}", params, "<sip:x@10.0.0.1>", "UA", now, now + 3600)


def _drive_sync(rec: Recorder, aor: str) -> None:
    """Every sync method that runs a script or a transaction, for one AOR."""
    client = FakeClient(rec)
    store = SyncStore.__new__(SyncStore)  # the constructor would build a real client
    store.settings = Settings()
    store._r = client
    store._devices = client.register_script(schema.DEVICES_LUA)
    store._save_device = client.register_script(schema.SAVE_DEVICE_LUA)
    store._refresh_device = client.register_script(schema.REFRESH_DEVICE_LUA)
    rec.replies.update({schema.REFRESH_DEVICE_LUA: 0, schema.DEVICES_LUA: [[], []], schema.SAVE_DEVICE_LUA: 1})
    dev = _device(aor, 1)
    # the router's probe is the user's message queue; its wake the device's pending set
    store.save_device_probing(dev, schema.messages_key(aor), schema.wake_args(aor, dev.device_id))
    store.save_device(dev)
    store.devices(aor)
    client.answers["smembers"] = {"dev1", "dev2"}
    store.remove_all_devices(aor)
    client.answers.clear()
    store.remove_device(aor, "dev1")
    store.reindex_apps()

    parked = ParkedCalls(client)
    call = ParkedCall(aor, "k1", "cid", "1", "A", "1", time.time() + 30, ("dev1", "dev2"))
    job = PushJob("j1", PushKind.INCOMING_CALL, aor, time.time() + 30, ("dev1", "dev2"), {}, time.time())
    rec.replies.update({schema.PARK_LUA: 1, schema.FINISH_LUA: [], _private_script(parked_module, "_WAKE_LUA"): []})
    parked.park(call, time.time())
    parked.park_and_push(call, job, Settings(), time.time())  # plain Redis: the pipelined EVALSHA
    parked._cluster = True
    parked.park_and_push(call, job, Settings(), time.time())  # a cluster: the script, then XADD
    parked._cluster = False
    parked.wake(aor, "dev1")
    parked.finish(aor, "k1")

    msgs = MessageStore(client, MessageLimits())
    msg = StoredMessage(new_message_id(), "<sip:a@b>", "text/plain", "hi", time.time())
    rec.replies.update({schema.STORE_MESSAGE_LUA: [1, "1-0"], schema.NEXT_MESSAGE_LUA: [],
                        schema.CLAIM_MESSAGE_LOCK_LUA: 1})
    msgs.store(aor, ("dev1", "dev2"), msg)
    msgs.next_for(aor, "dev1")
    msgs.ack(aor, "dev1", "1-0")
    token = msgs.lock(aor, "dev1", "sip:x\t")
    assert token is not None
    msgs.refresh(aor, "dev1", token, "sip:x\t")
    msgs.unlock(aor, "dev1", token, "sip:x\t")

    vm = mwi.VoicemailStore(client)
    vm.swap_counts(aor, 2, 1, time.time())
    Subscribers(client).remove([("alice", "example.com"), ("bob", "example.com")])  # no transaction
    reregister.schedule(client, aor, "dev1", time.time())


async def _drive_async(rec: Recorder, aor: str) -> None:
    """Every async method that runs a script or a transaction, for one AOR."""
    client = AsyncFakeClient(rec)
    astore = AsyncStore.__new__(AsyncStore)
    astore.settings = Settings()
    astore._r = client
    astore._cluster = False
    astore._remove_token = client.register_script(_astore_script("_REMOVE_TOKEN"))
    astore._set_if_exists = client.register_script(_astore_script("_SET_IF_EXISTS"))
    astore._job_devices = client.register_script(_astore_script("_JOB_DEVICES"))
    astore._read_nowait = client.register_script(_astore_script("_READ_NOWAIT"))
    rec.replies.update({_astore_script("_JOB_DEVICES"): "[]", _astore_script("_READ_NOWAIT"): "[]"})
    await astore.remove_token(aor, "dev1", "tok")
    await astore.quarantine_device(aor, "dev1")
    await astore.job_devices_many([(aor, "j1", ("dev1",))])
    await astore.job_devices_many([(aor, "j1", ()), ("sip:other@example.com", "j2", ("d",))])
    astore._cluster = True  # the cluster's concurrent EVALSHAs
    await astore.job_devices_many([(aor, "j1", ()), ("sip:other@example.com", "j2", ("d",))])
    astore._cluster = False
    await astore.read_new_nowait("c1", 10)
    await astore.finish(["1-0", "2-0"])

    claimer = reregister.Claimer(client)
    rec.replies[reregister.CLAIM_DUE_LUA] = []
    await claimer.claim(time.time())

    keys = ApiKeyStore(client)
    await keys.create(frozenset({Scope.SEND}), None, "k")
    await keys.revoke("kid")
    tenants = TenantStore(client)
    await tenants.delete("t1")


def _private_script(module: ModuleType, name: str) -> str:
    source = getattr(module, name)
    assert isinstance(source, str)
    return source


def _astore_script(name: str) -> str:
    return _private_script(astore_module, name)


@pytest.fixture(scope="module")
def recorded() -> Iterator[Recorder]:
    rec = Recorder()
    for aor in AORS:
        _drive_sync(rec, aor)
        asyncio.run(_drive_async(rec, aor))
    yield rec


def _script_keys(keys: list[str], args: list[str]) -> list[str]:
    """A script's KEYS and the keys (or key prefixes) it builds from ARGV."""
    return [*keys, *(a for a in args if a.startswith("pn:"))]


def test_every_script_call_touches_one_slot(recorded: Recorder) -> None:
    assert recorded.scripts
    for source, keys, args in recorded.scripts:
        touched = _script_keys(keys, args)
        assert keys, f"a script called without KEYS cannot be routed on a cluster: {source[:60]!r}"
        slots = {slot(k) for k in touched}
        assert len(slots) == 1, f"script {source[:60]!r} touches {touched} in slots {slots}"


def test_every_transaction_touches_one_slot(recorded: Recorder) -> None:
    assert len(recorded.transactions) >= 6  # devices (2), app index, stream ack, API keys (2), tenant
    for commands in recorded.transactions:
        keys = [str(args[0]) for _, args in commands]
        assert len({slot(k) for k in keys}) == 1, f"MULTI over several slots: {commands}"


def test_every_registered_script_was_driven(recorded: Recorder) -> None:
    called = {source for source, _, _ in recorded.scripts}
    assert recorded.registered <= called, [s[:60] for s in recorded.registered - called]


def test_every_register_script_call_site_is_known() -> None:
    """Counts the call sites in pushlib (redisconn's lazy cluster client only passes them on):
    adding one means driving its calls above."""
    sites = {}
    for path in sorted((ROOT / "pushlib").rglob("*.py")):
        if path.name == "redisconn.py":
            continue
        n = len(re.findall(r"\bregister_script\(", path.read_text()))
        if n:
            sites[path.relative_to(ROOT).as_posix()] = n
    assert sites == {
        "pushlib/astore.py": 4, "pushlib/msgstore.py": 5, "pushlib/mwi.py": 1, "pushlib/parked.py": 3,
        "pushlib/reregister.py": 1, "pushlib/store.py": 3,
    }


def test_keys_used_together_share_the_aor_slot() -> None:
    """The per-user keys of the schema all carry the AOR's hash tag; the global ones stay global."""
    for aor in AORS:
        per_user = [
            schema.device_key(aor, "d"), schema.devices_key(aor), schema.sent_key(aor, "j", "d"),
            schema.call_key(aor, "k"), schema.pending_key(aor, "d"), schema.messages_key(aor),
            schema.message_meta_key(aor), schema.message_cursor_key(aor), schema.message_lock_key(aor, "d"),
            schema.message_again_key(aor, "d"), mwi.counts_key(aor),
        ]
        assert len({slot(k) for k in per_user}) == 1, per_user
    assert len({slot(k) for k in (schema.app_status_key("apns", "a"), schema.app_window_key("apns", "a"))}) == 1
    assert len({slot(k) for k in (schema.API_KEY_IDS_KEY, schema.api_key_key("x"))}) == 1
    tenant_keys = (schema.TENANT_IDS_KEY, schema.TENANT_DOMAINS_KEY, schema.TENANT_APPS_KEY, schema.tenant_key("t"))
    assert len({slot(k) for k in tenant_keys}) == 1
    metrics = (schema.METRICS_PUSHES_KEY, schema.METRICS_LATENCY_KEY, schema.METRICS_EVENTS_KEY)
    assert len({slot(k) for k in metrics}) == 1
