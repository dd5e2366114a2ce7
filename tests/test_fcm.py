"""FcmClient through ProviderPool against the sandbox FCM v1 API and its OAuth2 token endpoint."""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import replace

import pytest

from pushlib.fcm import FcmClient
from pushlib.models import AppCredentials, Device, FcmMessage, Outcome, Provider, PushParams, PushResult
from pushlib.providers import ProviderPool
from pushsandbox.process import SandboxHandle

pytestmark = pytest.mark.timeout(60)

PROJECT = "demo-project"


@pytest.fixture(scope="module")
def fcm_app(sandbox: SandboxHandle) -> AppCredentials:
    return sandbox.control.fcm_app(PROJECT)


def new_token() -> str:
    return "fcm-" + secrets.token_urlsafe(60)


def device_for(token: str) -> Device:
    return Device("sip:bob@example.com", "dev-" + token[4:12], PushParams(Provider.FCM, PROJECT, alert_token=token))


def message_for(token: str) -> FcmMessage:
    body = {
        "message": {
            "token": token,
            "data": {"type": "incomingCall", "call_id": "c-1", "caller_name": "Alice"},
            "android": {"priority": "high", "ttl": "30s"},
        }
    }
    return FcmMessage(token, json.dumps(body).encode())


def send_all(app: AppCredentials, tokens: list[str], *, timeout: float = 5.0) -> list[PushResult]:
    async def main() -> list[PushResult]:
        pool = ProviderPool()
        try:
            return list(
                await asyncio.gather(*(pool.send(app, device_for(t), message_for(t), timeout) for t in tokens))
            )
        finally:
            await pool.aclose()

    return asyncio.run(main())


def send_one(app: AppCredentials, token: str, *, timeout: float = 5.0) -> PushResult:
    return send_all(app, [token], timeout=timeout)[0]


def test_hundred_concurrent_pushes_need_one_token_request(sbx: SandboxHandle, fcm_app: AppCredentials) -> None:
    tokens = [new_token() for _ in range(100)]
    results = send_all(fcm_app, tokens)
    assert [r.outcome for r in results] == [Outcome.DELIVERED] * 100
    assert all(r.provider_id and r.provider_id.startswith(f"projects/{PROJECT}/messages/") for r in results)
    assert sbx.control.stats()["token_requests"] == 1
    records = {p["token"]: p for p in sbx.control.pushes()}
    assert set(records) == set(tokens)
    record = records[tokens[0]]
    assert (record["auth"], record["project_id"], record["priority"]) == ("oauth", PROJECT, "high")
    assert record["payload"]["data"]["caller_name"] == "Alice"


def test_unregistered_token_is_dead(sbx: SandboxHandle, fcm_app: AppCredentials) -> None:
    token = new_token()
    sbx.control.set_behaviour(token, 404, "UNREGISTERED")
    result = send_one(fcm_app, token)
    assert (result.outcome, result.status, result.reason) == (Outcome.TOKEN_DEAD, 404, "UNREGISTERED")


def test_malformed_token_is_dead(sbx: SandboxHandle, fcm_app: AppCredentials) -> None:
    result = send_one(fcm_app, "not a token!")
    assert (result.outcome, result.status, result.reason) == (Outcome.TOKEN_DEAD, 400, "INVALID_ARGUMENT")


def test_wrong_project_is_config_error(sbx: SandboxHandle, fcm_app: AppCredentials) -> None:
    account = json.loads(fcm_app.fcm_service_account or "")
    account["project_id"] = "someone-elses-project"
    app = replace(fcm_app, fcm_service_account=json.dumps(account))
    result = send_one(app, new_token())
    assert (result.outcome, result.status, result.reason) == (Outcome.CONFIG_ERROR, 403, "SENDER_ID_MISMATCH")


def test_unknown_service_account_is_config_error(sbx: SandboxHandle, fcm_app: AppCredentials) -> None:
    account = json.loads(fcm_app.fcm_service_account or "")
    account["client_email"] = "nobody@demo-project.iam.gserviceaccount.com"
    result = send_one(replace(fcm_app, fcm_service_account=json.dumps(account)), new_token())
    assert result.outcome is Outcome.CONFIG_ERROR
    assert result.reason == "oauth refresh failed"
    assert sbx.control.pushes() == []


def test_quota_exceeded_is_retryable_with_retry_after(sbx: SandboxHandle, fcm_app: AppCredentials) -> None:
    token = new_token()
    sbx.control.set_behaviour(token, 429, "QUOTA_EXCEEDED", retry_after=12)
    result = send_one(fcm_app, token)
    assert (result.outcome, result.reason, result.retry_after) == (Outcome.RETRYABLE, "QUOTA_EXCEEDED", 12.0)


def test_slow_provider_times_out_as_retryable(sbx: SandboxHandle, fcm_app: AppCredentials) -> None:
    token = new_token()
    sbx.control.set_behaviour(token, 200, delay=3.0)
    result = send_one(fcm_app, token, timeout=0.3)
    assert result.outcome is Outcome.RETRYABLE
    assert result.reason.startswith("timeout")


def test_401_refreshes_the_token_once_and_retries(sbx: SandboxHandle, fcm_app: AppCredentials) -> None:
    token = new_token()
    sbx.control.set_behaviour(token, 401, "UNAUTHENTICATED", times=1)
    result = send_one(fcm_app, token)
    assert result.outcome is Outcome.DELIVERED
    assert sbx.control.stats()["token_requests"] == 2
    assert len(sbx.control.pushes(token)) == 1


def test_401_twice_is_config_error(sbx: SandboxHandle, fcm_app: AppCredentials) -> None:
    token = new_token()
    sbx.control.set_behaviour(token, 401, "UNAUTHENTICATED")
    result = send_one(fcm_app, token)
    assert (result.outcome, result.status) == (Outcome.CONFIG_ERROR, 401)
    assert sbx.control.stats()["token_requests"] == 2


def test_token_is_refreshed_before_it_expires(sbx: SandboxHandle, fcm_app: AppCredentials) -> None:
    host = fcm_app.custom_host or ""

    async def pushes(margin: float) -> list[Outcome]:
        client = FcmClient(fcm_app, host, refresh_margin=margin)
        try:
            return [(await client.send(message_for(new_token()), 5.0)).outcome for _ in range(2)]
        finally:
            await client.aclose()

    # A margin of 0: the one-hour token serves both pushes.
    assert asyncio.run(pushes(0.0)) == [Outcome.DELIVERED] * 2
    assert sbx.control.stats()["token_requests"] == 1
    # A margin longer than the token's life: it is always "about to expire", so each push refreshes.
    assert asyncio.run(pushes(7200.0)) == [Outcome.DELIVERED] * 2
    assert sbx.control.stats()["token_requests"] == 3


def test_bad_service_account_json_is_config_error(fcm_app: AppCredentials) -> None:
    result = send_one(replace(fcm_app, fcm_service_account="{not json"), new_token())
    assert result.outcome is Outcome.CONFIG_ERROR
