"""The README's Redis ACL lines against a real redis-server: each component's user runs its real code
paths (SIP worker, dispatcher, operator CLI, HTTP API) without one refusal (`ACL LOG` stays empty),
and gets NOPERM outside its job."""

from __future__ import annotations

import asyncio
import re
import shlex
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, ClassVar

import httpx
import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pushlib import reregister, schema
from pushlib.api.app import create_app
from pushlib.api.health import health
from pushlib.astore import AsyncStore
from pushlib.cli import main
from pushlib.credentials import Subscribers, route_secret
from pushlib.dispatcher import Dispatcher
from pushlib.messages import MessageLimits, StoredMessage
from pushlib.models import (
    ApnsRequest,
    AppCredentials,
    Device,
    FcmMessage,
    Outcome,
    ParkedCall,
    Provider,
    PushJob,
    PushKind,
    PushParams,
    PushResult,
)
from pushlib.msgstore import MessageStore, StoreOutcome
from pushlib.mwi import VoicemailStore, counts_key, record_and_push
from pushlib.parked import ParkedCalls
from pushlib.redisconn import async_client
from pushlib.settings import Settings
from pushlib.store import SyncStore
from tests.support import ROOT, RedisServer, redis_server

USERS = ("pn-sip", "pn-dispatch", "pn-admin", "pn-api")
AOR = "sip:alice@example.com"
FCM_APP = "example-phone"


def readme_acl_lines() -> dict[str, list[str]]:
    """`ACL SETUSER <user> ...` arguments of the README, by user (passwords replaced)."""
    text = (ROOT / "README.md").read_text()
    found: dict[str, list[str]] = {}
    for match in re.finditer(r"(?m)^ACL SETUSER (pn-[a-z]+) (.*)$", text):
        user, rest = match.group(1), match.group(2)
        found[user] = [f">pw-{user}" if arg.startswith(">") else arg for arg in shlex.split(rest)]
    return found


@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisServer]:
    lines = readme_acl_lines()
    assert set(lines) == set(USERS)
    with redis_server() as server:
        admin: Any = redis.Redis.from_url(server.url)
        for user, args in lines.items():
            admin.execute_command("ACL", "SETUSER", user, *args)
        admin.close()
        yield server


@pytest.fixture()
def fresh(acl_server: RedisServer) -> RedisServer:
    """The ACL server, emptied (scripts too: each user loads the ones it runs), with an empty ACL LOG."""
    r = raw(acl_server)
    r.flushall()
    r.script_flush()
    r.execute_command("ACL", "LOG", "RESET")
    r.close()
    return acl_server


def url_of(server: RedisServer, user: str) -> str:
    return f"redis://{user}:pw-{user}@127.0.0.1:{server.port}/0"


def raw(server: RedisServer, user: str | None = None) -> Any:
    url = server.url if user is None else url_of(server, user)
    return redis.Redis.from_url(url, decode_responses=True)


def refusals(server: RedisServer) -> list[str]:
    """What Redis refused since the last reset (`ACL LOG`: user, reason, context and the command or
    key), then resets the log."""
    r = raw(server)
    try:
        entries = r.execute_command("ACL", "LOG")
        r.execute_command("ACL", "LOG", "RESET")
    finally:
        r.close()
    out = []
    for entry in entries:
        e = entry if isinstance(entry, dict) else dict(zip(entry[::2], entry[1::2], strict=True))
        out.append(f"{e['username']} {e['reason']} {e['context']} {e['object']}")
    return out


def device(aor: str, name: str, token: str, app_id: str = FCM_APP, now: float | None = None) -> Device:
    now = time.time() if now is None else now
    return Device(aor, name, PushParams(Provider.FCM, app_id, alert_token=token), registered_at=now,
                  expires_at=now + 3600)


def save_fcm_app(server: RedisServer, tmp_path: Any) -> None:
    sa = tmp_path / "sa.json"
    sa.write_text('{"project_id": "example-phone", "client_email": "x@example-phone.iam.gserviceaccount.com", '
                  '"private_key": "k", "token_uri": "https://x/token"}')
    assert main(["--redis-url", url_of(server, "pn-admin"), "app", "set-fcm", "--service-account", str(sa),
                 "--alias", "123456789012"]) == 0


