"""The sandbox providers, driven over real HTTP/2 + TLS against a real subprocess."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import google.auth.transport.requests
import httpx
import pytest
import requests
from cryptography import x509
from google.auth import crypt
from google.auth import jwt as google_jwt
from google.oauth2 import service_account

from pushlib.models import AppCredentials
from pushsandbox.certs import SandboxPki
from pushsandbox.process import SandboxHandle, sandbox_process

BUNDLE = "org.example.phone"
TOKEN = "ab" * 32
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxHandle]:
    with sandbox_process() as handle:
        yield handle


@pytest.fixture(autouse=True)
def _clean(sandbox: SandboxHandle) -> None:
    sandbox.control.clear()


@pytest.fixture(scope="module")
def token_app(sandbox: SandboxHandle) -> AppCredentials:
    return sandbox.control.apns_token_app(BUNDLE)


@pytest.fixture(scope="module")
def client(sandbox: SandboxHandle) -> Iterator[httpx.Client]:
    context = ssl.create_default_context(cadata=sandbox.ca_pem)
    with httpx.Client(base_url=sandbox.url, http2=True, verify=context, timeout=10) as c:
        yield c


def provider_jwt(app: AppCredentials, iat: float | None = None, kid: str | None = None) -> str:
    assert app.apns_key_pem and app.apns_key_id
    signer = crypt.ES256Signer.from_string(app.apns_key_pem, kid or app.apns_key_id)
    claims = {"iss": app.apns_team_id, "iat": int(time.time() if iat is None else iat)}
    token: bytes = google_jwt.encode(signer, claims)  # type: ignore[no-untyped-call]
    return token.decode()


def apns_headers(jwt: str | None, **extra: str) -> dict[str, str]:
    headers = {"apns-topic": BUNDLE + ".voip", "apns-push-type": "voip", "apns-priority": "10"}
    if jwt is not None:
        headers["authorization"] = f"bearer {jwt}"
    headers.update({k.replace("_", "-"): v for k, v in extra.items()})
    return headers


VOIP_BODY = json.dumps({"aps": {}, "call_id": "c1"}).encode()
ALERT_BODY = json.dumps({"aps": {"alert": {"title": "Missed Call"}}}).encode()


def reason(response: httpx.Response) -> str:
    return str(response.json()["reason"])


# --- APNs -------------------------------------------------------------------------------------

def test_apns_token_auth_accepted_and_recorded_over_http2(sandbox, client, token_app) -> None:
    jwt = provider_jwt(token_app)
    apns_id = str(uuid.uuid4())
    r = client.post(f"/3/device/{TOKEN}", content=VOIP_BODY,
                    headers=apns_headers(jwt, apns_id=apns_id, apns_expiration="1700000000",
                                         apns_collapse_id="call-c1"))
    assert r.status_code == 200, r.text
    assert r.http_version == "HTTP/2"
    assert r.headers["apns-id"] == apns_id
    [rec] = sandbox.control.pushes(TOKEN)
    assert rec["provider"] == "apns" and rec["auth"] == "token"
    assert (rec["topic"], rec["push_type"], rec["priority"]) == (BUNDLE + ".voip", "voip", 10)
    assert (rec["expiration"], rec["collapse_id"], rec["apns_id"]) == (1700000000, "call-c1", apns_id)
    assert rec["payload"] == {"aps": {}, "call_id": "c1"}
    assert rec["headers"]["apns-topic"] == BUNDLE + ".voip"
    assert "authorization" not in rec["headers"]  # secrets are not echoed back
    assert rec["time"] <= time.time()


def test_apns_generates_an_apns_id_when_absent(client, token_app) -> None:
    r = client.post(f"/3/device/{TOKEN}", content=VOIP_BODY, headers=apns_headers(provider_jwt(token_app)))
    assert r.status_code == 200
    assert uuid.UUID(r.headers["apns-id"])


def test_apns_rejects_bad_unknown_and_missing_provider_tokens(sandbox, client, token_app) -> None:
    other = sandbox.control.apns_token_app("org.other.app")
    # Signed by another key but claiming this key's id: the signature does not verify.
    forged = provider_jwt(AppCredentials(**{**token_app.__dict__, "apns_key_pem": other.apns_key_pem}))
    r = client.post(f"/3/device/{TOKEN}", content=VOIP_BODY, headers=apns_headers(forged))
    assert (r.status_code, reason(r)) == (403, "InvalidProviderToken")
    unknown_kid = provider_jwt(token_app, kid="NOSUCHKEY1")
    r = client.post(f"/3/device/{TOKEN}", content=VOIP_BODY, headers=apns_headers(unknown_kid))
    assert (r.status_code, reason(r)) == (403, "InvalidProviderToken")
    r = client.post(f"/3/device/{TOKEN}", content=VOIP_BODY, headers=apns_headers("not.a.jwt"))
    assert (r.status_code, reason(r)) == (403, "InvalidProviderToken")
    r = client.post(f"/3/device/{TOKEN}", content=VOIP_BODY, headers=apns_headers(None))
    assert (r.status_code, reason(r)) == (403, "MissingProviderToken")
    assert "apns-id" in r.headers
    assert sandbox.control.pushes() == []


def test_apns_expired_provider_token(client, token_app) -> None:
    old = provider_jwt(token_app, iat=time.time() - 3700)
    r = client.post(f"/3/device/{TOKEN}", content=VOIP_BODY, headers=apns_headers(old))
    assert (r.status_code, reason(r)) == (403, "ExpiredProviderToken")


def test_apns_topic_must_belong_to_the_key(client, token_app) -> None:
    jwt = provider_jwt(token_app)
    r = client.post(f"/3/device/{TOKEN}", content=ALERT_BODY,
                    headers=apns_headers(jwt, apns_topic="org.evil.app", apns_push_type="alert"))
    assert (r.status_code, reason(r)) == (400, "TopicDisallowed")
    headers = apns_headers(jwt)
    del headers["apns-topic"]
    r = client.post(f"/3/device/{TOKEN}", content=VOIP_BODY, headers=headers)
    assert (r.status_code, reason(r)) == (400, "MissingTopic")


def cert_client(sandbox: SandboxHandle, tmp_path: Path, bundle: str) -> httpx.Client:
    cert_pem, key_pem = sandbox.control.apns_client_cert(bundle)
    (tmp_path / "c.pem").write_text(cert_pem)
    (tmp_path / "k.pem").write_text(key_pem)
    context = ssl.create_default_context(cadata=sandbox.ca_pem)
    context.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    return httpx.Client(base_url=sandbox.url, http2=True, verify=context, timeout=10)


def test_apns_client_certificate_auth(sandbox, tmp_path) -> None:
    with cert_client(sandbox, tmp_path, BUNDLE) as c:
        r = c.post(f"/3/device/{TOKEN}", content=ALERT_BODY, headers={"apns-push-type": "alert"})
        assert r.status_code == 200, r.text
        r = c.post(f"/3/device/{TOKEN}", content=VOIP_BODY, headers=apns_headers(None))
        assert r.status_code == 200, r.text
        r = c.post(f"/3/device/{TOKEN}", content=ALERT_BODY,
                   headers={"apns-topic": "org.other.app", "apns-push-type": "alert"})
        assert (r.status_code, reason(r)) == (400, "TopicDisallowed")
    recs = sandbox.control.pushes(TOKEN)
    assert [(x["auth"], x["topic"]) for x in recs] == [("cert", BUNDLE), ("cert", BUNDLE + ".voip")]


@pytest.mark.parametrize(
    ("host", "environment"),
    [("api.sandbox.push.apple.com", "development"), ("api.push.apple.com", "production"), (None, None)],
)
@pytest.mark.parametrize("http2", [True, False])
def test_apns_record_says_which_environment_the_client_asked_for(
    sandbox, token_app, host, environment, http2
) -> None:
    """A client picks the APNs environment by the host it addresses. Resolving Apple's names to the
    sandbox (like curl --connect-to) works: its certificate names them, so TLS checks pass against
    the sandbox CA only, and the record says which one was asked for (`:authority` / `Host`).
    Addressed by its own address (what a custom --host does), it cannot tell: None."""
    context = ssl.create_default_context(cadata=sandbox.ca_pem)
    headers = apns_headers(provider_jwt(token_app))
    extensions = {}
    if host is not None:
        headers["host"] = f"{host}:443" if http2 else host
        extensions = {"sni_hostname": host}
    with httpx.Client(base_url=sandbox.url, http2=http2, http1=not http2, verify=context, timeout=10) as c:
        r = c.post(f"/3/device/{TOKEN}", content=VOIP_BODY, headers=headers, extensions=extensions)
    assert r.status_code == 200, r.text
    assert r.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    [rec] = sandbox.control.pushes(TOKEN)
    assert rec["environment"] == environment
    assert rec["authority"] == headers.get("host", f"127.0.0.1:{sandbox.port}")


def test_sandbox_certificate_names_only_its_own_addresses_and_apples_apns_hosts(sandbox) -> None:
    cert = x509.load_pem_x509_certificate((sandbox.directory / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == [
        "api.push.apple.com", "api.sandbox.push.apple.com", "localhost"]
    assert sorted(str(ip) for ip in san.get_values_for_type(x509.IPAddress)) == ["127.0.0.1", "::1"]


@pytest.mark.parametrize("token", ["zz" * 32, "ab" * 31 + "a", "ab" * 20, "ab" * 101])
def test_apns_bad_device_token(client, token_app, token) -> None:
    r = client.post(f"/3/device/{token}", content=VOIP_BODY, headers=apns_headers(provider_jwt(token_app)))
    assert (r.status_code, reason(r)) == (400, "BadDeviceToken")


@pytest.mark.parametrize(
    ("extra", "body", "status", "why"),
    [
        ({"apns_priority": "7"}, VOIP_BODY, 400, "BadPriority"),
        ({"apns_push_type": "background", "apns_topic": BUNDLE}, VOIP_BODY, 400, "BadPriority"),
        ({"apns_push_type": "voip", "apns_topic": BUNDLE}, VOIP_BODY, 400, "InvalidPushType"),
        ({"apns_push_type": "telepathy"}, VOIP_BODY, 400, "InvalidPushType"),
        ({"apns_expiration": "soon"}, VOIP_BODY, 400, "BadExpirationDate"),
        ({"apns_id": "not-a-uuid"}, VOIP_BODY, 400, "BadMessageId"),
        ({"apns_collapse_id": "x" * 65}, VOIP_BODY, 400, "BadCollapseId"),
        ({}, b"", 400, "PayloadEmpty"),
        ({}, b"[1, 2]", 400, "BadPayload"),
        ({"apns_push_type": "alert", "apns_topic": BUNDLE}, b'{"x": 1}', 400, "BadPayload"),
        ({}, json.dumps({"aps": {}, "pad": "x" * 5100}).encode(), 413, "PayloadTooLarge"),
        ({"apns_push_type": "alert", "apns_topic": BUNDLE},
         json.dumps({"aps": {"alert": "x" * 4090}}).encode(), 413, "PayloadTooLarge"),
    ],
)
def test_apns_header_and_payload_checks(sandbox, client, token_app, extra, body, status, why) -> None:
    headers = apns_headers(provider_jwt(token_app), **extra)
    r = client.post(f"/3/device/{TOKEN}", content=body, headers=headers)
    assert (r.status_code, reason(r)) == (status, why)
    assert sandbox.control.pushes() == []


def test_apns_voip_allows_5120_byte_payload_and_background_priority_5(client, token_app) -> None:
    jwt = provider_jwt(token_app)
    big = json.dumps({"aps": {}, "pad": "x" * 5000}).encode()
    assert 4096 < len(big) <= 5120
    assert client.post(f"/3/device/{TOKEN}", content=big, headers=apns_headers(jwt)).status_code == 200
    bg = apns_headers(jwt, apns_push_type="background", apns_topic=BUNDLE, apns_priority="5")
    body = json.dumps({"aps": {"content-available": 1}}).encode()
    assert client.post(f"/3/device/{TOKEN}", content=body, headers=bg).status_code == 200


def test_apns_method_must_be_post(client, token_app) -> None:
    r = client.get(f"/3/device/{TOKEN}", headers=apns_headers(provider_jwt(token_app)))
    assert (r.status_code, reason(r)) == (405, "MethodNotAllowed")


def test_apns_behaviours_apply_times_then_back_to_normal(sandbox, client, token_app) -> None:
    jwt = provider_jwt(token_app)

    def push() -> httpx.Response:
        headers = apns_headers(jwt)
        response: httpx.Response = client.post(f"/3/device/{TOKEN}", content=VOIP_BODY, headers=headers)
        return response

    sandbox.control.set_behaviour(TOKEN, 410, times=1)
    r = push()
    assert (r.status_code, reason(r)) == (410, "Unregistered")
    assert r.json()["timestamp"] <= time.time() * 1000
    assert push().status_code == 200

    sandbox.control.set_behaviour(TOKEN, 429, "TooManyRequests", retry_after=7, times=2)
    for _ in range(2):
        r = push()
        assert (r.status_code, reason(r), r.headers["retry-after"]) == (429, "TooManyRequests", "7")
    assert push().status_code == 200

    sandbox.control.set_behaviour(TOKEN, 503, times=1)
    r = push()
    assert (r.status_code, reason(r)) == (503, "ServiceUnavailable")
    assert push().status_code == 200

    sandbox.control.set_behaviour(TOKEN, 200, delay=0.3, times=1)  # slow success
    start = time.monotonic()
    assert push().status_code == 200
    assert time.monotonic() - start >= 0.3
    # Only accepted pushes are recorded: the four successes above.
    assert len(sandbox.control.pushes(TOKEN)) == 4


def test_apns_behaviour_forever_until_cleared(sandbox, client, token_app) -> None:
    jwt = provider_jwt(token_app)
    sandbox.control.set_behaviour(TOKEN, 400, "BadDeviceToken")
    for _ in range(3):
        r = client.post(f"/3/device/{TOKEN}", content=VOIP_BODY, headers=apns_headers(jwt))
        assert (r.status_code, reason(r)) == (400, "BadDeviceToken")
    sandbox.control.clear_behaviours()
    assert client.post(f"/3/device/{TOKEN}", content=VOIP_BODY, headers=apns_headers(jwt)).status_code == 200


def test_apns_many_concurrent_streams_on_one_connection(sandbox, token_app) -> None:
    jwt = provider_jwt(token_app)
    tokens = [f"{i:064x}" for i in range(300)]

    async def run() -> list[httpx.Response]:
        context = ssl.create_default_context(cadata=sandbox.ca_pem)
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(base_url=sandbox.url, http2=True, verify=context, limits=limits,
                                     timeout=30) as c:
            return await asyncio.gather(
                *(c.post(f"/3/device/{t}", content=VOIP_BODY, headers=apns_headers(jwt)) for t in tokens)
            )

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * len(tokens)
    assert {r["token"] for r in sandbox.control.pushes()} == set(tokens)
    stats = sandbox.control.stats()
    assert stats["apns_pushes"] == len(tokens)
    assert stats["apns_jwts"] == [jwt]  # one JWT string, however many pushes


def test_http2_large_response_respects_flow_control(sandbox, client, token_app) -> None:
    jwt = provider_jwt(token_app)
    big = json.dumps({"aps": {}, "pad": "x" * 4000}).encode()
    for i in range(40):
        r = client.post(f"/3/device/{i:064x}", content=big, headers=apns_headers(jwt))
        assert r.status_code == 200
    r = client.get("/_sandbox/pushes")  # ~170 KB: more than the initial 64 KB HTTP/2 window
    assert r.http_version == "HTTP/2"
    assert len(r.content) > 65535
    assert len(r.json()) == 40


def test_a_slow_stream_does_not_hold_up_others_on_the_connection(sandbox, token_app) -> None:
    jwt = provider_jwt(token_app)
    slow, fast = "01" * 32, "02" * 32
    sandbox.control.set_behaviour(slow, 200, delay=0.5, times=1)
    finished: list[str] = []

    async def run() -> None:
        context = ssl.create_default_context(cadata=sandbox.ca_pem)
        async with httpx.AsyncClient(base_url=sandbox.url, http2=True, verify=context,
                                     limits=httpx.Limits(max_connections=1), timeout=10) as c:
            async def push(token: str) -> None:
                r = await c.post(f"/3/device/{token}", content=VOIP_BODY, headers=apns_headers(jwt))
                assert r.status_code == 200
                finished.append(token)

            slow_task = asyncio.create_task(push(slow))
            await asyncio.sleep(0.05)
            await push(fast)
            await slow_task

    asyncio.run(run())
    assert finished == [fast, slow]


def test_stats_list_distinct_provider_jwts(sandbox, client, token_app) -> None:
    first, second = provider_jwt(token_app, iat=time.time() - 10), provider_jwt(token_app)
    for jwt in (first, first, second, first):
        r = client.post(f"/3/device/{TOKEN}", content=VOIP_BODY, headers=apns_headers(jwt))
        assert r.status_code == 200
    stats = sandbox.control.stats()
    assert stats["apns_jwts"] == [first, second]
    assert stats["apns_pushes"] == 4


# --- FCM --------------------------------------------------------------------------------------

FCM_TOKEN = "fcm-token:APA91b" + "x" * 140


@pytest.fixture(scope="module")
def fcm_credentials(sandbox: SandboxHandle, tmp_path_factory: pytest.TempPathFactory) -> Any:
    app = sandbox.control.fcm_app("demo-project")
    assert app.fcm_service_account
    info = json.loads(app.fcm_service_account)
    ca_file = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca_file.write_text(sandbox.ca_pem)
    creds = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
        info, scopes=[FCM_SCOPE]
    )
    session = requests.Session()
    session.verify = str(ca_file)
    session.trust_env = False  # else REQUESTS_CA_BUNDLE from the environment overrides `verify`
    creds.refresh(google.auth.transport.requests.Request(session))
    session.close()
    return creds


def fcm_send(
    client: httpx.Client, token: str, message: dict[str, Any], project: str = "demo-project"
) -> httpx.Response:
    response: httpx.Response = client.post(
        f"/v1/projects/{project}/messages:send", json={"message": message},
        headers={"authorization": f"Bearer {token}"},
    )
    return response


def fcm_code(response: httpx.Response) -> tuple[int, str, str | None]:
    error = response.json()["error"]
    codes = [d["errorCode"] for d in error.get("details", []) if "errorCode" in d]
    return error["code"], error["status"], codes[0] if codes else None


def test_fcm_google_auth_token_then_send_is_recorded(sandbox, client, fcm_credentials) -> None:
    assert fcm_credentials.token and fcm_credentials.valid
    message = {"token": FCM_TOKEN, "data": {"type": "incomingCall", "call_id": "c1"},
               "android": {"priority": "high", "ttl": "30s"}}
    r = fcm_send(client, fcm_credentials.token, message)
    assert r.status_code == 200, r.text
    assert r.http_version == "HTTP/2"
    assert r.json()["name"].startswith("projects/demo-project/messages/")
    [rec] = sandbox.control.pushes(FCM_TOKEN)
    assert (rec["provider"], rec["auth"], rec["project_id"]) == ("fcm", "oauth", "demo-project")
    assert rec["priority"] == "high"
    assert rec["payload"] == message


def test_fcm_data_values_must_be_strings(client, fcm_credentials) -> None:
    r = fcm_send(client, fcm_credentials.token, {"token": FCM_TOKEN, "data": {"badge": 3}})
    assert fcm_code(r) == (400, "INVALID_ARGUMENT", "INVALID_ARGUMENT")


@pytest.mark.parametrize(
    "message",
    [
        {"data": {"a": "b"}},
        {"token": FCM_TOKEN, "topic": "news"},
        {"token": FCM_TOKEN, "android": {"priority": "urgent"}},
        {"token": FCM_TOKEN, "android": {"ttl": "30"}},
        {"token": FCM_TOKEN, "data": {"big": "x" * 4100}},
        {"token": FCM_TOKEN, "data": {"from": "me"}},
        {"token": "bad token with spaces"},
    ],
)
def test_fcm_invalid_messages(sandbox, client, fcm_credentials, message) -> None:
    r = fcm_send(client, fcm_credentials.token, message)
    assert r.status_code == 400
    assert fcm_code(r)[1] == "INVALID_ARGUMENT"
    assert sandbox.control.pushes() == []


def test_fcm_invalid_token_points_at_the_token_field(client, fcm_credentials) -> None:
    r = fcm_send(client, fcm_credentials.token, {"token": "bad token"})
    violations = [d for d in r.json()["error"]["details"] if "fieldViolations" in d]
    assert violations[0]["fieldViolations"][0]["field"] == "message.token"


def test_fcm_wrong_project_and_bad_bearer(sandbox, client, fcm_credentials) -> None:
    r = fcm_send(client, fcm_credentials.token, {"token": FCM_TOKEN}, project="someone-else")
    assert fcm_code(r) == (403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH")
    r = fcm_send(client, "ya29.made-up", {"token": FCM_TOKEN})
    assert fcm_code(r)[:2] == (401, "UNAUTHENTICATED")
    assert sandbox.control.pushes() == []


def test_fcm_behaviour_unregistered_then_normal(sandbox, client, fcm_credentials) -> None:
    sandbox.control.set_behaviour(FCM_TOKEN, 404, times=1)
    r = fcm_send(client, fcm_credentials.token, {"token": FCM_TOKEN})
    assert fcm_code(r) == (404, "NOT_FOUND", "UNREGISTERED")
    sandbox.control.set_behaviour(FCM_TOKEN, 429, retry_after=3, times=1)
    r = fcm_send(client, fcm_credentials.token, {"token": FCM_TOKEN})
    assert fcm_code(r) == (429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED")
    assert r.headers["retry-after"] == "3"
    assert fcm_send(client, fcm_credentials.token, {"token": FCM_TOKEN}).status_code == 200


def test_oauth_token_requests_are_counted_and_checked(sandbox, client, tmp_path) -> None:
    info = sandbox.control.service_account("counted-project")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(sandbox.ca_pem)
    session = requests.Session()
    session.verify = str(ca_file)
    session.trust_env = False  # else REQUESTS_CA_BUNDLE from the environment overrides `verify`
    for _ in range(2):
        creds = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
            info, scopes=[FCM_SCOPE]
        )
        creds.refresh(google.auth.transport.requests.Request(session))
    session.close()
    assert sandbox.control.stats()["token_requests"] == 2
    # A wrong grant type and an assertion from an unregistered account are refused.
    r = client.post("/token", data={"grant_type": "password", "assertion": "x"})
    assert (r.status_code, r.json()["error"]) == (400, "unsupported_grant_type")
    stranger = dict(info, client_email="stranger@counted-project.iam.gserviceaccount.com")
    signer = crypt.RSASigner.from_service_account_info(stranger)  # type: ignore[no-untyped-call]
    now = int(time.time())
    claims = {"iss": stranger["client_email"], "aud": info["token_uri"], "scope": FCM_SCOPE,
              "iat": now, "exp": now + 3600}
    assertion = google_jwt.encode(signer, claims).decode()  # type: ignore[no-untyped-call]
    r = client.post("/token", data={"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                                    "assertion": assertion})
    assert (r.status_code, r.json()["error"]) == (400, "invalid_grant")
    assert sandbox.control.stats()["token_requests"] == 2


# --- control API, CLI, process ----------------------------------------------------------------

def test_control_api_rejects_malformed_requests(sandbox, client) -> None:
    r = client.post("/_sandbox/behaviour", json={"token": TOKEN, "status": "often"})
    assert r.status_code == 400
    r = client.post("/_sandbox/apns/keys", content=b"{not json")
    assert r.status_code == 400
    r = client.post("/_sandbox/apns/keys", json={"key_id": "K", "team_id": "T", "public_key_pem": "junk",
                                                 "topics": [BUNDLE]})
    assert r.status_code == 400
    assert client.get("/nowhere").status_code == 404


def test_pushes_cli_prints_recorded_pushes(sandbox, client, token_app) -> None:
    assert client.post(f"/3/device/{TOKEN}", content=VOIP_BODY,
                       headers=apns_headers(provider_jwt(token_app))).status_code == 200
    out = subprocess.run(
        [sys.executable, "-m", "pushsandbox", "pushes", "--url", sandbox.url,
         "--ca", str(sandbox.ca_path), "--token", TOKEN],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout
    [line] = out.splitlines()
    assert json.loads(line)["token"] == TOKEN


def test_sigterm_stops_cleanly_and_removes_its_dir() -> None:
    with sandbox_process() as handle:
        assert handle.control.stats()["apns_pushes"] == 0
        proc, directory = handle.proc, handle.directory
    assert proc.returncode == 0
    assert not directory.exists()


def test_ca_is_reused_from_the_directory(tmp_path) -> None:
    first = SandboxPki.load_or_create(tmp_path)
    second = SandboxPki.load_or_create(tmp_path)
    assert first.ca_pem == second.ca_pem
    assert first.server_cert_path.read_text() != ""
