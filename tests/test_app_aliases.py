"""App aliases (FCM apps as devices name them): one name, one app; the index the SIP workers read
and the copies the dispatcher reads follow every save, enable, disable, removal and reindex."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

import pytest
import redis

from pushlib import schema
from pushlib.astore import AsyncStore
from pushlib.models import AppCredentials, Provider
from pushlib.settings import Settings
from pushlib.store import AppNameConflict, SyncStore

SECRET = '{"private_key": "-----BEGIN PRIVATE KEY-----SECRETSECRET-----END PRIVATE KEY-----"}'
PROJECT = "example-phone"
SENDER = "123456789012"
PACKAGE = "com.example.phone"


def fcm_app(project: str = PROJECT, *aliases: str, **kw: Any) -> AppCredentials:
    return AppCredentials(Provider.FCM, project, fcm_service_account=SECRET, aliases=aliases, **kw)


def raw_client(url: str) -> Any:
    return redis.Redis.from_url(url, decode_responses=True)


@pytest.fixture()
def store(redis_url: str) -> Any:
    s = SyncStore(redis_url, Settings())
    yield s
    s.close()


def async_app(url: str, provider: str, name: str) -> AppCredentials | None:
    async def read() -> AppCredentials | None:
        astore = AsyncStore(url, Settings())
        try:
            return await astore.app(provider, name)
        finally:
            await astore.aclose()

    return asyncio.run(read())


def resolves(store: SyncStore, url: str, name: str) -> str | None:
    """The app id `name` resolves to for the dispatcher (None: nothing), checked against what the
    SIP workers' index says (a name is in the index exactly when it resolves)."""
    app = async_app(url, "fcm", name)
    assert (store.app_enabled("fcm", name) is None) == (app is None), name
    return None if app is None else app.app_id


# --- encoding -----------------------------------------------------------------------------------


def test_aliases_round_trip_and_show_in_the_description() -> None:
    app = fcm_app(PROJECT, SENDER, PACKAGE)
    encoded = schema.encode_app(app)
    assert encoded["aliases"] == f"{SENDER},{PACKAGE}"
    assert schema.decode_app(encoded) == app
    assert "aliases" not in schema.encode_app(fcm_app())
    assert schema.decode_app(schema.encode_app(fcm_app())).aliases == ()
    copy = schema.encode_app_alias(app, SENDER)
    assert copy[schema.APP_ALIAS_FIELD] == SENDER and copy["app_id"] == PROJECT
    assert schema.decode_app(copy) == app  # an alias's copy decodes to its app
    described = schema.describe_app(app)
    assert described.endswith(f"aliases={SENDER},{PACKAGE}") and "SECRET" not in described
    for bad in ("", "a,b", "a b", "a\tb", "a\x00b"):
        with pytest.raises(ValueError):
            schema.encode_app(fcm_app(PROJECT, bad))


def test_alias_key_layout_is_pinned() -> None:
    assert schema.app_key("fcm", SENDER) == "pn:app:fcm:123456789012"
    assert schema.app_index_field("fcm", SENDER) == "fcm:123456789012"
    assert schema.APP_ALIAS_FIELD == "alias"


# --- resolution ---------------------------------------------------------------------------------