def test_aliases_and_device_removal_work_for_each_user(acl_server: RedisServer, tmp_path: Any, capsys) -> None:
    raw(acl_server).flushall()
    admin = ["--redis-url", url_of(acl_server, "pn-admin")]
    sa = tmp_path / "sa.json"
    sa.write_text('{"project_id": "example-phone", "client_email": "x@example-phone.iam.gserviceaccount.com", '
                  '"private_key": "k", "token_uri": "https://x/token"}')
    assert main([*admin, "app", "set-fcm", "--service-account", str(sa), "--alias", "123456789012",
                 "--alias", "com.example.phone"]) == 0
    assert main([*admin, "app", "alias-remove", "fcm", "example-phone", "com.example.phone"]) == 0
    assert main([*admin, "app", "aliases", "fcm", "example-phone"]) == 0
    assert main([*admin, "app", "disable", "fcm", "example-phone"]) == 0
    assert main([*admin, "app", "enable", "fcm", "example-phone"]) == 0
    assert main([*admin, "app", "reindex"]) == 0
    assert main([*admin, "app", "show", "fcm", "123456789012"]) == 0
    capsys.readouterr()

    # the SIP workers check the alias in the index, and cannot read credentials
    sip = SyncStore(url_of(acl_server, "pn-sip"), Settings())
    assert sip.app_enabled("fcm", "123456789012") is True
    first = route_secret(sip.client)  # the SIP workers create the Record-Route key once, then read it
    assert len(first) == 64 and route_secret(sip.client) == first
    assert sip.app_enabled("fcm", "com.example.phone") is None
    with pytest.raises(redis.exceptions.NoPermissionError):
        sip.client.hgetall(schema.app_key("fcm", "123456789012"))
    aor = "sip:alice@example.com"
    for name in ("d1", "d2", "d3"):
        sip.save_device(Device(aor, name, PushParams(Provider.FCM, "123456789012", alert_token="t" + name),
                               registered_at=1e9, expires_at=4e9))

    # the dispatcher resolves the alias to the project's credentials
    async def dispatcher_read() -> AppCredentials | None:
        store = AsyncStore(url_of(acl_server, "pn-dispatch"), Settings())
        try:
            return await store.app("fcm", "123456789012")
        finally:
            await store.aclose()

    app = asyncio.run(dispatcher_read())
    assert app is not None and app.app_id == "example-phone"

    # the operator removes devices, but still cannot rewrite a token
    assert main([*admin, "devices", "remove", "alice@example.com", "d1"]) == 0
    assert main([*admin, "devices", "alice@example.com"]) == 0
    assert main([*admin, "devices", "remove", "alice@example.com", "--all"]) == 0
    assert "removed 2 devices" in capsys.readouterr().out
    assert sip.devices(aor) == []
    sip.save_device(Device(aor, "d4", PushParams(Provider.FCM, "123456789012", alert_token="t4"),
                           registered_at=1e9, expires_at=4e9))
    with pytest.raises(redis.exceptions.NoPermissionError):
        raw(acl_server, "pn-admin").hset(schema.device_key(aor, "d4"), "alert_token", "forged")

    assert main([*admin, "app", "remove", "fcm", "example-phone"]) == 0
    assert sip.app_enabled("fcm", "123456789012") is None
    assert asyncio.run(dispatcher_read()) is None
    sip.close()


# --------------------------------------------------------------------------- the SIP workers


