"""The classification tables: provider answer -> Outcome (pure, table-driven)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from pushlib.models import Outcome
from pushlib.outcomes import classify_apns, classify_fcm, parse_retry_after

APNS_CASES = [
    (200, "", Outcome.DELIVERED),
    (410, "Unregistered", Outcome.TOKEN_DEAD),
    (410, "ExpiredToken", Outcome.TOKEN_DEAD),
    (400, "BadDeviceToken", Outcome.DEVICE_SUSPECT),
    (400, "BadTopic", Outcome.CONFIG_ERROR),
    (400, "DeviceTokenNotForTopic", Outcome.CONFIG_ERROR),
    (400, "TopicDisallowed", Outcome.CONFIG_ERROR),
    (400, "MissingTopic", Outcome.CONFIG_ERROR),
    (403, "InvalidProviderToken", Outcome.CONFIG_ERROR),
    (403, "ExpiredProviderToken", Outcome.CONFIG_ERROR),
    (403, "BadCertificate", Outcome.CONFIG_ERROR),
    (403, "BadCertificateEnvironment", Outcome.CONFIG_ERROR),
    (403, "MissingProviderToken", Outcome.CONFIG_ERROR),
    (400, "PayloadEmpty", Outcome.REJECTED),
    (400, "BadCollapseId", Outcome.REJECTED),
    (400, "BadPriority", Outcome.REJECTED),
    (404, "BadPath", Outcome.REJECTED),
    (405, "MethodNotAllowed", Outcome.REJECTED),
    (413, "PayloadTooLarge", Outcome.REJECTED),
    (429, "TooManyRequests", Outcome.RETRYABLE),
    (429, "TooManyProviderTokenUpdates", Outcome.RETRYABLE),
    (500, "InternalServerError", Outcome.RETRYABLE),
    (503, "ServiceUnavailable", Outcome.RETRYABLE),
    (503, "Shutdown", Outcome.RETRYABLE),
    (502, "", Outcome.RETRYABLE),
]


@pytest.mark.parametrize(("status", "reason", "outcome"), APNS_CASES)
def test_classify_apns_table(status: int, reason: str, outcome: Outcome) -> None:
    result = classify_apns(status, reason, None)
    assert result.outcome is outcome
    assert result.status == status
    assert result.reason == (reason or ("Unregistered" if status == 410 else ""))


def test_apns_retry_after_seconds_on_retryable_only() -> None:
    assert classify_apns(429, "TooManyRequests", "7").retry_after == 7.0
    assert classify_apns(503, "ServiceUnavailable", " 2.5 ").retry_after == 2.5
    assert classify_apns(410, "Unregistered", "7").retry_after is None


def _fcm_body(status: str, code: str | None = None, violations: list[str] | None = None, message: str = "") -> bytes:
    details: list[dict[str, object]] = []
    if code is not None:
        details.append({"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code})
    if violations:
        details.append(
            {
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [{"field": f, "description": "bad"} for f in violations],
            }
        )
    return json.dumps({"error": {"code": 0, "message": message, "status": status, "details": details}}).encode()


FCM_CASES = [
    (404, _fcm_body("NOT_FOUND", "UNREGISTERED"), Outcome.TOKEN_DEAD, "UNREGISTERED"),
    (400, _fcm_body("INVALID_ARGUMENT", "INVALID_ARGUMENT", ["message.token"]), Outcome.TOKEN_DEAD, "INVALID_ARGUMENT"),
    (
        400,
        _fcm_body("INVALID_ARGUMENT", None, None, "The registration token is not a valid FCM registration token"),
        Outcome.TOKEN_DEAD,
        "INVALID_ARGUMENT",
    ),
    (400, _fcm_body("INVALID_ARGUMENT", "INVALID_ARGUMENT", ["message.data"]), Outcome.REJECTED, "INVALID_ARGUMENT"),
    (403, _fcm_body("PERMISSION_DENIED", "SENDER_ID_MISMATCH"), Outcome.CONFIG_ERROR, "SENDER_ID_MISMATCH"),
    (401, _fcm_body("UNAUTHENTICATED", "THIRD_PARTY_AUTH_ERROR"), Outcome.CONFIG_ERROR, "THIRD_PARTY_AUTH_ERROR"),
    (403, _fcm_body("PERMISSION_DENIED"), Outcome.CONFIG_ERROR, "PERMISSION_DENIED"),
    (404, _fcm_body("NOT_FOUND"), Outcome.CONFIG_ERROR, "NOT_FOUND"),
    (429, _fcm_body("RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"), Outcome.RETRYABLE, "QUOTA_EXCEEDED"),
    (500, _fcm_body("INTERNAL", "INTERNAL"), Outcome.RETRYABLE, "INTERNAL"),
    (503, _fcm_body("UNAVAILABLE", "UNAVAILABLE"), Outcome.RETRYABLE, "UNAVAILABLE"),
    (502, b"<html>bad gateway</html>", Outcome.RETRYABLE, ""),
    (400, b"not json", Outcome.REJECTED, ""),
]


@pytest.mark.parametrize(("status", "body", "outcome", "reason"), FCM_CASES)
def test_classify_fcm_table(status: int, body: bytes, outcome: Outcome, reason: str) -> None:
    result = classify_fcm(status, body, None)
    assert result.outcome is outcome
    assert result.status == status
    assert result.reason == reason


def test_fcm_success_carries_message_name() -> None:
    result = classify_fcm(200, b'{"name": "projects/p/messages/0:1"}', None)
    assert result.outcome is Outcome.DELIVERED
    assert result.provider_id == "projects/p/messages/0:1"


def test_fcm_quota_retry_after() -> None:
    result = classify_fcm(429, _fcm_body("RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"), "30")
    assert result.outcome is Outcome.RETRYABLE
    assert result.retry_after == 30.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", None), ("abc", None), ("-5", 0.0), ("12", 12.0), ("nan", None), ("1e12", 86400.0)],
)
def test_parse_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_http_date() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    value = format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(value, now=now.timestamp()) == pytest.approx(90.0)
