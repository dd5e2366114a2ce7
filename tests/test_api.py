"""The HTTP API against the running system: `pushlib-api` on loopback, a real redis-server, a
standalone dispatcher and the sandbox providers (one stack for the module, `harness.apistack`).

Every endpoint's happy path and errors, credentials never returned, a Wazo-shaped notification
arriving at the sandbox for an iPhone and an Android phone, the tenant isolation matrix, /health
and /metrics (parsed by prometheus_client's own parser), and the committed OpenAPI document.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.apistack import ApiStack, api_stack, create_key
from harness.sipua import apns_token, fcm_token
from pushlib.apikeys import Scope
from pushlib.models import Device, Provider, PushParams
from pushlib.redisconn import async_client
from pushlib.tenants import TenantStore
from tests.support import BUNDLE, FCM_PROJECT, ROOT, TEAM, android, ios

OPENAPI_FILE = ROOT / "docs" / "openapi.json"


@pytest.fixture(scope="module")
def stack() -> Iterator[ApiStack]:
    with api_stack() as s:
        yield s


def client(stack: ApiStack, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=stack.url, headers=headers, timeout=20)


@pytest.fixture()
def admin(stack: ApiStack) -> Iterator[httpx.Client]:
    with client(stack, stack.admin_token) as c:
        yield c


def user(domain: str = "example.com") -> str:
    return f"u{uuid.uuid4().hex[:10]}@{domain}"


def stream_length(stack: ApiStack) -> int:
    return int(stack.store.client.xlen(stack.store.settings.stream))


def wazo(user_uuid: str, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"notification_type": "planned_maintenance", "user_uuid": user_uuid,
                            "title": "Maintenance", "body": "Restart at 02:00", "extra": {"ticket": "42"}}
    body.update(over)
    return body


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    doc: dict[str, Any] = r.json()
    assert isinstance(doc["error"], str) and isinstance(doc["message"], str)
    if code is not None:
        assert doc["error"] == code, doc
    return doc


# --------------------------------------------------------------------------- notifications


def test_wazo_notification_reaches_an_iphone_and_an_android_phone(stack: ApiStack, admin: httpx.Client) -> None:
    aor_text = user()
    aor = f"sip:{aor_text}"
    iphone_voip, iphone_alert, droid = apns_token(), apns_token(), fcm_token()
    stack.store.save_device(ios(aor, "iphone", voip=iphone_voip, alert=iphone_alert))
    stack.store.save_device(android(aor, "android", droid))
    user_uuid = str(uuid.uuid4())
    r = admin.put(f"/1.0/users/{user_uuid}", json={"aor": aor_text})
    assert r.status_code == 200 and r.json() == {"user_uuid": user_uuid, "aor": aor}

    r = admin.post("/1.0/mobile/notifications", json=wazo(user_uuid, extra={"ticket": "42", "url": "https://x/y"}))
    assert r.status_code == 204, r.text
    assert r.content == b""

    [apns] = stack.wait_pushes(iphone_alert)
    assert stack.sandbox.control.pushes(iphone_voip) == []  # never a VoIP push for a notification
    assert (apns["topic"], apns["push_type"], apns["priority"]) == (BUNDLE, "alert", 10)
    payload = apns["payload"]
    assert payload["aps"]["alert"] == {"title": "Maintenance", "body": "Restart at 02:00"}
    assert (payload["type"], payload["notification_type"], payload["ticket"], payload["url"]) == (
        "custom", "planned_maintenance", "42", "https://x/y")

    [fcm] = stack.wait_pushes(droid)
    message = fcm["payload"]
    assert fcm["project_id"] == FCM_PROJECT and message["android"]["priority"] == "high"
    assert message["notification"] == {"title": "Maintenance", "body": "Restart at 02:00"}
    assert {k: message["data"][k] for k in ("type", "notification_type", "title", "body", "ticket", "url")} == {
        "type": "custom", "notification_type": "planned_maintenance", "title": "Maintenance",
        "body": "Restart at 02:00", "ticket": "42", "url": "https://x/y"}

    # a plain user@domain works too
    assert admin.post("/1.0/mobile/notifications", json=wazo(aor_text)).status_code == 204
    assert len(stack.wait_pushes(droid, 2)) == 2


@pytest.mark.parametrize("change, status, code", [
    ({"notification_type": "incoming_call"}, 422, "reserved_notification_type"),
    ({"notification_type": "missedcall"}, 422, "reserved_notification_type"),
    ({"notification_type": "Bad-Type"}, 422, "invalid_request"),
    ({"notification_type": "x" * 101}, 422, "invalid_request"),
    ({"title": "t" * 129}, 422, "invalid_request"),
    ({"body": "b" * 251}, 422, "invalid_request"),
    ({"extra": {"n": 1}}, 422, "invalid_request"),
    ({"extra": {"aps": "x"}}, 422, "extra_reserved_name"),
    ({"extra": {"k": "v" * 2048, "l": "v" * 2048}}, 422, "payload_too_large"),
    ({"title": 5}, 422, "invalid_request"),
    ({"surprise": "field"}, 422, "invalid_request"),
    ({"user_uuid": "not a user!"}, 404, "not_found"),
    ({"user_uuid": "no-such-uuid"}, 404, "not_found"),
    ({"user_uuid": "bad@@"}, 422, "invalid_user"),
])
def test_bad_notifications_are_refused_and_nothing_is_queued(
        stack: ApiStack, admin: httpx.Client, change: dict[str, Any], status: int, code: str) -> None:
    aor = user()
    stack.store.save_device(android(f"sip:{aor}", "a", fcm_token()))
    before = stream_length(stack)
    assert_error(admin.post("/1.0/mobile/notifications", json={**wazo(aor), **change}), status, code)
    assert stream_length(stack) == before


def test_a_user_without_a_push_capable_device_gets_a_clear_4xx(stack: ApiStack, admin: httpx.Client) -> None:
    aor = user()
    doc = assert_error(admin.post("/1.0/mobile/notifications", json=wazo(aor)), 409, "no_push_device")
    assert "no device" in doc["message"]
    stack.store.save_device(ios(f"sip:{aor}", "voip-only", voip=apns_token()))  # call pushes only
    assert_error(admin.post("/1.0/mobile/notifications", json=wazo(aor)), 409, "no_push_device")


def test_invalid_json_oversize_and_wrong_media_are_4xx_json(stack: ApiStack, admin: httpx.Client) -> None:
    before = stream_length(stack)
    bad = admin.post("/1.0/mobile/notifications", content=b'{"notification_type": "x",',
                     headers={"content-type": "application/json"})
    assert_error(bad, 400, "invalid_json")
    big = admin.post("/1.0/mobile/notifications", content=b"{" + b" " * (65 * 1024) + b"}",
                     headers={"content-type": "application/json"})
    assert_error(big, 413, "body_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while read
        for _ in range(80):
            yield b" " * 1024

    assert_error(admin.post("/1.0/mobile/notifications", content=chunks(),
                            headers={"content-type": "application/json"}), 413, "body_too_large")
    assert_error(admin.post("/1.0/mobile/notifications", content=b"[1, 2]",
                            headers={"content-type": "application/json"}), 422, "invalid_request")
    assert_error(admin.get("/1.0/nowhere"), 404, "not_found")
    assert_error(admin.delete("/1.0/mobile/notifications"), 405, "method_not_allowed")
    assert stream_length(stack) == before


# --------------------------------------------------------------------------- auth


def test_missing_invalid_and_revoked_keys_are_401_and_scopes_are_403(stack: ApiStack) -> None:
    with client(stack) as anonymous:
        r = anonymous.get("/1.0/apps")
        assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
    for token in ("nonsense", "pnk_000000000000_" + "A" * 43, stack.admin_token[:-1] + "x"):
        with client(stack, token) as c:
            assert_error(c.get("/1.0/apps"), 401, "unauthorized")
    send_only = create_key(stack.redis.url, frozenset({Scope.SEND}))
    reader = create_key(stack.redis.url, frozenset({Scope.READ}))
    with client(stack, send_only) as c:
        assert_error(c.get("/1.0/apps"), 403, "forbidden")
    with client(stack, reader) as c:
        assert c.get("/1.0/apps").status_code == 200
        assert_error(c.post("/1.0/mobile/notifications", json=wazo(user())), 403, "forbidden")
        assert_error(c.delete("/1.0/uamaps/x"), 403, "forbidden")
    with client(stack, send_only) as c:  # send scope: the notification is checked, not refused by scope
        assert_error(c.post("/1.0/mobile/notifications", json=wazo(user())), 409, "no_push_device")


# --------------------------------------------------------------------------- apps


def test_apps_crud_credentials_are_write_only(stack: ApiStack, admin: httpx.Client) -> None:
    sb = stack.sandbox
    key = sb.control.apns_token_key(["com.example.api"], team_id=TEAM)
    body = {"apns_token": {"key_pem": key.private_pem, "key_id": key.key_id, "team_id": TEAM},
            "sandbox": True, "host": sb.host, "ca_pem": sb.ca_pem}
    r = admin.put("/1.0/apps/apns/com.example.api", json=body)
    assert r.status_code == 200, r.text
    assert "PRIVATE KEY" not in r.text
    view = r.json()
    assert view["credentials"]["kind"] == "apns-token" and view["credentials"]["fingerprint"].startswith("sha256:")
    assert view["credentials"]["key_id"] == key.key_id and view["custom_ca"] is True

    r = admin.get("/1.0/apps/apns/com.example.api")
    assert r.status_code == 200 and "PRIVATE KEY" not in r.text and "BEGIN" not in r.text
    assert r.json()["credentials"]["fingerprint"] == view["credentials"]["fingerprint"]
    assert "counters" in r.json()["status"]
    check = admin.post("/1.0/apps/apns/com.example.api/check")
    assert check.status_code == 200 and check.json()["ok"] is True, check.text
    assert check.json()["host"] == sb.host and check.json()["status"] == 400  # PayloadEmpty: authenticated

    # a key the provider does not know: stored (it is well formed), but the check says no
    unknown = sb.control.apns_token_key(["other.bundle"], team_id=TEAM)
    body["apns_token"] = {"key_pem": unknown.private_pem, "key_id": "NOTAKEY123", "team_id": TEAM}
    assert admin.put("/1.0/apps/apns/com.example.api", json=body).status_code == 200
    failed = admin.post("/1.0/apps/apns/com.example.api/check").json()
    assert failed["ok"] is False and failed["status"] == 403, failed

    # certificate app, with its expiry
    cert_pem, key_pem = sb.control.apns_client_cert("com.example.cert")
    r = admin.put("/1.0/apps/apns/com.example.cert", json={
        "apns_certificate": {"cert_pem": cert_pem, "key_pem": key_pem}, "host": sb.host, "ca_pem": sb.ca_pem})
    assert r.status_code == 200 and r.json()["credentials"]["expires_at"].endswith("Z")
    assert "BEGIN" not in r.text
    assert admin.post("/1.0/apps/apns/com.example.cert/check").json()["ok"] is True

    # FCM with aliases; check fetches an OAuth token from the sandbox
    account = sb.control.service_account("api-project")
    r = admin.put("/1.0/apps/fcm/api-project", json={
        "fcm_service_account": account, "host": sb.host, "ca_pem": sb.ca_pem, "aliases": ["987654321098"]})
    assert r.status_code == 200, r.text
    assert r.json()["aliases"] == ["987654321098"]
    assert r.json()["credentials"]["client_email"] == account["client_email"]
    assert "BEGIN" not in r.text
    assert admin.post("/1.0/apps/fcm/987654321098/check").json()["ok"] is True
    assert admin.get("/1.0/apps/fcm/987654321098").json()["app_id"] == "api-project"
    assert_error(admin.delete("/1.0/apps/fcm/987654321098"), 409, "is_alias")
    r = admin.patch("/1.0/apps/fcm/api-project", json={"enabled": False})
    assert r.status_code == 200 and r.json()["enabled"] is False and r.json()["aliases"] == ["987654321098"]
    assert stack.store.app_enabled("fcm", "987654321098") is False

    listed = {(a["provider"], a["app_id"]) for a in admin.get("/1.0/apps").json()["apps"]}
    assert {("apns", "com.example.api"), ("apns", "com.example.cert"), ("fcm", "api-project"),
            ("apns", BUNDLE), ("fcm", FCM_PROJECT)} <= listed
    assert ("fcm", "987654321098") not in listed
    assert "BEGIN" not in admin.get("/1.0/apps").text

    for path in ("/1.0/apps/fcm/api-project", "/1.0/apps/apns/com.example.cert"):
        assert admin.delete(path).status_code == 204
        assert_error(admin.get(path), 404, "not_found")
    assert stack.store.app_enabled("fcm", "987654321098") is None


@pytest.mark.parametrize("body, fragment", [
    ({"apns_token": {"key_pem": "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n",
                     "key_id": "ABC", "team_id": "T"}}, "not an unencrypted PEM private key"),
    ({}, "exactly one of"),
    ({"fcm_service_account": {"project_id": "p"}}, "not a credential of a apns app"),
])
def test_bad_credentials_are_422_and_never_echoed(stack: ApiStack, admin: httpx.Client, body: dict[str, Any],
                                                   fragment: str) -> None:
    doc = assert_error(admin.put("/1.0/apps/apns/com.example.bad", json=body), 422, "invalid_credentials")
    assert fragment in doc["message"] and "nope" not in json.dumps(doc)
    assert_error(admin.get("/1.0/apps/apns/com.example.bad"), 404)


def test_fcm_service_account_must_match_the_app_and_parse(stack: ApiStack, admin: httpx.Client) -> None:
    account = stack.sandbox.control.service_account("proj-a")
    assert_error(admin.put("/1.0/apps/fcm/proj-b", json={"fcm_service_account": account}), 422, "invalid_credentials")
    assert_error(admin.put("/1.0/apps/fcm/proj-a", json={"fcm_service_account": {**account, "private_key": "x"}}),
                 422, "invalid_credentials")
    assert_error(admin.put("/1.0/apps/fcm/proj-a", json={"fcm_service_account": account, "unknown": 1}), 422,
                 "invalid_request")
    assert_error(admin.put(f"/1.0/apps/fcm/{FCM_PROJECT}", json={"fcm_service_account": account,
                                                                  "aliases": ["proj-a"]}), 422)


# --------------------------------------------------------------------------- uamaps, subscribers, devices


def test_ua_mappings_crud(stack: ApiStack, admin: httpx.Client) -> None:
    r = admin.put("/1.0/uamaps/acme", json={"regex": "^Acme Phone/", "token_param": "x-tok"})
    assert r.status_code == 200 and r.json()["token_param"] == "x-tok"
    assert {m["name"] for m in admin.get("/1.0/uamaps").json()["mappings"]} >= {"acme"}
    assert [m.name for m in stack.store.ua_mappings() if m.name == "acme"] == ["acme"]
    assert_error(admin.put("/1.0/uamaps/bad", json={"regex": "(["}), 422, "invalid_regex")
    assert admin.delete("/1.0/uamaps/acme").status_code == 204
    assert_error(admin.delete("/1.0/uamaps/acme"), 404)


def test_subscribers_crud_stores_ha1_only(stack: ApiStack, admin: httpx.Client) -> None:
    aor = user()
    assert_error(admin.get(f"/1.0/subscribers/{aor}"), 404)
    assert admin.put(f"/1.0/subscribers/{aor}", json={"password": "s3cret-pass"}).status_code == 204
    r = admin.get(f"/1.0/subscribers/{aor}")
    assert r.json() == {"aor": f"sip:{aor}", "realm": "example.com", "voicemail_uri": None} and "s3cret" not in r.text
    stored = stack.store.client.hgetall(f"pn:sub:{aor}")
    assert set(stored) == {"ha1", "realm"} and "s3cret-pass" not in json.dumps(stored)
    assert admin.delete(f"/1.0/subscribers/{aor}").status_code == 204
    assert_error(admin.delete(f"/1.0/subscribers/{aor}"), 404)


def test_devices_list_and_remove(stack: ApiStack, admin: httpx.Client) -> None:
    aor = user()
    token = fcm_token()
    stack.store.save_device(android(f"sip:{aor}", "a1", token))
    stack.store.save_device(ios(f"sip:{aor}", "i1", voip=apns_token()))
    r = admin.get(f"/1.0/users/sip:{aor}/devices")
    assert r.status_code == 200 and token not in r.text
    devices = {d["device_id"]: d for d in r.json()["devices"]}
    assert devices["a1"]["tokens"] == ["alert"] and devices["a1"]["push_capable"] is True
    assert devices["i1"]["tokens"] == ["voip"] and devices["i1"]["push_capable"] is False
    assert admin.delete(f"/1.0/users/{aor}/devices/a1").status_code == 204
    assert_error(admin.delete(f"/1.0/users/{aor}/devices/a1"), 404)
    assert admin.delete(f"/1.0/users/{aor}/devices").json() == {"removed": ["i1"]}
    assert admin.get(f"/1.0/users/{aor}/devices").json()["devices"] == []


def test_user_mapping_crud(stack: ApiStack, admin: httpx.Client) -> None:
    assert_error(admin.get("/1.0/users/nobody-here"), 404)
    assert_error(admin.put("/1.0/users/u1", json={"aor": "no-at-sign"}), 422, "invalid_user")
    assert admin.put("/1.0/users/u1", json={"aor": "Bob@Example.COM"}).json()["aor"] == "sip:Bob@example.com"
    assert admin.get("/1.0/users/u1").json() == {"user_uuid": "u1", "aor": "sip:Bob@example.com"}
    assert admin.delete("/1.0/users/u1").status_code == 204
    assert_error(admin.get("/1.0/users/u1"), 404)


# --------------------------------------------------------------------------- tenants


def _tenant(stack: ApiStack, tenant_id: str, domain: str, apps: list[tuple[str, str]]) -> None:
    async def run() -> None:
        redis = async_client(stack.redis.url)
        try:
            tenants = TenantStore(redis)
            await tenants.create(tenant_id)
            await tenants.add_domain(tenant_id, domain)
            for provider, app_id in apps:
                await tenants.add_app(tenant_id, provider, app_id)
        finally:
            await redis.aclose()

    asyncio.run(run())


def test_tenant_isolation_matrix(stack: ApiStack, admin: httpx.Client) -> None:
    """Every endpoint × a key of the owning tenant / a key of another tenant / no key."""
    sb = stack.sandbox
    for t in ("red", "blue"):
        key = sb.control.apns_token_key([f"com.{t}.app"], team_id=TEAM)
        assert admin.put(f"/1.0/apps/apns/com.{t}.app", json={
            "apns_token": {"key_pem": key.private_pem, "key_id": key.key_id, "team_id": TEAM},
            "host": sb.host, "ca_pem": sb.ca_pem}).status_code == 200
        _tenant(stack, t, f"{t}.example", [("apns", f"com.{t}.app")])
        aor = f"sip:alice@{t}.example"
        params = PushParams(Provider.APNS, f"com.{t}.app", alert_token=apns_token())
        stack.store.save_device(Device(aor, "phone", params, registered_at=time.time(), expires_at=time.time() + 3600))
        admin.put(f"/1.0/subscribers/alice@{t}.example", json={"password": "pw"})
        admin.put(f"/1.0/users/{t}-alice", json={"aor": f"alice@{t}.example"})
    keys = {t: create_key(stack.redis.url, frozenset({Scope.ADMIN}), tenant=t) for t in ("red", "blue")}

    def requests(t: str) -> list[tuple[str, str, dict[str, Any] | None, int]]:
        """(method, path, body, status for the owner) of every tenant-scoped endpoint, targeting tenant t."""
        key = sb.control.apns_token_key([f"com.{t}.app"], team_id=TEAM)
        app_body = {"apns_token": {"key_pem": key.private_pem, "key_id": key.key_id, "team_id": TEAM},
                    "host": sb.host, "ca_pem": sb.ca_pem}
        return [
            ("POST", "/1.0/mobile/notifications", wazo(f"alice@{t}.example"), 204),
            ("POST", "/1.0/mobile/notifications", wazo(f"{t}-alice"), 204),
            ("GET", f"/1.0/users/{t}-alice", None, 200),
            ("PUT", f"/1.0/users/{t}-alice", {"aor": f"alice@{t}.example"}, 200),
            ("GET", f"/1.0/users/alice@{t}.example/devices", None, 200),
            ("GET", f"/1.0/subscribers/alice@{t}.example", None, 200),
            ("PUT", f"/1.0/subscribers/alice@{t}.example", {"password": "pw2"}, 204),
            ("GET", f"/1.0/apps/apns/com.{t}.app", None, 200),
            ("PUT", f"/1.0/apps/apns/com.{t}.app", app_body, 200),
            ("PATCH", f"/1.0/apps/apns/com.{t}.app", {"enabled": True}, 200),
            ("POST", f"/1.0/apps/apns/com.{t}.app/check", None, 200),
            ("DELETE", f"/1.0/users/alice@{t}.example/devices/phone", None, 204),
            ("DELETE", f"/1.0/users/alice@{t}.example/devices", None, 200),
            ("DELETE", f"/1.0/subscribers/alice@{t}.example", None, 204),
            ("DELETE", f"/1.0/users/{t}-alice", None, 204),
            ("DELETE", f"/1.0/apps/apns/com.{t}.app", None, 204),
        ]

    with client(stack) as anonymous, client(stack, keys["red"]) as red, client(stack, keys["blue"]) as blue:
        for method, path, body, _ in requests("blue"):  # red's key on blue's things: as if absent
            assert_error(red.request(method, path, json=body), 404, "not_found")
            assert_error(anonymous.request(method, path, json=body), 401, "unauthorized")
        for method, path, body, status in requests("blue"):  # blue's key: everything works (and nothing was lost)
            r = blue.request(method, path, json=body)
            assert r.status_code == status, (method, path, r.text)
        # listings show only the tenant's own; operator-wide endpoints refuse tenant keys
        assert [a["app_id"] for a in red.get("/1.0/apps").json()["apps"]] == ["com.red.app"]
        assert_error(red.get("/1.0/uamaps"), 403, "forbidden")
        assert_error(red.get("/metrics"), 403, "forbidden")
        # a tenant key creating an app owns it; the other tenant cannot see or overwrite it
        key = sb.control.apns_token_key(["com.red.new"], team_id=TEAM)
        new = {"apns_token": {"key_pem": key.private_pem, "key_id": key.key_id, "team_id": TEAM}}
        assert red.put("/1.0/apps/apns/com.red.new", json=new).json()["tenant"] == "red"
        assert_error(blue.put("/1.0/apps/apns/com.red.new", json=new), 404)
        assert_error(blue.put("/1.0/users/x-red", json={"aor": "bob@red.example"}), 404)
    assert {a["app_id"] for a in admin.get("/1.0/apps").json()["apps"]} >= {"com.red.app", "com.red.new"}


# --------------------------------------------------------------------------- operations


def test_health_reports_redis_dispatcher_and_stream(stack: ApiStack) -> None:
    with client(stack) as anonymous:
        deadline = time.monotonic() + 10
        while True:
            r = anonymous.get("/health")
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    doc = r.json()
    assert r.status_code == 200, doc
    assert doc["status"] == "ok" and doc["redis"] is True and doc["dispatcher_alive"] is True
    assert doc["active_consumers"] >= 1 and doc["lag"] is not None and doc["pending"] is not None


def test_metrics_parse_with_prometheus_client(stack: ApiStack, admin: httpx.Client) -> None:
    r = admin.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = list(text_string_to_metric_families(r.text))
    assert families and all(f.name for f in families)
    with client(stack) as anonymous:
        assert_error(anonymous.get("/metrics"), 401)


def test_committed_openapi_is_what_the_app_serves(stack: ApiStack) -> None:
    with client(stack) as anonymous:
        served = anonymous.get("/openapi.json").json()
    assert json.loads(OPENAPI_FILE.read_text()) == served, (
        "docs/openapi.json is stale: regenerate it with `pushlib-api --openapi > docs/openapi.json`")