def test_sip_worker_paths(fresh: RedisServer) -> None:
    """What router.py and ksrmessages.py do in Redis, as pn-sip: Record-Route key, UA mappings, HA1 and
    voicemail URI, app index, device saves (refresh and full, with eviction), removal, re-registration
    scheduling, parked calls (park_and_push also after a script cache flush), jobs, messages, MWI."""
    r = raw(fresh)
    r.hset(schema.subscriber_key("alice", "example.com"), mapping={"ha1": "0" * 32, "realm": "example.com",
                                                                    "voicemail": "sip:vm@example.com"})
    r.hset(schema.APP_INDEX_KEY, schema.app_index_field("fcm", FCM_APP), "enabled")
    settings = Settings(max_devices_per_user=2)
    sip = SyncStore(url_of(fresh, "pn-sip"), settings)
    client = sip.client
    now = time.time()

    assert sip.ping() and len(route_secret(client)) == 64
    assert sip.ua_mappings() == []
    assert Subscribers(client).ha1("alice", "example.com") == "0" * 32
    vm = VoicemailStore(client)
    assert vm.uri(AOR) == "sip:vm@example.com"
    assert sip.app_enabled("fcm", FCM_APP) is True

    # devices: a full save, then a refresh of the same phone (REFRESH_DEVICE_LUA alone), then
    # another phone and a third one that evicts the oldest
    d1 = device(AOR, "d1", "t1", now=now - 10)
    assert sip.save_device(d1) == []
    full_saves = sip._save_device

    def no_full_save(**_: Any) -> int:
        raise AssertionError("the refresh should not need the full save")

    sip._save_device = no_full_save
    assert sip.save_device(replace(d1, expires_at=now + 7200)) == []
    sip._save_device = full_saves
    assert r.ttl(schema.device_key(AOR, "d1")) > 3600 and r.ttl(schema.devices_key(AOR)) > 3600
    assert sip.save_device(device(AOR, "d2", "t2", now=now - 5)) == []
    assert sip.save_device(device(AOR, "d3", "t3", now=now)) == ["d1"]
    assert [d.device_id for d in sip.devices(AOR)] == ["d2", "d3"]
    assert sip.remove_device(AOR, "d2") is True
    reregister.schedule(client, AOR, "d3", now + 3000)
    reregister.unschedule(client, AOR, ["d1"])

    # parked calls
    state = ParkedCalls(client)
    state.warm_up()
    call = ParkedCall(AOR, "k1", "cid-1", "1 INVITE", "Bob", "100", now + 30, pushed=("d3",))
    job = PushJob("j1", PushKind.INCOMING_CALL, AOR, now + 30, ("d3",), {"call_id": "cid-1"}, created_at=now)
    state.park_and_push(call, job, settings, now)
    r.script_flush()  # Redis lost its scripts: park_and_push loads the park script again
    state.park_and_push(replace(call, key="k2", call_id="cid-2"), replace(job, job_id="j2"), settings, now)
    assert r.hexists(schema.call_key(AOR, "k2"), "deadline") and r.xlen(settings.stream) == 2
    assert state.park(replace(call, key="k3"), now) is True
    assert state.add_pushed(AOR, "k1", "d4", now) is True
    assert state.wake(AOR, "d3") == ["k1", "k2", "k3"]
    assert state.asleep(AOR, "k1") == 1 and state.parked(AOR, "k1") is not None
    assert state.finish(AOR, "k1") is not None
    sip.enqueue(replace(job, job_id="j3", kind=PushKind.CANCEL_INCOMING_CALL))

    # MESSAGEs for sleeping devices (ksrmessages.py)
    ms = MessageStore(client, MessageLimits())
    stored = ms.store(AOR, ("d3",), StoredMessage("m1", "sip:bob@example.com", "text/plain", "hi", now))
    assert stored.outcome is StoreOutcome.STORED
    message = ms.next_for(AOR, "d3")
    assert message is not None and message.entry_id == stored.entry_id
    target = "sip:alice@192.0.2.1:5060\tudp:192.0.2.1:5060"
    token = ms.lock(AOR, "d3", target)
    assert token is not None and ms.lock(AOR, "d3", target) is None
    assert ms.refresh(AOR, "d3", token, target) is True
    assert ms.ack(AOR, "d3", message.entry_id) is True and ms.next_for(AOR, "d3") is None
    ms.ask_again(AOR, "d3", target)
    ms.unlock(AOR, "d3", token, target)
    assert ms.take_again(AOR, "d3") == target
    assert ms.queued(AOR) == (0, 0)

    # voicemail summaries (NOTIFY message-summary)
    assert record_and_push(vm, sip.enqueue, AOR, 2, 1, now, 3600) == (None, True)
    assert r.hget(counts_key(AOR), "new") == "2"
    sip.close()
    r.close()
    assert refusals(fresh) == []


# --------------------------------------------------------------------------- the dispatcher


