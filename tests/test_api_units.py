"""Pure parts of the API and the new CLI commands: key tokens and hashing, scopes, tenant
visibility, notification rules, the app-check verdict, health assessment, credential views, and
`pushlib-admin keys/tenants/users/app check` with `--json` and exit codes against a real Redis."""

from __future__ import annotations

import json
import time

import pytest

from pushlib.api.health import assess, reading_clients
from pushlib.apikeys import Principal, Scope, bearer_token, new_token, parse_token, secret_hash, verify
from pushlib.appcheck import verdict
from pushlib.appcreds import CredentialsError, check_apns_key, credentials_view
from pushlib.cli import main
from pushlib.models import AppCredentials, Outcome, Provider, PushResult
from pushlib.notify import Notification, NotificationError, check_notification, custom_job
from pushlib.settings import Settings
from pushlib.tenants import visible
from tests.support import android, fcm_token


def test_tokens_are_random_parse_back_and_only_their_hash_verifies() -> None:
    token, key_id, digest = new_token()
    parsed = parse_token(token)
    assert parsed is not None and parsed[0] == key_id and digest == secret_hash(parsed[1])
    assert verify(digest, parsed[1]) and not verify(digest, parsed[1][:-1] + "x")
    assert parse_token(token + "x") is None and parse_token("pnk_abc") is None
    assert new_token()[0] != token
    assert bearer_token(f"Bearer {token}") == token and bearer_token(f"basic {token}") is None


def test_admin_implies_every_scope_and_tenants_see_only_their_own() -> None:
    admin, sender = Principal("a", frozenset({Scope.ADMIN})), Principal("s", frozenset({Scope.SEND}), "red")
    assert all(admin.allows(s) for s in Scope)
    assert sender.allows(Scope.SEND) and not sender.allows(Scope.READ)
    assert visible(admin, "red") and visible(admin, None)
    assert visible(sender, "red") and not visible(sender, "blue") and not visible(sender, None)


@pytest.mark.parametrize("n, code", [
    (Notification("incoming_call", "t", "b", {}), "reserved_notification_type"),
    (Notification("cancelincomingcall", "t", "b", {}), "reserved_notification_type"),
    (Notification("ok", "t", "b", {"google.x": "1"}), "extra_reserved_name"),
    (Notification("ok", "t", "b", {"notification_type": "1"}), "extra_reserved_name"),
    (Notification("ok", "t", "b", {"bad key": "1"}), "extra_bad_name"),
    (Notification("ok", "t", "b", {f"k{i}": "v" for i in range(33)}), "extra_too_many"),
    (Notification("ok", "t", "b", {"k": "v" * 5000}), "payload_too_large"),
])
def test_notification_rules(n: Notification, code: str) -> None:
    with pytest.raises(NotificationError) as caught:
        check_notification(n, Settings(), time.time())
    assert caught.value.code == code


def test_a_checked_notification_becomes_a_custom_job() -> None:
    n = check_notification(Notification("chat", "Hi", "There", {"room": "7"}), Settings(), time.time())
    job = custom_job(n, "sip:a@b", Settings(message_ttl=60), 1000.0)
    assert job.kind.value == "custom" and job.deadline == 1060.0 and job.aor == "sip:a@b"
    assert dict(job.data) == {"room": "7", "notification_type": "chat", "title": "Hi", "body": "There"}


@pytest.mark.parametrize("result, ok", [
    (PushResult(Outcome.REJECTED, 400, "PayloadEmpty"), True),
    (PushResult(Outcome.DEVICE_SUSPECT, 400, "BadDeviceToken"), True),
    (PushResult(Outcome.TOKEN_DEAD, 400, "INVALID_ARGUMENT"), True),
    (PushResult(Outcome.CONFIG_ERROR, 403, "InvalidProviderToken"), False),
    (PushResult(Outcome.CONFIG_ERROR, 400, "TopicDisallowed"), False),
    (PushResult(Outcome.RETRYABLE, 0, "connection error"), False),
    (PushResult(Outcome.RETRYABLE, 503, "UNAVAILABLE"), False),
])
def test_check_verdict(result: PushResult, ok: bool) -> None:
    assert verdict(result)[0] is ok


