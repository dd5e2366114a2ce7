"""The README's Redis ACL lines against a real redis-server: each component's user can do what the
app-alias and device-removal code asks of it, and no more than the README says."""

from __future__ import annotations

import asyncio
import re
import shlex
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from pushlib import schema
from pushlib.astore import AsyncStore
from pushlib.cli import main
from pushlib.credentials import route_secret
from pushlib.models import AppCredentials, Device, Provider, PushParams
from pushlib.settings import Settings
from pushlib.store import SyncStore
from tests.support import ROOT, RedisServer, redis_server

USERS = ("pn-sip", "pn-dispatch", "pn-admin")


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


def url_of(server: RedisServer, user: str) -> str:
    return f"redis://{user}:pw-{user}@127.0.0.1:{server.port}/0"


def raw(server: RedisServer, user: str | None = None) -> Any:
    url = server.url if user is None else url_of(server, user)
    return redis.Redis.from_url(url, decode_responses=True)


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
