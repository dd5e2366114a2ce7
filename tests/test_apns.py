"""ApnsClient through ProviderPool against the sandbox APNs (real HTTP/2 + TLS on loopback)."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import replace
from typing import Any

import pytest

from pushlib.models import ApnsRequest, AppCredentials, Device, FcmMessage, Outcome, Provider, PushParams, PushResult
from pushlib.providers import ProviderPool, credentials_fingerprint, provider_host
from pushsandbox.process import SandboxHandle

pytestmark = pytest.mark.timeout(60)

BUNDLE = "com.example.app"


@pytest.fixture(scope="module")
def token_app(sandbox: SandboxHandle) -> AppCredentials:
    return sandbox.control.apns_token_app(BUNDLE)


def new_token() -> str:
    return secrets.token_hex(32)


def device_for(token: str, app_id: str = BUNDLE) -> Device:
    return Device("sip:alice@example.com", "dev-" + token[:8], PushParams(Provider.APNS, app_id, alert_token=token))


def request_for(token: str, *, topic: str = BUNDLE, push_type: str = "alert", size: int = 0) -> ApnsRequest:
    payload: dict[str, object] = {"aps": {"alert": {"title": "Missed Call", "body": "Bob"}}}
    if size:
        payload["pad"] = "p" * (size - len(json.dumps({**payload, "pad": ""}).encode()))
    return ApnsRequest(
        token=token,
        headers={
            "apns-topic": topic,
            "apns-push-type": push_type,
            "apns-priority": "10",
            "apns-expiration": "0",
            "apns-id": str(uuid.uuid4()),
        },
        payload=json.dumps(payload).encode(),
    )


def send(app: AppCredentials, token: str, request: ApnsRequest | None = None, *, timeout: float = 5.0,
         pool: ProviderPool | None = None) -> PushResult:
    async def main() -> PushResult:
        p = pool or ProviderPool()
        try:
            return await p.send(app, device_for(token, app.app_id), request or request_for(token), timeout)
        finally:
            if pool is None:
                await p.aclose()

    return asyncio.run(main())


def test_hundred_pushes_share_one_jwt_and_arrive_with_their_headers(sbx: SandboxHandle, token_app: AppCredentials):
    tokens = [new_token() for _ in range(100)]
    requests = [request_for(t) for t in tokens]

    async def main() -> Any:
        pool = ProviderPool()
        try:
            return await asyncio.gather(
                *(pool.send(token_app, device_for(t), r, 5.0) for t, r in zip(tokens, requests, strict=True))
            )
        finally:
            await pool.aclose()

    results = asyncio.run(main())
    assert [r.outcome for r in results] == [Outcome.DELIVERED] * 100
    assert [r.provider_id for r in results] == [r.headers["apns-id"] for r in requests]
    assert len(sbx.control.stats()["apns_jwts"]) == 1
    records = {p["token"]: p for p in sbx.control.pushes()}
    assert set(records) == set(tokens)
    first = records[tokens[0]]
    assert (first["auth"], first["topic"], first["push_type"], first["priority"]) == ("token", BUNDLE, "alert", 10)
    assert first["apns_id"] == requests[0].headers["apns-id"]
    assert first["payload"] == json.loads(requests[0].payload)


def test_certificate_auth(sbx: SandboxHandle) -> None:
    app = sbx.control.apns_cert_app("com.example.certapp")
    token = new_token()
    result = send(app, token, request_for(token, topic="com.example.certapp"))
    assert result.outcome is Outcome.DELIVERED
    [record] = sbx.control.pushes(token)
    assert record["auth"] == "cert"


@pytest.mark.parametrize(
    ("status", "reason", "outcome"),
    [
        (410, "Unregistered", Outcome.TOKEN_DEAD),
        (400, "BadDeviceToken", Outcome.DEVICE_SUSPECT),
        (500, "InternalServerError", Outcome.RETRYABLE),
        (413, "PayloadTooLarge", Outcome.REJECTED),
    ],
)
def test_provider_errors_are_classified(sbx: SandboxHandle, token_app: AppCredentials, status: int, reason: str,
                                        outcome: Outcome) -> None:
    token = new_token()
    sbx.control.set_behaviour(token, status, reason)
    result = send(token_app, token)
    assert (result.outcome, result.status, result.reason) == (outcome, status, reason)


def test_429_with_retry_after_is_retryable(sbx: SandboxHandle, token_app: AppCredentials) -> None:
    token = new_token()
    sbx.control.set_behaviour(token, 429, "TooManyRequests", retry_after=30)
    result = send(token_app, token)
    assert result.outcome is Outcome.RETRYABLE
    assert result.retry_after == 30.0


def test_slow_provider_times_out_as_retryable(sbx: SandboxHandle, token_app: AppCredentials) -> None:
    token = new_token()
    sbx.control.set_behaviour(token, 200, delay=3.0)
    result = send(token_app, token, timeout=0.3)
    assert result.outcome is Outcome.RETRYABLE
    assert result.reason.startswith("timeout")


def test_topic_not_allowed_for_key_is_config_error(sbx: SandboxHandle, token_app: AppCredentials) -> None:
    token = new_token()
    result = send(token_app, token, request_for(token, topic="com.other.app"))
    assert result.outcome is Outcome.CONFIG_ERROR
    assert result.reason == "TopicDisallowed"


def test_oversized_payload_is_rejected_without_a_request(sbx: SandboxHandle, token_app: AppCredentials) -> None:
    token = new_token()
    alert = send(token_app, token, request_for(token, size=4097))
    assert (alert.outcome, alert.reason) == (Outcome.REJECTED, "PayloadTooLarge")
    assert sbx.control.pushes(token) == []
    voip_app = token_app  # the sandbox key allows the bundle's .voip topic too
    voip = send(voip_app, token, request_for(token, topic=BUNDLE + ".voip", push_type="voip", size=5000))
    assert voip.outcome is Outcome.DELIVERED
    assert len(sbx.control.pushes(token)) == 1


class _Clock:
    def __init__(self, offset: float) -> None:
        self.offset = offset

    def __call__(self) -> float:
        return time.time() + self.offset


def test_expired_provider_token_is_regenerated_once_and_retried(sbx: SandboxHandle, token_app: AppCredentials):
    clock = _Clock(-7200.0)  # the first JWT is two hours old: the sandbox says ExpiredProviderToken
    token = new_token()

    async def main() -> Any:
        pool = ProviderPool(clock=clock)
        try:
            await pool.send(token_app, device_for(token), request_for(token), 5.0)  # mints the stale JWT
            clock.offset = 0.0
            return await pool.send(token_app, device_for(token), request_for(token), 5.0)
        finally:
            await pool.aclose()

    # First push: stale JWT, regenerated with the (still wrong) clock -> CONFIG_ERROR after one retry.
    # Second push: cached JWT refused again, regenerated with the right clock -> delivered.
    result = asyncio.run(main())
    assert result.outcome is Outcome.DELIVERED
    assert len(sbx.control.stats()["apns_jwts"]) == 3
    assert len(sbx.control.pushes(token)) == 1


def test_expired_provider_token_twice_is_config_error(sbx: SandboxHandle, token_app: AppCredentials) -> None:
    token = new_token()

    async def main() -> Any:
        pool = ProviderPool(clock=_Clock(-7200.0))
        try:
            return await pool.send(token_app, device_for(token), request_for(token), 5.0)
        finally:
            await pool.aclose()

    result = asyncio.run(main())
    assert (result.outcome, result.status, result.reason) == (Outcome.CONFIG_ERROR, 403, "ExpiredProviderToken")
    assert len(sbx.control.stats()["apns_jwts"]) == 2  # the stale one and exactly one regeneration


def test_jwt_is_renewed_after_its_ttl(sbx: SandboxHandle, token_app: AppCredentials) -> None:
    clock = _Clock(0.0)
    token = new_token()

    async def main() -> Any:
        pool = ProviderPool(clock=clock, jwt_ttl=20 * 60)
        try:
            outcomes = [(await pool.send(token_app, device_for(token), request_for(token), 5.0)).outcome]
            clock.offset = 19 * 60
            outcomes.append((await pool.send(token_app, device_for(token), request_for(token), 5.0)).outcome)
            clock.offset = 21 * 60  # past the TTL: a new JWT (the sandbox accepts iat slightly ahead)
            outcomes.append((await pool.send(token_app, device_for(token), request_for(token), 5.0)).outcome)
            return outcomes
        finally:
            await pool.aclose()

    assert asyncio.run(main()) == [Outcome.DELIVERED] * 3
    assert len(sbx.control.stats()["apns_jwts"]) == 2


def test_replacing_credentials_makes_a_new_client(sbx: SandboxHandle, token_app: AppCredentials) -> None:
    rotated = sbx.control.apns_token_app(BUNDLE)
    token = new_token()

    async def main() -> Any:
        pool = ProviderPool()
        try:
            first = await pool.send(token_app, device_for(token), request_for(token), 5.0)
            second = await pool.send(rotated, device_for(token), request_for(token), 5.0)
            keys = [key[2] for key in pool._clients]
            return first.outcome, second.outcome, keys
        finally:
            await pool.aclose()

    first, second, keys = asyncio.run(main())
    assert (first, second) == (Outcome.DELIVERED, Outcome.DELIVERED)
    assert keys == [credentials_fingerprint(rotated)]  # the replaced client was closed and dropped
    assert len(sbx.control.stats()["apns_jwts"]) == 2  # one JWT per key


def test_unusable_or_mismatched_apps_are_config_errors(sbx: SandboxHandle, token_app: AppCredentials) -> None:
    token = new_token()
    assert send(replace(token_app, enabled=False), token).outcome is Outcome.CONFIG_ERROR
    assert send(replace(token_app, apns_key_pem="not a key"), token).outcome is Outcome.CONFIG_ERROR
    no_creds = AppCredentials(Provider.APNS, BUNDLE, custom_host=token_app.custom_host, ca_pem=token_app.ca_pem)
    assert send(no_creds, token).outcome is Outcome.CONFIG_ERROR

    async def wrong_kind() -> PushResult:
        pool = ProviderPool()
        try:
            return await pool.send(token_app, device_for(token), FcmMessage(token, b"{}"), 5.0)
        finally:
            await pool.aclose()

    assert asyncio.run(wrong_kind()).outcome is Outcome.CONFIG_ERROR
    assert sbx.control.pushes(token) == []


def test_unreachable_provider_is_retryable(token_app: AppCredentials) -> None:
    from tests.support import free_port

    app = replace(token_app, custom_host=f"127.0.0.1:{free_port()}")
    result = send(app, new_token())
    assert result.outcome is Outcome.RETRYABLE
    assert "ConnectError" in result.reason


def test_host_choice() -> None:
    app = AppCredentials(Provider.APNS, BUNDLE)
    assert provider_host(app, device_for("ab")) == "api.push.apple.com"
    sandbox_device = Device("sip:a@b", "d", PushParams(Provider.APNS, BUNDLE, alert_token="ab", sandbox=True))
    assert provider_host(app, sandbox_device) == "api.sandbox.push.apple.com"
    assert provider_host(replace(app, sandbox=True), device_for("ab")) == "api.sandbox.push.apple.com"
    assert provider_host(replace(app, custom_host="127.0.0.1:9"), sandbox_device) == "127.0.0.1:9"
    assert provider_host(AppCredentials(Provider.FCM, "proj"), device_for("ab")) == "fcm.googleapis.com"
