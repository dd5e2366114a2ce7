"""What a provider's answer means for the dispatcher: pure tables, no I/O.

`classify_apns` and `classify_fcm` turn an HTTP status plus the provider's reason into a
`PushResult` whose `Outcome` tells the dispatcher what to do with the device and the job:

- DELIVERED: done.
- TOKEN_DEAD: the token will never work again: delete it.
- DEVICE_SUSPECT: the token looks wrong (e.g. APNs BadDeviceToken: often a sandbox token sent
  to production); keep the device but quarantine it.
- RETRYABLE: try again later (after `retry_after` seconds when the provider said so).
- CONFIG_ERROR: our credentials or app setup are wrong; retrying the same push cannot help.
- REJECTED: this request was wrong (payload too large, bad header); no retry, device kept.
"""

from __future__ import annotations

import json
import math
import time
from email.utils import parsedate_to_datetime

from pushlib.models import Outcome, PushResult

# APNs reasons that say our credentials / topic setup is wrong, whatever the status.
_APNS_CONFIG_REASONS = frozenset(
    {
        "BadTopic",
        "DeviceTokenNotForTopic",
        "TopicDisallowed",
        "MissingTopic",
        "BadCertificate",
        "BadCertificateEnvironment",
        "ExpiredProviderToken",
        "InvalidProviderToken",
        "MissingProviderToken",
        "Forbidden",
        "InvalidPushType",
    }
)

# FCM error codes (details[].errorCode, else error.status) mapped to outcomes.
_FCM_CODES: dict[str, Outcome] = {
    "UNREGISTERED": Outcome.TOKEN_DEAD,
    "SENDER_ID_MISMATCH": Outcome.CONFIG_ERROR,
    "THIRD_PARTY_AUTH_ERROR": Outcome.CONFIG_ERROR,
    "PERMISSION_DENIED": Outcome.CONFIG_ERROR,
    "UNAUTHENTICATED": Outcome.CONFIG_ERROR,
    "QUOTA_EXCEEDED": Outcome.RETRYABLE,
    "RESOURCE_EXHAUSTED": Outcome.RETRYABLE,
    "UNAVAILABLE": Outcome.RETRYABLE,
    "INTERNAL": Outcome.RETRYABLE,
    "UNSPECIFIED_ERROR": Outcome.RETRYABLE,
}

_MAX_RETRY_AFTER = 24 * 3600.0


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if absent/invalid."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER)


def classify_apns(status: int, reason: str, retry_after: str | None) -> PushResult:
    """Classify an APNs response (`reason` is the JSON body's "reason", "" if none)."""
    wait = parse_retry_after(retry_after)
    if status == 200:
        return PushResult(Outcome.DELIVERED, status, reason)
    if status == 410:
        return PushResult(Outcome.TOKEN_DEAD, status, reason or "Unregistered")
    if status == 400 and reason == "BadDeviceToken":
        return PushResult(Outcome.DEVICE_SUSPECT, status, reason)
    if status == 403 or reason in _APNS_CONFIG_REASONS:
        return PushResult(Outcome.CONFIG_ERROR, status, reason)
    if status == 429 or status >= 500:
        return PushResult(Outcome.RETRYABLE, status, reason, retry_after=wait)
    # 400 (PayloadEmpty, BadCollapseId ...), 404 BadPath, 405, 413 PayloadTooLarge and the rest:
    # the request itself was wrong.
    return PushResult(Outcome.REJECTED, status, reason)


def _fcm_error(body: bytes) -> tuple[str, bool]:
    """(error code, whether the error is about the message's token) from an FCM error body."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return "", False
    error = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(error, dict):
        return "", False
    code = ""
    about_token = False
    details = error.get("details")
    if isinstance(details, list):
        for item in details:
            if not isinstance(item, dict):
                continue
            if isinstance(item.get("errorCode"), str) and not code:
                code = item["errorCode"]
            violations = item.get("fieldViolations")
            if isinstance(violations, list):
                about_token = about_token or any(
                    isinstance(v, dict) and v.get("field") == "message.token" for v in violations
                )
    if not code and isinstance(error.get("status"), str):
        code = error["status"]
    message = error.get("message")
    if isinstance(message, str) and "registration token" in message.lower():
        about_token = True
    return code, about_token


def classify_fcm(status: int, body: bytes, retry_after: str | None) -> PushResult:
    """Classify an FCM v1 `messages:send` response; `provider_id` is the message name on success."""
    wait = parse_retry_after(retry_after)
    if status == 200:
        name: str | None = None
        try:
            doc = json.loads(body)
            if isinstance(doc, dict) and isinstance(doc.get("name"), str):
                name = doc["name"]
        except (ValueError, UnicodeDecodeError):
            pass
        return PushResult(Outcome.DELIVERED, status, provider_id=name)
    code, about_token = _fcm_error(body)
    outcome = _FCM_CODES.get(code)
    if outcome is Outcome.RETRYABLE or (outcome is None and (status == 429 or status >= 500)):
        return PushResult(Outcome.RETRYABLE, status, code, retry_after=wait)
    if outcome is not None:
        return PushResult(outcome, status, code)
    if status == 400 and code == "INVALID_ARGUMENT" and about_token:
        return PushResult(Outcome.TOKEN_DEAD, status, code)
    if status in (401, 403, 404):
        # 401/403: our OAuth token or service account is not allowed; 404 without
        # UNREGISTERED: the project (URL) does not exist.
        return PushResult(Outcome.CONFIG_ERROR, status, code)
    return PushResult(Outcome.REJECTED, status, code)