class ScriptedPool:
    """A ProviderPool stand-in: the token's prefix decides the outcome."""

    OUTCOMES: ClassVar[dict[str, Outcome]] = {"ok": Outcome.DELIVERED, "dead": Outcome.TOKEN_DEAD,
                                              "sus": Outcome.DEVICE_SUSPECT, "cfg": Outcome.CONFIG_ERROR}

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    async def send(self, app: AppCredentials, device: Device, request: ApnsRequest | FcmMessage,
                   timeout: float) -> PushResult:
        self.sent.append((device.device_id, request.token))
        outcome = self.OUTCOMES[request.token.split("-", 1)[0]]
        return PushResult(outcome, 200 if outcome is Outcome.DELIVERED else 400, outcome.value)

    async def aclose(self) -> None:
        return None


def test_dispatcher_paths(fresh: RedisServer, tmp_path: Any) -> None:
    """A dispatcher as pn-dispatch: jobs with every final outcome (marks, dead token, quarantine, app
    error, missing app), a malformed and a late job, the metrics flush, the re-registration claim;
    /health as pn-api sees it consuming; then the AsyncStore calls a run may not reach."""
    save_fcm_app(fresh, tmp_path)
    sip = SyncStore(url_of(fresh, "pn-sip"), Settings())
    now = time.time()
    for name, token in (("ok", "ok-1"), ("dead", "dead-1"), ("sus", "sus-1"), ("cfg", "cfg-1")):
        sip.save_device(device(AOR, name, token, app_id="123456789012" if name == "ok" else FCM_APP))
    sip.save_device(device(AOR, "ghost", "ok-ghost", app_id="ghost-app"))
    bob = "sip:bob@example.com"
    sip.save_device(device(bob, "phone", "ok-rereg"))
    reregister.schedule(sip.client, bob, "phone", now - 1)
    sip.enqueue(PushJob("j1", PushKind.MESSAGE, AOR, now + 60, data={"body": "hi"}, created_at=now))
    sip.enqueue(PushJob("late", PushKind.MESSAGE, AOR, now - 1, data={"body": "hi"}, created_at=now - 5))
    r = raw(fresh)
    r.xadd("pn:jobs", {"job_id": "bad", "kind": "nonsense"})
    r.sadd(schema.devices_key(AOR), "expired")  # listed, hash gone: the job's device lookup drops it

    cfg = Settings(redis_url=url_of(fresh, "pn-dispatch"), reregister_before=60, reclaim_idle_ms=600)
    pool = ScriptedPool()
    seen: dict[str, Any] = {}

    def done() -> bool:
        if not any(d == "phone" for d, _ in pool.sent) or r.xlen(cfg.stream) or r.xpending(cfg.stream, cfg.group)[
                "pending"]:
            return False

        async def probe() -> dict[str, Any]:  # /health as the API reads it
            client = async_client(url_of(fresh, "pn-api"))
            try:
                return await health(client, Settings())
            finally:
                await client.aclose()

        seen.update(asyncio.run(probe()))
        return True

    dispatcher = Dispatcher(cfg, pool=pool, consumer="acl-test")  # type: ignore[arg-type]

    async def run() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(dispatcher.run(stop))
        end = time.monotonic() + 15
        while time.monotonic() < end and not task.done() and not await asyncio.to_thread(done):
            await asyncio.sleep(0.1)
        stop.set()
        await task

    asyncio.run(run())
    assert sorted(d for d, _ in pool.sent) == ["cfg", "dead", "ok", "phone", "sus"]
    assert dispatcher.stats["malformed"] == 1 and dispatcher.stats["deadline_dropped"] == 1
    assert seen["status"] == "ok" and seen["reading_clients"] >= 1, seen
    assert r.exists(schema.sent_key(AOR, "j1", "ok"))
    assert r.hget(schema.device_key(AOR, "dead"), schema.DEVICE_DEAD_FIELD) == "1"
    assert float(r.hget(schema.device_key(AOR, "sus"), "quarantined_until")) > now
    assert "last_error" in r.hgetall(schema.app_status_key("fcm", "ghost-app"))
    assert r.hget(schema.METRICS_PUSHES_KEY, schema.metrics_push_field("fcm", "messageReceived", "delivered")) == "1"
    assert r.hget(schema.METRICS_LATENCY_KEY, "fcm|count") and r.hget(schema.METRICS_LATENCY_KEY, "fcm|sum")
    assert r.hget(schema.METRICS_EVENTS_KEY, "dead_tokens_removed") == "1"
    assert r.zcard(reregister.DUE_KEY) == 0 and not r.sismember(schema.devices_key(AOR), "expired")
    assert refusals(fresh) == []

    # what a short run may not reach: a parked call's state (alert repeats), the non-blocking read
    # of a backlog, the reclaim of idle entries, the touch of live ones, the APNs environment check
    ParkedCalls(sip.client).park(ParkedCall(AOR, "k1", "cid", "1 INVITE", "", "", now + 30, pushed=("ok",)), now)
    sip.enqueue(PushJob("j2", PushKind.MESSAGE, AOR, now + 60, data={"body": "hi"}, created_at=now))

    async def direct() -> list[tuple[str, str]]:
        store = AsyncStore(cfg.redis_url, cfg)
        try:
            assert await store.parked_device_state(AOR, "k1", "ok") == schema.PUSHED
            entries = await store.read_new_nowait("acl-b", 10)
            assert [f["job_id"] for _, f in entries] == ["j2"]
            await store.touch("acl-b", [entries[0][0]])
            _, claimed, _ = await store.reclaim("acl-c", 0, "0-0", 10)
            assert [eid for eid, _ in claimed] == [entries[0][0]]
            await store.finish([entries[0][0]])
            window = [schema.window_entry(now, True) for _ in range(6)]
            return await store.record_outcomes({("fcm", FCM_APP, "token_dead"): 6}, {("fcm", FCM_APP): window},
                                               [("fcm", FCM_APP)], now)
        finally:
            await store.aclose()

    assert asyncio.run(direct()) == [("fcm", FCM_APP)]
    sip.close()
    r.close()
    assert refusals(fresh) == []