def test_health_assessment() -> None:
    assert assess(False, None, [], None)["status"] == "down"
    assert assess(True, {"pending": 2, "lag": 5}, [{"idle": 60_000}], 7)["status"] == "degraded"
    doc = assess(True, {"pending": 2, "lag": 5}, [{"idle": 100}], 7)
    assert (doc["status"], doc["pending"], doc["lag"], doc["active_consumers"]) == ("ok", 2, 5, 1)
    readers = reading_clients([{"cmd": "xreadgroup", "idle": 0}, {"cmd": "get", "idle": 0},
                               {"cmd": "xreadgroup", "idle": 60}])
    assert readers == 1 and assess(True, None, [], 0, readers)["dispatcher_alive"] is True


def test_credentials_view_shows_fingerprints_never_secrets() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    app = AppCredentials(Provider.APNS, "com.x", apns_key_pem=check_apns_key(pem), apns_key_id="K", apns_team_id="T")
    view = credentials_view(app)
    assert view["fingerprint"].startswith("sha256:") and pem not in json.dumps(view)
    assert credentials_view(AppCredentials(Provider.FCM, "p", fcm_service_account='{"private_key": "x"}'))[
        "unreadable"] is True
    with pytest.raises(CredentialsError, match="not an unencrypted PEM"):
        check_apns_key("-----BEGIN PRIVATE KEY-----\nsecret\n-----END PRIVATE KEY-----")


def test_cli_keys_tenants_users_with_json_and_exit_codes(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = ["--redis-url", redis_url]
    assert main([*url, "tenants", "create", "acme", "--name", "Acme"]) == 0
    assert main([*url, "tenants", "domain-add", "acme", "Acme.Example"]) == 0
    assert main([*url, "tenants", "create", "acme"]) == 1  # exists: a failure, not usage
    assert main([*url, "tenants", "create", "Not An Id"]) == 2  # an invalid value: usage
    assert main([*url, "tenants", "create", "other"]) == 0
    assert main([*url, "tenants", "domain-add", "other", "acme.example"]) == 1  # taken
    capsys.readouterr()
    assert main([*url, "--json", "keys", "create", "--scope", "send", "--tenant", "acme", "--name", "crm"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["ok"] and created["token"].startswith("pnk_") and created["key"]["tenant"] == "acme"
    assert main([*url, "--json", "keys", "list"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [k["key_id"] for k in listed["keys"]] == [created["key"]["key_id"]]
    assert created["token"] not in json.dumps(listed)
    assert main([*url, "keys", "create", "--scope", "send", "--tenant", "nobody"]) == 1
    with pytest.raises(SystemExit) as usage:
        main([*url, "keys", "create", "--scope", "root"])
    assert usage.value.code == 2
    assert main([*url, "--json", "tenants", "show", "acme"]) == 0
    assert json.loads(capsys.readouterr().out)["tenant"]["domains"] == ["acme.example"]
    assert main([*url, "users", "map", "u-1", "alice@acme.example"]) == 0
    assert capsys.readouterr().out == "user u-1 is sip:alice@acme.example\n"
    assert main([*url, "--json", "users", "show", "u-1"]) == 0
    assert json.loads(capsys.readouterr().out)["aor"] == "sip:alice@acme.example"
    assert main([*url, "--json", "users", "show", "u-2"]) == 1
    assert json.loads(capsys.readouterr().out) == {"ok": False, "error": "no user u-2"}
    assert main([*url, "tenants", "delete", "acme"]) == 0
    assert main([*url, "keys", "revoke", created["key"]["key_id"]]) == 1  # revoked with its tenant
    capsys.readouterr()
    assert main([*url, "--json", "devices", "alice@acme.example"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "devices": []}


def test_cli_app_check_against_the_sandbox(redis_url: str, sbx, capsys: pytest.CaptureFixture[str]) -> None:
    from pushlib.store import SyncStore
    store = SyncStore(redis_url, Settings())
    store.save_app(sbx.control.fcm_app("check-project"))
    store.save_device(android("sip:a@b", "a", fcm_token()))
    store.close()
    assert main(["--redis-url", redis_url, "--json", "app", "check", "fcm", "check-project"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["check"]["ok"] is True and doc["check"]["status"] == 400
    sbx.control.reset()  # the sandbox forgets the service account: OAuth fails
    assert main(["--redis-url", redis_url, "--json", "app", "check", "fcm", "check-project"]) == 1
    assert json.loads(capsys.readouterr().out)["check"]["ok"] is False
