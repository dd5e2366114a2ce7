"""The Redis URL is a secret: it comes from the environment or a file, is never shown with its
password, and a rediss:// URL always verifies the server (certificate and host name)."""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path
from typing import Any

import pytest
import redis

from pushlib import cli, dispatcher
from pushlib.astore import AsyncStore
from pushlib.settings import Settings, SettingsError, read_redis_url_file, redis_connection_options
from pushlib.store import SyncStore

TLS_URL = "rediss://pn-dispatch:s3cret@redis.example.net:6380/0"


def test_redis_url_from_a_file_is_stripped(tmp_path: Path) -> None:
    path = tmp_path / "redis-url"
    path.write_text(f"  {TLS_URL}\n")
    settings = Settings.from_env({"PUSHLIB_REDIS_URL_FILE": str(path), "PUSHLIB_CONCURRENCY": "8"})
    assert settings.redis_url == TLS_URL and settings.concurrency == 8
    assert Settings.from_env({"PUSHLIB_REDIS_URL": "redis://h:1/0"}).redis_url == "redis://h:1/0"


def test_redis_url_file_and_variable_together_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "redis-url"
    path.write_text(TLS_URL)
    with pytest.raises(SettingsError, match="not both"):
        Settings.from_env({"PUSHLIB_REDIS_URL_FILE": str(path), "PUSHLIB_REDIS_URL": "redis://h/0"})


def test_unreadable_redis_url_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(SettingsError, match=r"cannot read the Redis URL file .*nope: No such file"):
        Settings.from_env({"PUSHLIB_REDIS_URL_FILE": str(missing)})
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked"
        locked.write_text(TLS_URL)
        locked.chmod(0)
        with pytest.raises(SettingsError, match="Permission denied"):
            read_redis_url_file(locked)
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(SettingsError, match="is empty"):
        read_redis_url_file(tmp_path / "empty")


def test_a_file_holding_something_else_is_refused_without_echoing_it(tmp_path: Path) -> None:
    path = tmp_path / "redis-url"
    path.write_text("s3cret-password-only\n")
    with pytest.raises(SettingsError) as err:
        read_redis_url_file(path)
    assert "s3cret" not in str(err.value) and "does not hold" in str(err.value)


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "soon"])
def test_non_finite_float_settings_are_refused(raw: str) -> None:
    with pytest.raises(SettingsError, match="PUSHLIB_WAIT_WINDOW"):
        Settings.from_env({"PUSHLIB_WAIT_WINDOW": raw})


def test_rediss_options_ask_for_certificate_and_host_name_checks() -> None:
    assert redis_connection_options(TLS_URL) == {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
    assert redis_connection_options("redis://h:6379/0") == {}
    assert redis_connection_options(TLS_URL + "?ssl_ca_certs=/etc/pn/ca.pem&ssl_cert_reqs=required") != {}


@pytest.mark.parametrize("query", ["ssl_cert_reqs=none", "ssl_cert_reqs=optional", "ssl_check_hostname=false"])
def test_rediss_url_turning_verification_off_is_refused(query: str) -> None:
    with pytest.raises(SettingsError, match="skip verifying") as err:
        SyncStore(f"{TLS_URL}?{query}", Settings())
    assert "s3cret" not in str(err.value)


def _assert_verifying_pool(pool: Any) -> None:
    assert pool.connection_kwargs["ssl_cert_reqs"] == "required"
    assert pool.connection_kwargs["ssl_check_hostname"] is True


def test_sync_store_client_for_rediss_verifies_the_server() -> None:
    store = SyncStore(TLS_URL, Settings())
    pool = store.client.connection_pool
    assert pool.connection_class is redis.SSLConnection
    _assert_verifying_pool(pool)
    conn = pool.make_connection()  # built, not connected
    assert conn.cert_reqs == ssl.CERT_REQUIRED and conn.check_hostname is True
    store.close()


def test_async_store_client_for_rediss_verifies_the_server() -> None:
    async def scenario() -> None:
        store = AsyncStore(TLS_URL, Settings())
        pool = store._r.connection_pool
        _assert_verifying_pool(pool)
        conn = pool.make_connection()
        assert conn.ssl_context.cert_reqs == ssl.CERT_REQUIRED and conn.ssl_context.check_hostname is True
        await store.aclose()

    asyncio.run(scenario())


def test_every_cli_client_for_rediss_verifies_the_server(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    built: list[tuple[str, dict[str, Any]]] = []
    real = redis.Redis.from_url

    def recording(url: str, **kwargs: Any) -> Any:
        built.append((url, kwargs))
        return real(url, **kwargs)

    monkeypatch.setattr(redis.Redis, "from_url", recording)
    monkeypatch.delenv("PUSHLIB_REDIS_URL_FILE", raising=False)
    url = "rediss://pn-admin:s3cret@127.0.0.1:1/0"  # nothing listens: the command fails fast
    assert cli.main(["--redis-url", url, "subscriber", "remove", "bob@example.com"]) == 1
    err = capsys.readouterr().err
    assert len(built) == 2  # the store's client and the subscribers' client
    for got_url, kwargs in built:
        assert got_url == url
        assert kwargs["ssl_cert_reqs"] == "required" and kwargs["ssl_check_hostname"] is True
    assert "s3cret" not in err and "pn-admin:***@127.0.0.1:1" in err


def test_dispatcher_reads_its_redis_url_from_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    seen: list[Settings] = []

    async def fake_serve(settings: Settings, consumer: str | None) -> None:
        seen.append(settings)

    monkeypatch.setattr(dispatcher, "_serve", fake_serve)
    monkeypatch.delenv("PUSHLIB_REDIS_URL_FILE", raising=False)
    monkeypatch.delenv("PUSHLIB_REDIS_URL", raising=False)
    path = tmp_path / "url"
    path.write_text(TLS_URL + "\n")
    dispatcher.main(["--redis-url-file", str(path), "--log-level", "WARNING"])
    assert seen[0].redis_url == TLS_URL

    with pytest.raises(SystemExit) as stop:
        dispatcher.main(["--redis-url-file", str(tmp_path / "missing")])
    assert stop.value.code == 2
    assert "cannot read the Redis URL file" in capsys.readouterr().err

    with pytest.raises(SystemExit):  # one or the other
        dispatcher.main(["--redis-url-file", str(path), "--redis-url", "redis://h/0"])


def test_url_flags_say_how_to_keep_the_password_out_of_ps() -> None:
    assert "--redis-url-file" in cli.build_parser().format_help()
    assert "ps" in dispatcher.REDIS_URL_HELP and "ps" in dispatcher.REDIS_URL_FILE_HELP


def test_an_unparsable_url_is_refused_without_quoting_the_password(capsys) -> None:
    url = "redis://pn-admin:pa/s3cret@127.0.0.1:6379/0"  # an unencoded `/` ends the authority early
    with pytest.raises(SettingsError) as err:
        SyncStore(url, Settings())
    assert "s3cret" not in str(err.value) and "percent-encoded" in str(err.value)
    assert cli.main(["--redis-url", url, "uamap", "list"]) == 2
    assert "s3cret" not in capsys.readouterr().err