# --------------------------------------------------------------------------- the operator CLI


def test_admin_cli_paths(fresh: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    """pushlib-admin as pn-admin: API keys, tenants, user uuids, subscribers and their voicemail URI, UA
    mappings, custom pushes (apps and devices: test_aliases_and_device_removal_work_for_each_user)."""
    admin = ["--redis-url", url_of(fresh, "pn-admin")]
    commands = [
        ["tenants", "create", "acme", "--name", "Acme"], ["tenants", "domain-add", "acme", "acme.example"],
        ["tenants", "app-add", "acme", "apns", "com.acme.phone"], ["tenants", "list"], ["tenants", "show", "acme"],
        ["keys", "create", "--scope", "admin", "--tenant", "acme"], ["keys", "list"],
        ["users", "map", "u-alice", "alice@acme.example"], ["users", "show", "u-alice"],
        ["subscriber", "set", "alice@acme.example", "--password", "pw"],
        ["subscriber", "voicemail", "alice@acme.example", "sip:vm@acme.example"],
        ["subscriber", "voicemail", "alice@acme.example"], ["subscriber", "voicemail", "alice@acme.example", "--clear"],
        ["uamap", "set", "m1", "Acme/.*"], ["uamap", "list"], ["uamap", "remove", "m1"],
        ["devices", "alice@acme.example"],
        ["push", "alice@acme.example", "--title", "t", "--body", "b"],
        ["users", "unmap", "u-alice"], ["subscriber", "remove", "alice@acme.example"],
        ["tenants", "app-remove", "acme", "apns", "com.acme.phone"],
        ["tenants", "domain-remove", "acme", "acme.example"],
    ]
    for argv in commands:
        assert main([*admin, *argv]) == 0, argv
    key_id = next(line.split()[0] for line in capsys.readouterr().out.splitlines() if "scopes=admin" in line)
    assert main([*admin, "keys", "revoke", key_id]) == 0
    assert main([*admin, "keys", "create", "--scope", "read", "--tenant", "acme"]) == 0
    assert main([*admin, "tenants", "delete", "acme"]) == 0
    assert "revoked its 1 keys" in capsys.readouterr().out
    assert refusals(fresh) == []


# --------------------------------------------------------------------------- the HTTP API


def apns_key_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def admin_token(server: RedisServer, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    assert main(["--redis-url", url_of(server, "pn-admin"), "keys", "create", "--scope", "admin", *extra]) == 0
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_api_paths(fresh: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    """pushlib-api as pn-api (the FastAPI app in-process): apps, users, notifications, voicemail,
    subscribers, devices, UA mappings, a tenant's app, /health and /metrics."""
    admin = ["--redis-url", url_of(fresh, "pn-admin")]
    for argv in (["tenants", "create", "acme"], ["tenants", "domain-add", "acme", "acme.example"]):
        assert main([*admin, *argv]) == 0
    operator = {"Authorization": f"Bearer {admin_token(fresh, capsys)}"}
    tenant = {"Authorization": f"Bearer {admin_token(fresh, capsys, '--tenant', 'acme')}"}
    sip = SyncStore(url_of(fresh, "pn-sip"), Settings())
    for name in ("d1", "d2"):
        sip.save_device(Device(AOR, name, PushParams(Provider.APNS, "com.example.phone", alert_token=name * 32),
                               registered_at=time.time(), expires_at=time.time() + 3600))
    sip.close()
    r = raw(fresh)
    r.xgroup_create("pn:jobs", "pn-dispatchers", id="0", mkstream=True)
    app_body = {"apns_token": {"key_pem": apns_key_pem(), "key_id": "KEY1234567", "team_id": "TEAM123456"}}

    app = create_app(Settings(redis_url=url_of(fresh, "pn-api")))

    async def calls() -> None:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://api") as c:
            async def ok(method: str, path: str, status: int = 200, headers: dict[str, str] = operator,
                         **kw: Any) -> httpx.Response:
                response = await c.request(method, path, headers=headers, **kw)
                assert response.status_code == status, (method, path, response.text)
                return response

            await ok("PUT", "/1.0/apps/apns/com.example.phone", json=app_body)
            await ok("GET", "/1.0/apps")
            await ok("GET", "/1.0/apps/apns/com.example.phone")
            await ok("PATCH", "/1.0/apps/apns/com.example.phone", json={"enabled": False})
            await ok("PATCH", "/1.0/apps/apns/com.example.phone", json={"enabled": True})
            await ok("PUT", "/1.0/users/u-alice", json={"aor": "alice@example.com"})
            await ok("GET", "/1.0/users/u-alice")
            await ok("POST", "/1.0/mobile/notifications", 204, json={
                "notification_type": "planned_maintenance", "user_uuid": "u-alice", "title": "t", "body": "b"})
            voicemail = await ok("POST", "/1.0/users/u-alice/voicemail", json={"new_messages": 1})
            assert voicemail.json()["pushed"] is True
            await ok("PUT", "/1.0/subscribers/alice@example.com", 204, json={"password": "pw"})
            await ok("PUT", "/1.0/subscribers/alice@example.com/voicemail", 204, json={"uri": "sip:vm@example.com"})
            subscriber = await ok("GET", "/1.0/subscribers/u-alice")
            assert subscriber.json()["voicemail_uri"] == "sip:vm@example.com"
            await ok("DELETE", "/1.0/subscribers/alice@example.com/voicemail", 204)
            await ok("DELETE", "/1.0/subscribers/alice@example.com", 204)
            assert len((await ok("GET", "/1.0/users/u-alice/devices")).json()["devices"]) == 2
            await ok("DELETE", "/1.0/users/u-alice/devices/d1", 204)
            assert (await ok("DELETE", "/1.0/users/u-alice/devices")).json()["removed"] == ["d2"]
            await ok("PUT", "/1.0/uamaps/m1", json={"regex": "Acme/.*", "app_param": "a", "type_param": "t",
                                                    "token_param": "k"})
            await ok("GET", "/1.0/uamaps")
            await ok("DELETE", "/1.0/uamaps/m1", 204)
            await ok("PUT", "/1.0/apps/apns/com.acme.phone", headers=tenant, json=app_body)  # the tenant's now
            await ok("GET", "/1.0/apps", headers=tenant)
            await ok("DELETE", "/1.0/apps/apns/com.acme.phone", 204, headers=tenant)
            assert (await ok("GET", "/health", 503)).json()["redis"] is True  # no dispatcher in this test
            assert b"pushlib_" in (await ok("GET", "/metrics")).content
            await ok("DELETE", "/1.0/apps/apns/com.example.phone", 204)
            await ok("DELETE", "/1.0/users/u-alice", 204)

    asyncio.run(calls())
    assert r.xlen("pn:jobs") == 2
    r.close()
    assert refusals(fresh) == []


# --------------------------------------------------------------------------- refused outside the job

A = "pn:{sip:alice@example.com}"
REFUSED = [
    # the SIP workers: no credentials, no stream reads, no HA1 writes, no API or metrics records
    ("pn-sip", "HGETALL", "pn:app:fcm:example-phone"),
    ("pn-sip", "XREADGROUP", "GROUP", "pn-dispatchers", "x", "STREAMS", "pn:jobs", ">"),
    ("pn-sip", "XRANGE", "pn:jobs", "-", "+"),
    ("pn-sip", "HSET", "pn:sub:alice@example.com", "ha1", "0" * 32),
    ("pn-sip", "HSET", "pn:apps", "fcm:forged", "enabled"),
    ("pn-sip", "HGETALL", "pn:{apikeys}:key:k1"),
    ("pn-sip", "GET", "pn:user:u-alice"),
    ("pn-sip", "ZRANGEBYSCORE", "pn:rereg", "-inf", "+inf"),
    ("pn-sip", "HINCRBY", "pn:{metrics}:pushes", "x", "1"),
    ("pn-sip", "KEYS", "*"),
    # the dispatcher: no jobs queued, no HA1s, no calls written, no devices deleted, no due set filled
    ("pn-dispatch", "XADD", "pn:jobs", "*", "job_id", "forged"),
    ("pn-dispatch", "HSET", "pn:sub:alice@example.com", "ha1", "0" * 32),
    ("pn-dispatch", "HGET", "pn:sub:alice@example.com", "ha1"),
    ("pn-dispatch", "HSET", f"{A}:call:k1", "deadline", "1"),
    ("pn-dispatch", "DEL", f"{A}:dev:d1"),
    ("pn-dispatch", "ZADD", "pn:rereg", "1", "m"),
    ("pn-dispatch", "HSET", "pn:app:fcm:example-phone", "fcm_service_account", "{}"),
    ("pn-dispatch", "XRANGE", f"{A}:msgs", "-", "+"),
    ("pn-dispatch", "GET", "pn:user:u-alice"),
    ("pn-dispatch", "HGETALL", "pn:{apikeys}:key:k1"),
    # the API: no stream consumption, no API keys minted, no tokens written, no domain taken
    ("pn-api", "XREADGROUP", "GROUP", "pn-dispatchers", "x", "STREAMS", "pn:jobs", ">"),
    ("pn-api", "XACK", "pn:jobs", "pn-dispatchers", "1-1"),
    ("pn-api", "HSET", "pn:{apikeys}:key:k1", "secret_sha256", "0" * 64),
    ("pn-api", "SADD", "pn:{apikeys}:ids", "k1"),
    ("pn-api", "HSET", f"{A}:dev:d1", "alert_token", "forged"),
    ("pn-api", "HSET", "pn:{tenants}:domains", "example.com", "acme"),
    ("pn-api", "GET", "pn:rrsecret"),
    ("pn-api", "HINCRBY", "pn:{metrics}:pushes", "x", "1"),
    ("pn-api", "ZADD", "pn:rereg", "1", "m"),
    ("pn-api", "HGETALL", f"{A}:call:k1"),
    ("pn-api", "CLIENT", "KILL", "USER", "pn-sip"),
    ("pn-api", "CONFIG", "GET", "*"),
    # the operator: no stream consumption, no tokens written, no route key, no metrics
    ("pn-admin", "XREADGROUP", "GROUP", "pn-dispatchers", "x", "STREAMS", "pn:jobs", ">"),
    ("pn-admin", "HSET", f"{A}:dev:d1", "alert_token", "forged"),
    ("pn-admin", "GET", "pn:rrsecret"),
    ("pn-admin", "HINCRBY", "pn:{metrics}:pushes", "x", "1"),
    ("pn-admin", "HSET", f"{A}:call:k1", "deadline", "1"),
]


@pytest.mark.parametrize("user,command", [(u, c) for u, *c in REFUSED], ids=[f"{u}-{c}" for u, c, *_ in REFUSED])
def test_each_user_is_refused_outside_its_job(acl_server: RedisServer, user: str, command: list[str]) -> None:
    client = raw(acl_server, user)
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)
    finally:
        client.close()
