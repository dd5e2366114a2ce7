"""pushlib-admin against a real redis-server: credentials validated, stored, never printed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pushlib.cli import main
from pushlib.models import Device, Provider, PushParams
from pushlib.settings import Settings
from pushlib.store import SyncStore


def _pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def test_set_apns_key_stores_it_and_never_prints_it(redis_url: str, tmp_path: Path, capsys) -> None:
    key = _pem(ec.generate_private_key(ec.SECP256R1()))
    (tmp_path / "k.p8").write_text(key)
    rc = main(["--redis-url", redis_url, "app", "set-apns", "com.example.app",
               "--key-file", str(tmp_path / "k.p8"), "--key-id", "ABC123DEFG", "--team-id", "TEAM000001"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "apns:com.example.app" in out and "key_id=ABC123DEFG" in out
    assert "PRIVATE KEY" not in out
    app = SyncStore(redis_url, Settings()).app("apns", "com.example.app")
    assert app is not None and app.apns_key_pem == key and app.apns_team_id == "TEAM000001"

    assert main(["--redis-url", redis_url, "app", "disable", "apns", "com.example.app"]) == 0
    app = SyncStore(redis_url, Settings()).app("apns", "com.example.app")
    assert app is not None and not app.enabled


def test_rsa_key_is_refused_for_apns(redis_url: str, tmp_path: Path, capsys) -> None:
    (tmp_path / "k.p8").write_text(_pem(rsa.generate_private_key(65537, 2048)))
    rc = main(["--redis-url", redis_url, "app", "set-apns", "com.example.app",
               "--key-file", str(tmp_path / "k.p8"), "--key-id", "K", "--team-id", "T"])
    assert rc == 2
    assert "not an EC P-256 key" in capsys.readouterr().err
    assert SyncStore(redis_url, Settings()).app("apns", "com.example.app") is None


@pytest.mark.parametrize(
    "content, message",
    [("{not json", "not valid JSON"), (json.dumps({"project_id": "p"}), "lacks client_email")],
)
def test_bad_service_account_is_refused(redis_url: str, tmp_path: Path, capsys, content: str, message: str) -> None:
    (tmp_path / "sa.json").write_text(content)
    rc = main(["--redis-url", redis_url, "app", "set-fcm", "--service-account", str(tmp_path / "sa.json")])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_ca_file_requires_custom_host(redis_url: str, tmp_path: Path, capsys) -> None:
    (tmp_path / "sa.json").write_text(json.dumps(
        {"project_id": "p", "client_email": "e", "private_key": "k", "token_uri": "https://x/token"}))
    (tmp_path / "ca.pem").write_text("x")
    rc = main(["--redis-url", redis_url, "app", "set-fcm", "--service-account", str(tmp_path / "sa.json"),
               "--ca-file", str(tmp_path / "ca.pem")])
    assert rc == 2
    assert "only trusted for a custom --host" in capsys.readouterr().err


def test_uamap_roundtrip_and_bad_regex(redis_url: str, capsys) -> None:
    assert main(["--redis-url", redis_url, "uamap", "set", "acme", "^Acme/", "--token-param", "x-tok"]) == 0
    assert main(["--redis-url", redis_url, "uamap", "list"]) == 0
    assert "acme\t^Acme/\tapp=app-id type=pn-type token=x-tok" in capsys.readouterr().out
    assert main(["--redis-url", redis_url, "uamap", "set", "bad", "(unclosed"]) == 2
    assert "bad User-Agent regex" in capsys.readouterr().err
    assert main(["--redis-url", redis_url, "uamap", "remove", "acme"]) == 0
    assert SyncStore(redis_url, Settings()).ua_mappings() == []


def test_push_enqueues_a_custom_job_and_devices_lists(redis_url: str, capsys) -> None:
    store = SyncStore(redis_url, Settings())
    store.save_device(Device("sip:alice@example.com", "dev1", PushParams(Provider.FCM, "proj", alert_token="tok"),
                             registered_at=1e9, expires_at=4e9))
    # the operator's spelling (user@domain, any case of the domain) is the router's AOR
    assert main(["--redis-url", redis_url, "devices", "alice@Example.COM"]) == 0
    assert "dev1\tfcm\tproj\ttokens=alert" in capsys.readouterr().out
    assert main(["--redis-url", redis_url, "push", "alice@example.com", "--title", "Hi", "--body", "there",
                 "--data", "room=42"]) == 0
    assert "queued custom job" in capsys.readouterr().out
    entries = store._r.xrange(Settings().stream)
    assert len(entries) == 1
    fields = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
              for k, v in entries[0][1].items()}
    assert fields["kind"] == "custom" and fields["aor"] == "sip:alice@example.com"
    assert json.loads(fields["data"]) == {"room": "42", "title": "Hi", "body": "there"}


def test_redis_down_is_one_clear_line(capsys) -> None:
    rc = main(["--redis-url", "redis://127.0.0.1:1/0", "uamap", "list"])
    assert rc == 1
    assert "Redis unavailable" in capsys.readouterr().err


def test_subscriber_password_from_stdin_is_stored_as_ha1(redis_url: str, monkeypatch, capsys) -> None:
    import io

    import redis as redis_lib

    from pushlib.credentials import Subscribers, ha1
    from pushlib.schema import subscriber_key

    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret\n"))
    assert main(["--redis-url", redis_url, "subscriber", "set", "alice@example.com"]) == 0
    assert "saved credentials of alice@example.com" in capsys.readouterr().out
    client = redis_lib.Redis.from_url(redis_url, decode_responses=True)
    assert Subscribers(client).ha1("alice", "example.com") == ha1("alice", "example.com", "s3cret")
    assert "s3cret" not in str(client.hgetall(subscriber_key("alice", "example.com")))
    assert main(["--redis-url", redis_url, "subscriber", "remove", "alice@example.com"]) == 0
    assert Subscribers(client).ha1("alice", "example.com") is None
    assert main(["--redis-url", redis_url, "subscriber", "set", "no-domain"]) == 2


def test_redis_url_from_a_file_or_its_variable(redis_url: str, tmp_path: Path, monkeypatch, capsys) -> None:
    url_file = tmp_path / "redis-url"
    url_file.write_text(redis_url + "\n")
    monkeypatch.delenv("PUSHLIB_REDIS_URL", raising=False)
    assert main(["--redis-url-file", str(url_file), "uamap", "set", "acme", "^Acme/"]) == 0
    monkeypatch.setenv("PUSHLIB_REDIS_URL_FILE", str(url_file))
    assert main(["uamap", "list"]) == 0
    assert "acme\t^Acme/" in capsys.readouterr().out
    assert main(["--redis-url-file", str(tmp_path / "missing"), "uamap", "list"]) == 2
    assert "cannot read the Redis URL file" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one or the other, not both
        main(["--redis-url-file", str(url_file), "--redis-url", redis_url, "uamap", "list"])


def test_redis_down_message_never_shows_the_password(capsys) -> None:
    rc = main(["--redis-url", "redis://pn-admin:s3cret@127.0.0.1:1/0", "uamap", "list"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "Redis unavailable at redis://pn-admin:***@127.0.0.1:1/0" in err and "s3cret" not in err


def test_app_remove_takes_its_status_along(redis_url: str, tmp_path: Path, capsys) -> None:
    key = _pem(ec.generate_private_key(ec.SECP256R1()))
    (tmp_path / "k.p8").write_text(key)
    assert main(["--redis-url", redis_url, "app", "set-apns", "com.example.gone",
                 "--key-file", str(tmp_path / "k.p8"), "--key-id", "K", "--team-id", "T"]) == 0
    store = SyncStore(redis_url, Settings())
    store._r.hset("pn:appstatus:{apns:com.example.gone}", "last_error", "403")
    assert main(["--redis-url", redis_url, "app", "remove", "apns", "com.example.gone"]) == 0
    assert store._r.exists("pn:app:apns:com.example.gone", "pn:appstatus:{apns:com.example.gone}") == 0


def test_app_reindex_lists_apps_saved_before_the_index(redis_url: str, tmp_path: Path, capsys) -> None:
    (tmp_path / "k.p8").write_text(_pem(ec.generate_private_key(ec.SECP256R1())))
    assert main(["--redis-url", redis_url, "app", "set-apns", "com.example.old",
                 "--key-file", str(tmp_path / "k.p8"), "--key-id", "K", "--team-id", "T"]) == 0
    store = SyncStore(redis_url, Settings())
    store._r.delete("pn:apps")  # as an install from before the index
    assert store.app_enabled("apns", "com.example.old") is None
    capsys.readouterr()
    assert main(["--redis-url", redis_url, "app", "reindex"]) == 0
    assert "app index rebuilt:" in capsys.readouterr().out
    assert store.app_enabled("apns", "com.example.old") is True


def _service_account(tmp_path: Path, project: str) -> str:
    path = tmp_path / f"{project}.json"
    path.write_text(json.dumps({"project_id": project, "client_email": f"x@{project}.iam.gserviceaccount.com",
                                "private_key": "-----BEGIN PRIVATE KEY-----SECRET", "token_uri": "https://x/token"}))
    return str(path)


def test_fcm_app_aliases_are_set_listed_shown_and_removed(redis_url: str, tmp_path: Path, capsys) -> None:
    url = ["--redis-url", redis_url]
    sa = _service_account(tmp_path, "example-phone")
    assert main([*url, "app", "set-fcm", "--service-account", sa,
                 "--alias", "123456789012", "--alias", "com.example.phone"]) == 0
    out = capsys.readouterr().out
    assert "fcm:example-phone" in out and "aliases=123456789012,com.example.phone" in out and "SECRET" not in out
    store = SyncStore(redis_url, Settings())
    assert store.app_enabled("fcm", "123456789012") is True and store.app_enabled("fcm", "com.example.phone")

    assert main([*url, "app", "aliases", "fcm", "example-phone"]) == 0
    assert capsys.readouterr().out.splitlines() == ["123456789012", "com.example.phone"]
    assert main([*url, "app", "show", "fcm", "example-phone"]) == 0
    assert "aliases=123456789012,com.example.phone" in capsys.readouterr().out
    assert main([*url, "app", "show", "fcm", "123456789012"]) == 0
    assert capsys.readouterr().out.startswith("fcm:123456789012 is an alias of fcm:example-phone\n")

    # new credentials (a key rotation) keep the aliases; --alias replaces them
    assert main([*url, "app", "set-fcm", "--service-account", sa]) == 0
    app = store.app("fcm", "example-phone")
    assert app is not None and app.aliases == ("123456789012", "com.example.phone")

    assert main([*url, "app", "alias-remove", "fcm", "example-phone", "com.example.phone"]) == 0
    assert "removed alias com.example.phone of fcm:example-phone" in capsys.readouterr().out
    assert store.app_enabled("fcm", "com.example.phone") is None and store.app("fcm", "com.example.phone") is None
    assert main([*url, "app", "alias-remove", "fcm", "example-phone", "com.example.phone"]) == 1
    assert "has no alias com.example.phone" in capsys.readouterr().err
    assert main([*url, "app", "alias-add", "fcm", "example-phone", "210987654321", "123456789012"]) == 0
    app = store.app("fcm", "example-phone")
    assert app is not None and app.aliases == ("123456789012", "210987654321")

    # an alias is not an app: the app-wide commands want the app's own id
    for cmd in ("disable", "remove"):
        assert main([*url, "app", cmd, "fcm", "123456789012"]) == 1
        assert "fcm:123456789012 is an alias of fcm:example-phone" in capsys.readouterr().err
    assert main([*url, "app", "aliases", "fcm", "123456789012"]) == 1
    assert store.app_enabled("fcm", "123456789012") is True

    assert main([*url, "app", "disable", "fcm", "example-phone"]) == 0
    assert store.app_enabled("fcm", "123456789012") is False
    assert main([*url, "app", "remove", "fcm", "example-phone"]) == 0
    assert "and its aliases 123456789012, 210987654321" in capsys.readouterr().out
    assert store.app_enabled("fcm", "123456789012") is None and store.app("fcm", "123456789012") is None


def test_an_alias_naming_another_app_is_refused(redis_url: str, tmp_path: Path, capsys) -> None:
    url = ["--redis-url", redis_url]
    assert main([*url, "app", "set-fcm", "--service-account", _service_account(tmp_path, "example-phone"),
                 "--alias", "123456789012"]) == 0
    other = _service_account(tmp_path, "other-project")
    for alias, what in (("example-phone", "the id"), ("123456789012", "an alias")):
        assert main([*url, "app", "set-fcm", "--service-account", other, "--alias", alias]) == 1  # taken
        assert f"fcm:{alias} is already {what} of app fcm:example-phone" in capsys.readouterr().err
    assert SyncStore(redis_url, Settings()).app("fcm", "other-project") is None  # nothing stored
    assert main([*url, "app", "set-fcm", "--service-account", other, "--alias", "other-project"]) == 2  # invalid
    assert "cannot be the app's own id" in capsys.readouterr().err
    assert main([*url, "app", "set-fcm", "--service-account", other]) == 0
    assert main([*url, "app", "alias-add", "fcm", "other-project", "123456789012"]) == 1
    assert "fcm:123456789012 is already an alias of app fcm:example-phone" in capsys.readouterr().err


@pytest.mark.parametrize("alias", ["has space", "-leading-dash", "a,b", "x" * 200, ""])
def test_an_alias_no_device_could_send_is_refused(redis_url: str, tmp_path: Path, capsys, alias: str) -> None:
    assert main(["--redis-url", redis_url, "app", "set-fcm", "--service-account",
                 _service_account(tmp_path, "example-phone"), f"--alias={alias}"]) == 2
    assert "cannot be an FCM pn-param" in capsys.readouterr().err
    assert SyncStore(redis_url, Settings()).app("fcm", "example-phone") is None


def test_devices_remove_one_or_all(redis_url: str, capsys) -> None:
    url = ["--redis-url", redis_url]
    store = SyncStore(redis_url, Settings())
    aor = "sip:alice@example.com"
    for name in ("dev1", "dev2", "dev3"):
        store.save_device(Device(aor, name, PushParams(Provider.FCM, "proj", alert_token="tok-" + name),
                                 registered_at=1e9, expires_at=4e9))
    # the operator's spelling of the AOR is the router's
    assert main([*url, "devices", "remove", "sip:alice@Example.COM", "dev1"]) == 0
    assert "removed device dev1 of sip:alice@example.com" in capsys.readouterr().out
    assert [d.device_id for d in store.devices(aor)] == ["dev2", "dev3"]
    assert main([*url, "devices", "remove", "alice@example.com", "dev1"]) == 1
    assert "no device dev1 of sip:alice@example.com" in capsys.readouterr().err
    for bad in (["remove", "alice@example.com"], ["remove", "alice@example.com", "dev2", "--all"],
                ["alice@example.com", "--all"], ["alice@example.com", "dev2"]):
        assert main([*url, "devices", *bad]) == 2
        assert "want `devices" in capsys.readouterr().err
    assert main([*url, "devices", "remove", "no-domain", "dev2"]) == 2
    assert "want user@domain" in capsys.readouterr().err
    assert main([*url, "devices", "remove", "alice@example.com", "--all"]) == 0
    assert "removed 2 devices of sip:alice@example.com: dev2, dev3" in capsys.readouterr().out
    assert store.devices(aor) == [] and store.client.exists(f"pn:{{{aor}}}:devs") == 0
    assert main([*url, "devices", "remove", "alice@example.com", "--all"]) == 0
    assert "removed 0 devices" in capsys.readouterr().out
    assert main([*url, "devices", "alice@example.com"]) == 0
    assert capsys.readouterr().out == ""


def _leaf_commands() -> set[str]:
    """Every `pushlib-admin` command as "area cmd" (or "area" when it has no subcommands), from the parser."""
    import argparse

    from pushlib.cli import build_parser

    def subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        found = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        return dict(found[0].choices) if found else {}

    leaves = set()
    for area, area_parser in subparsers(build_parser()).items():
        cmds = subparsers(area_parser)
        leaves |= {f"{area} {cmd}" for cmd in cmds} if cmds else {area}
    return leaves


def test_every_command_answers_json_and_exits_0_1_or_2(redis_url: str, sbx, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Each command with `--json`: one JSON object on stdout (`ok`, and `error` when it fails); exit 0 when
    done, 1 when it failed (not found, taken, refused), 2 for an invalid argument value (nothing written)."""
    key = tmp_path / "k.p8"
    key.write_text(_pem(ec.generate_private_key(ec.SECP256R1())))
    cert_pem, cert_key_pem = sbx.control.apns_client_cert("com.example.cert")
    (tmp_path / "cert.pem").write_text(cert_pem)
    (tmp_path / "cert-key.pem").write_text(cert_key_pem)
    sa, other_sa = _service_account(tmp_path, "example-phone"), _service_account(tmp_path, "other-project")
    store = SyncStore(redis_url, Settings())
    store.save_app(sbx.control.fcm_app("check-project"))
    store.save_device(Device("sip:alice@example.com", "dev1", PushParams(Provider.FCM, "example-phone",
                                                                         alert_token="tok"),
                             registered_at=1e9, expires_at=4e9))
    store.close()
    apns = ["--key-file", str(key), "--key-id", "K1", "--team-id", "T1"]
    steps: list[tuple[str, int]] = [
        (f"app set-apns com.example.a {' '.join(apns)}", 0),
        (f"app set-apns com.example.b --key-file {tmp_path}/missing.p8 --key-id K --team-id T", 2),
        (f"app set-apns-cert com.example.cert --cert-file {tmp_path}/cert.pem --key-file {tmp_path}/cert-key.pem", 0),
        (f"app set-apns-cert com.example.x --cert-file {tmp_path}/cert-key.pem --key-file {tmp_path}/cert.pem", 2),
        (f"app set-fcm --service-account {sa} --alias 123456789012", 0),
        (f"app set-fcm --service-account {other_sa} --alias 123456789012", 1),  # another app's alias
        (f"app set-fcm --service-account {other_sa} --alias other-project", 2),  # its own id
        ("app reindex", 0),
        ("app show apns com.example.a", 0), ("app show apns com.example.none", 1),
        ("app disable apns com.example.a", 0), ("app disable apns com.example.none", 1),
        ("app disable fcm 123456789012", 1),  # an alias, not an app
        ("app enable apns com.example.a", 0), ("app enable apns com.example.none", 1),
        ("app check fcm check-project", 0), ("app check apns com.example.none", 1),
        ("app aliases fcm example-phone", 0), ("app aliases fcm no-project", 1),
        ("app alias-add fcm example-phone 210987654321", 0), ("app alias-add fcm no-project 4242", 1),
        ("app alias-add fcm example-phone a,b", 2), ("app alias-add fcm check-project 210987654321", 1),
        ("app alias-remove fcm example-phone 210987654321", 0), ("app alias-remove fcm example-phone 210987654321", 1),
        ("app remove apns com.example.cert", 0), ("app remove apns com.example.cert", 1),
        ("uamap set acme ^Acme/", 0), ("uamap set bad (unclosed", 2), ("uamap list", 0),
        ("uamap remove acme", 0), ("uamap remove acme", 1),
        ("subscriber set alice@example.com --password pw", 0), ("subscriber set no-domain --password pw", 2),
        ("subscriber voicemail alice@example.com sip:vm@example.com", 0),
        ("subscriber voicemail alice@example.com tel:+1234", 2), ("subscriber voicemail alice@example.com", 0),
        ("subscriber remove alice@example.com", 0), ("subscriber remove no-domain", 2),
        ("devices alice@example.com", 0), ("devices no-domain", 2), ("devices alice@example.com dev1", 2),
        ("devices remove alice@example.com nodev", 1), ("devices remove alice@example.com dev1", 0),
        ("push alice@example.com --title hi", 0), ("push alice@example.com --data novalue", 2),
        ("tenants create acme", 0), ("tenants create acme", 1), ("tenants create Not_An_Id!", 2),
        ("tenants list", 0), ("tenants show acme", 0), ("tenants show nobody", 1), ("tenants show Acme", 2),
        ("tenants domain-add acme acme.example", 0), ("tenants domain-add nobody other.example", 1),
        ("tenants domain-add acme bad!domain", 2),
        ("tenants domain-remove acme acme.example", 0), ("tenants domain-remove acme acme.example", 1),
        ("tenants app-add acme apns com.example.a", 0), ("tenants app-add nobody apns com.example.a", 1),
        ("tenants app-remove acme apns com.example.a", 0), ("tenants app-remove acme apns com.example.a", 1),
        ("keys create --scope read --tenant acme", 0), ("keys create --scope read --tenant nobody", 1),
        ("keys list", 0), ("keys revoke KEY_ID", 0), ("keys revoke KEY_ID", 1),
        ("tenants delete acme", 0), ("tenants delete acme", 1),
        ("users map u-1 alice@example.com", 0), ("users map u-1 no-domain", 2), ("users map u/1 a@example.com", 2),
        ("users show u-1", 0), ("users show u-2", 1), ("users unmap u-1", 0), ("users unmap u-1", 1),
    ]
    capsys.readouterr()
    done: dict[str, set[int]] = {}
    key_id = ""
    for line, expected in steps:
        argv = line.replace("KEY_ID", key_id).split(" ")
        rc = main(["--redis-url", redis_url, "--json", *argv])
        out, err = capsys.readouterr()
        assert rc == expected, (line, out, err)
        doc = json.loads(out)  # one JSON object, nothing else
        assert isinstance(doc, dict) and doc["ok"] is (rc == 0), (line, doc)
        assert ("error" in doc) is (rc != 0) and (not err) is (rc == 0), (line, doc, err)
        if argv[:2] == ["keys", "create"] and rc == 0:
            key_id = doc["key"]["key_id"]
        name = " ".join(argv[:1] if argv[0] in ("devices", "push") else argv[:2])
        done.setdefault(name, set()).add(rc)
    assert set(done) == _leaf_commands(), "commands without a step here: add them"
    assert all(0 in codes for codes in done.values()), done