def test_an_alias_resolves_to_its_app_for_both_sides(store: SyncStore, redis_url: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    app = fcm_app(PROJECT, SENDER, PACKAGE)
    store.save_app(app)
    for name in (PROJECT, SENDER, PACKAGE):
        assert store.app_enabled("fcm", name) is True
        assert store.app("fcm", name) == app
        assert async_app(redis_url, "fcm", name) == app  # app_id: the project, whatever the name
    assert store.app_enabled("fcm", "210987654321") is None and store.app("fcm", "210987654321") is None
    assert store.app_enabled("apns", SENDER) is None  # names are per provider
    index = raw_client(redis_url).hgetall(schema.APP_INDEX_KEY)
    assert index == {f"fcm:{n}": "enabled" for n in (PROJECT, SENDER, PACKAGE)}
    assert "SECRETSECRET" not in caplog.text


def test_the_dispatcher_resolves_an_alias_with_one_read(store: SyncStore, redis_url: str) -> None:
    store.save_app(fcm_app(PROJECT, SENDER))
    r = raw_client(redis_url)

    async def read() -> AppCredentials | None:
        astore = AsyncStore(redis_url, Settings())
        try:
            await astore._r.ping()  # connect (handshake commands) before counting
            r.config_resetstat()
            return await astore.app("fcm", SENDER)
        finally:
            await astore.aclose()

    app = asyncio.run(read())
    assert app is not None and app.app_id == PROJECT
    stats = r.info("commandstats")
    data_commands = {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()
                     if k.removeprefix("cmdstat_") not in ("info", "config|resetstat", "ping")}
    assert data_commands == {"hgetall": 1}


def test_enable_disable_apply_to_every_name(store: SyncStore, redis_url: str) -> None:
    app = fcm_app(PROJECT, SENDER)
    store.save_app(app)
    store.save_app(replace(app, enabled=False))
    assert store.app_enabled("fcm", PROJECT) is False and store.app_enabled("fcm", SENDER) is False
    got = async_app(redis_url, "fcm", SENDER)
    assert got is not None and got.enabled is False  # the dispatcher's copy follows too
    store.save_app(app)
    assert store.app_enabled("fcm", SENDER) is True
    got = async_app(redis_url, "fcm", SENDER)
    assert got is not None and got.enabled is True


def test_a_dropped_alias_stops_resolving(store: SyncStore, redis_url: str) -> None:
    store.save_app(fcm_app(PROJECT, SENDER, PACKAGE))
    store.save_app(fcm_app(PROJECT, PACKAGE, "210987654321"))  # re-saved without SENDER
    assert resolves(store, redis_url, SENDER) is None
    assert resolves(store, redis_url, PACKAGE) == PROJECT
    assert resolves(store, redis_url, "210987654321") == PROJECT
    assert not raw_client(redis_url).exists(schema.app_key("fcm", SENDER))

    assert store.remove_app_alias("fcm", PROJECT, PACKAGE) is True
    assert store.remove_app_alias("fcm", PROJECT, PACKAGE) is False
    assert resolves(store, redis_url, PACKAGE) is None
    assert resolves(store, redis_url, PROJECT) == PROJECT
    app = store.app("fcm", PROJECT)
    assert app is not None and app.aliases == ("210987654321",)


def test_aliases_are_added_and_status_kept(store: SyncStore, redis_url: str) -> None:
    store.save_app(fcm_app(PROJECT, SENDER))
    raw_client(redis_url).hset(schema.app_status_key("fcm", PROJECT), "last_error", "403")
    saved = store.add_app_aliases("fcm", PROJECT, [SENDER, PACKAGE, PACKAGE])
    assert saved.aliases == (SENDER, PACKAGE) and store.app("fcm", PROJECT) == saved
    assert resolves(store, redis_url, PACKAGE) == PROJECT
    assert store.app_status("fcm", PROJECT)["last_error"] == "403"  # editing aliases fixes nothing
    with pytest.raises(LookupError, match="alias of fcm:example-phone"):
        store.add_app_aliases("fcm", SENDER, ["x1"])
    with pytest.raises(LookupError):
        store.remove_app_alias("fcm", "no-such-project", SENDER)


@pytest.mark.parametrize(
    ("second", "taken"),
    [
        (fcm_app("other-project", PROJECT), PROJECT),  # an alias that is another app's id
        (fcm_app("other-project", "999", SENDER), SENDER),  # ... or another app's alias
        (fcm_app(SENDER), SENDER),  # an app whose id is another app's alias
    ],
    ids=["alias-is-an-app-id", "alias-is-an-alias", "app-id-is-an-alias"],
)
def test_a_name_belongs_to_one_app(store: SyncStore, redis_url: str, second: AppCredentials, taken: str) -> None:
    store.save_app(fcm_app(PROJECT, SENDER))
    before = {k: raw_client(redis_url).hgetall(k) for k in raw_client(redis_url).keys("pn:app*")}
    with pytest.raises(AppNameConflict, match=f"fcm:{taken} is already") as err:
        store.save_app(second)
    assert err.value.owner == PROJECT
    after = {k: raw_client(redis_url).hgetall(k) for k in raw_client(redis_url).keys("pn:app*")}
    assert after == before  # nothing written
    assert resolves(store, redis_url, taken) == PROJECT


def test_the_same_alias_for_another_provider_is_no_conflict(store: SyncStore, redis_url: str) -> None:
    store.save_app(AppCredentials(Provider.APNS, PACKAGE, apns_key_pem="k", apns_key_id="K", apns_team_id="T"))
    store.save_app(fcm_app(PROJECT, PACKAGE))
    assert store.app_enabled("apns", PACKAGE) is True and resolves(store, redis_url, PACKAGE) == PROJECT
    apns = store.app("apns", PACKAGE)
    assert apns is not None and apns.provider is Provider.APNS


@pytest.mark.parametrize("aliases", [(PROJECT,), (SENDER, SENDER)], ids=["own-id", "twice"])
def test_an_alias_that_cannot_be_is_refused(store: SyncStore, redis_url: str, aliases: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        store.save_app(fcm_app(PROJECT, *aliases))
    assert raw_client(redis_url).keys("pn:app*") == []


def test_removing_the_app_removes_its_aliases(store: SyncStore, redis_url: str) -> None:
    store.save_app(fcm_app(PROJECT, SENDER, PACKAGE))
    assert store.remove_app("fcm", SENDER) is False  # an alias is not an app: nothing changes
    assert resolves(store, redis_url, SENDER) == PROJECT
    assert store.remove_app("fcm", PROJECT) is True
    for name in (PROJECT, SENDER, PACKAGE):
        assert resolves(store, redis_url, name) is None
    assert raw_client(redis_url).keys("pn:app*") == []
    # its names are free again
    store.save_app(fcm_app("other-project", SENDER))
    assert resolves(store, redis_url, SENDER) == "other-project"


def test_reindex_restores_alias_entries_and_drops_orphans(store: SyncStore, redis_url: str) -> None:
    r = raw_client(redis_url)
    store.save_app(fcm_app(PROJECT, SENDER, PACKAGE))
    store.save_app(fcm_app("other-project", "555"))
    # an install from before the index, a lost copy, an alias its app no longer lists, and the
    # copy of an app that is gone (interrupted saves and removals)
    r.delete(schema.APP_INDEX_KEY, schema.app_key("fcm", PACKAGE))
    r.hset(schema.app_key("fcm", PROJECT), "aliases", PACKAGE)
    r.delete(schema.app_key("fcm", "other-project"))
    assert store.reindex_apps() == 1
    assert resolves(store, redis_url, PROJECT) == PROJECT
    assert resolves(store, redis_url, PACKAGE) == PROJECT
    assert resolves(store, redis_url, SENDER) is None
    assert resolves(store, redis_url, "555") is None
    assert sorted(r.keys("pn:app:*")) == [schema.app_key("fcm", PACKAGE), schema.app_key("fcm", PROJECT)]
    assert r.hgetall(schema.APP_INDEX_KEY) == {f"fcm:{PROJECT}": "enabled", f"fcm:{PACKAGE}": "enabled"}


def test_reindex_leaves_out_an_alias_that_names_another_app(
    store: SyncStore, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    r = raw_client(redis_url)
    store.save_app(fcm_app(PROJECT))
    store.save_app(fcm_app("other-project"))
    r.hset(schema.app_key("fcm", "other-project"), "aliases", PROJECT)  # written behind the store's back
    assert store.reindex_apps() == 2
    assert "alias example-phone of fcm:other-project already names fcm:example-phone" in caplog.text
    assert resolves(store, redis_url, PROJECT) == PROJECT
    assert resolves(store, redis_url, "other-project") == "other-project"


def test_reindex_keeps_the_copies_of_an_app_whose_record_is_corrupt(store: SyncStore, redis_url: str) -> None:
    r = raw_client(redis_url)
    store.save_app(fcm_app(PROJECT, SENDER))
    r.hdel(schema.app_key("fcm", PROJECT), "provider")  # no longer decodes
    assert store.reindex_apps() == 0
    assert r.exists(schema.app_key("fcm", SENDER))  # its devices are still served
    got = async_app(redis_url, "fcm", SENDER)
    assert got is not None and got.app_id == PROJECT
