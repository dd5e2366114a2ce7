"""FCM HTTP v1 (`POST /v1/projects/<p>/messages:send`) and the OAuth2 token endpoint.

References: Firebase "REST Resource: projects.messages" and "FcmError"; Google's OAuth2
service-account flow (RFC 7523 JWT bearer grant), as google-auth's
`service_account.Credentials.refresh` performs it: a form POST with `grant_type` and an RS256
`assertion` whose `aud` is Google's token URL (google-auth ignores `token_uri` for `aud`).
"""

from __future__ import annotations

import json
import re
import secrets
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

from pushlib.provider_limits import FCM_DATA_BYTES
from pushsandbox import jwts
from pushsandbox.state import Reply, SandboxState

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_SCOPES = frozenset(
    {"https://www.googleapis.com/auth/firebase.messaging", "https://www.googleapis.com/auth/cloud-platform"}
)
GOOGLE_TOKEN_URIS = frozenset(
    {"https://oauth2.googleapis.com/token", "https://www.googleapis.com/oauth2/v4/token"}
)
TOKEN_LIFETIME = 3600

_SEND_PATH = re.compile(r"/v1/projects/([^/]+)/messages:send")
_TTL = re.compile(r"\d+(\.\d{1,9})?s")
_FCM_TOKEN = re.compile(r"[A-Za-z0-9_\-:.]{1,4096}")
_RESERVED_DATA_KEYS = frozenset({"from", "notification", "message_type"})
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
DEFAULT_ERROR_CODES = {
    400: "INVALID_ARGUMENT",
    401: "THIRD_PARTY_AUTH_ERROR",
    403: "SENDER_ID_MISMATCH",
    404: "UNREGISTERED",
    429: "QUOTA_EXCEEDED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}

FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_JSON = (("content-type", "application/json; charset=UTF-8"),)


def is_send_path(path: str) -> bool:
    return _SEND_PATH.fullmatch(path) is not None


def _json_reply(status: int, body: Mapping[str, Any], extra: tuple[tuple[str, str], ...] = (),
                delay: float = 0.0) -> Reply:
    return Reply(status, _JSON + extra, json.dumps(body).encode(), delay)


def fcm_error(status: int, message: str, error_code: str | None = None, field: str | None = None,
              retry_after: float | None = None, delay: float = 0.0) -> Reply:
    """An error in Google's JSON format, with an FcmError detail when `error_code` is given and
    a BadRequest field violation when `field` names the offending field."""
    details: list[dict[str, Any]] = []
    if error_code is not None:
        details.append({"@type": FCM_ERROR_TYPE, "errorCode": error_code})
    if field is not None:
        details.append(
            {
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [{"field": field, "description": message}],
            }
        )
    status_name = _STATUS_NAMES.get(status, "UNKNOWN")
    error: dict[str, Any] = {"code": status, "message": message, "status": status_name}
    if details:
        error["details"] = details
    extra: tuple[tuple[str, str], ...] = ()
    if retry_after is not None:
        seconds = str(int(retry_after)) if float(retry_after).is_integer() else str(retry_after)
        extra = (("retry-after", seconds),)
    return _json_reply(status, {"error": error}, extra, delay)


# --- OAuth2 token endpoint -------------------------------------------------------------------

def _oauth_error(error: str, description: str) -> Reply:
    return _json_reply(400, {"error": error, "error_description": description})


def handle_token(state: SandboxState, method: str, content_type: str, body: bytes, own_uri: str) -> Reply:
    """Exchange a service account's signed assertion for an access token."""
    reply = _token(state, method, content_type, body, own_uri)
    state.count("token_requests" if reply.status == 200 else "token_errors")
    return reply


def _token(state: SandboxState, method: str, content_type: str, body: bytes, own_uri: str) -> Reply:
    if method != "POST":
        return _json_reply(405, {"error": "invalid_request", "error_description": "POST required"})
    if not content_type.startswith("application/x-www-form-urlencoded"):
        return _oauth_error("invalid_request", "form-encoded body required")
    try:
        form = urllib.parse.parse_qs(body.decode(), strict_parsing=True)
    except (UnicodeDecodeError, ValueError):
        return _oauth_error("invalid_request", "malformed form body")
    if form.get("grant_type") != [JWT_BEARER]:
        return _oauth_error("unsupported_grant_type", "Invalid grant_type")
    assertion = form.get("assertion", [""])
    if len(assertion) != 1 or not assertion[0]:
        return _oauth_error("invalid_request", "Missing required parameter: assertion")
    try:
        jwt = jwts.parse(assertion[0])
    except jwts.JwtError:
        return _oauth_error("invalid_grant", "Invalid JWT")
    account = state.accounts.get(str(jwt.claims.get("iss", "")))
    if account is None:
        return _oauth_error("invalid_grant", "Invalid grant: account not found")
    try:
        jwts.verify(jwt, account.public_key)
    except jwts.JwtError:
        return _oauth_error("invalid_grant", "Invalid JWT Signature.")
    if jwt.claims.get("aud") not in GOOGLE_TOKEN_URIS | {own_uri}:
        return _oauth_error("invalid_grant", "Invalid JWT: Failed audience check.")
    iat, exp, now = jwt.claims.get("iat"), jwt.claims.get("exp"), time.time()
    if (
        not isinstance(iat, int | float) or not isinstance(exp, int | float)
        or exp <= now or iat > now + 300 or exp - iat > TOKEN_LIFETIME
    ):
        return _oauth_error(
            "invalid_grant",
            "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe.",
        )
    scope = jwt.claims.get("scope")
    if not isinstance(scope, str) or not scope.split():
        return _oauth_error("invalid_scope", "Empty or missing scope not allowed.")
    token = state.issue_access_token(account, frozenset(scope.split()), TOKEN_LIFETIME)
    return _json_reply(200, {"access_token": token, "expires_in": TOKEN_LIFETIME, "token_type": "Bearer"})


# --- messages:send ---------------------------------------------------------------------------

def handle_send(
    state: SandboxState, method: str, path: str, headers: Mapping[str, str], body: bytes
) -> Reply:
    """Answer one FCM v1 send request."""
    state.count("fcm_requests")
    reply = _send(state, method, path, headers, body)
    if reply.status != 200:
        state.count("fcm_errors")
    return reply


def _send(
    state: SandboxState, method: str, path: str, headers: Mapping[str, str], body: bytes
) -> Reply:
    match = _SEND_PATH.fullmatch(path)
    if match is None:
        return fcm_error(404, "Requested entity was not found.")
    project = urllib.parse.unquote(match.group(1))
    if method != "POST":
        return fcm_error(405, "Method not allowed.")

    scheme, _, bearer = headers.get("authorization", "").partition(" ")
    granted = state.access_tokens.get(bearer.strip()) if scheme.lower() == "bearer" else None
    if granted is None or granted.expires_at <= time.time():
        return fcm_error(
            401,
            "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie "
            "or other valid authentication credential.",
        )
    if not granted.scopes & FCM_SCOPES:
        return fcm_error(403, "Request had insufficient authentication scopes.")
    if granted.project_id != project:
        return fcm_error(403, "SenderId mismatch", "SENDER_ID_MISMATCH")

    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return fcm_error(400, "Invalid JSON payload received.")
    message = document.get("message") if isinstance(document, dict) else None
    if not isinstance(message, dict):
        return fcm_error(400, "Request contains an invalid argument.", "INVALID_ARGUMENT", "message")

    targets = [k for k in ("token", "topic", "condition") if k in message]
    if len(targets) != 1:
        return fcm_error(400, "Exactly one of token, topic or condition must be set.", "INVALID_ARGUMENT",
                         "message")
    target = targets[0]
    token = message[target]
    if not isinstance(token, str) or (target == "token" and not _FCM_TOKEN.fullmatch(token)):
        return fcm_error(400, "The registration token is not a valid FCM registration token",
                         "INVALID_ARGUMENT", "message.token")

    size = 0
    data = message.get("data", {})
    if not isinstance(data, dict):
        return fcm_error(400, "Invalid value at 'message.data'.", "INVALID_ARGUMENT", "message.data")
    for key, value in data.items():
        if not isinstance(value, str):
            return fcm_error(400, f"Invalid value at 'message.data[{key}].value' (TYPE_STRING)",
                             "INVALID_ARGUMENT", f"message.data[{key}].value")
        if key in _RESERVED_DATA_KEYS or key.startswith(("google.", "gcm.")):
            return fcm_error(400, f"Invalid data payload key: {key}", "INVALID_ARGUMENT",
                             f"message.data[{key}]")
        size += len(key.encode()) + len(value.encode())
    notification = message.get("notification", {})
    if not isinstance(notification, dict):
        return fcm_error(400, "Invalid value at 'message.notification'.", "INVALID_ARGUMENT",
                         "message.notification")
    size += sum(len(str(v).encode()) for v in notification.values())
    if size > FCM_DATA_BYTES:
        return fcm_error(400, "Message is too big", "INVALID_ARGUMENT", "message")

    android = message.get("android", {})
    if not isinstance(android, dict):
        return fcm_error(400, "Invalid value at 'message.android'.", "INVALID_ARGUMENT", "message.android")
    priority = android.get("priority")
    if priority is not None and priority not in ("normal", "high", "NORMAL", "HIGH"):
        return fcm_error(400, f"Invalid value at 'message.android.priority' ({priority})",
                         "INVALID_ARGUMENT", "message.android.priority")
    ttl = android.get("ttl")
    if ttl is not None and (not isinstance(ttl, str) or not _TTL.fullmatch(ttl)):
        return fcm_error(400, "Invalid value at 'message.android.ttl' (google.protobuf.Duration)",
                         "INVALID_ARGUMENT", "message.android.ttl")

    behaviour = state.take_behaviour(token)
    if behaviour is not None and behaviour.status != 200:
        code = behaviour.reason or DEFAULT_ERROR_CODES.get(behaviour.status, "INTERNAL")
        field = "message.token" if code == "INVALID_ARGUMENT" else None
        return fcm_error(behaviour.status, f"sandbox behaviour: {code}", code, field,
                         behaviour.retry_after, behaviour.delay)

    message_id = f"projects/{project}/messages/0:{int(time.time() * 1000)}%{secrets.token_hex(8)}"
    state.record(
        {
            "provider": "fcm",
            "time": time.time(),
            "token": token,
            "topic": message.get("topic"),
            "push_type": None,
            "priority": priority.lower() if isinstance(priority, str) else None,
            "expiration": None,
            "ttl": ttl,
            "collapse_id": android.get("collapse_key"),
            "apns_id": None,
            "auth": "oauth",
            "project_id": project,
            "headers": {k: v for k, v in headers.items() if k != "authorization"},
            "payload": message,
            "name": message_id,
        }
    )
    return _json_reply(200, {"name": message_id}, delay=behaviour.delay if behaviour else 0.0)
