"""The APNs provider API (`POST /3/device/<token>`), checked as Apple documents it.

Reference: Apple, "Sending notification requests to APNs" and "Handling notification
responses from APNs". Checks run in Apple's order: request line, authentication, topic,
headers, payload; a scripted behaviour applies only to requests that pass them all.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

from pushlib.apns import PRODUCTION_HOST, SANDBOX_HOST
from pushlib.h2transport import split_host
from pushlib.provider_limits import (
    APNS_COLLAPSE_ID_BYTES,
    APNS_PAYLOAD_BYTES,
    APNS_TOKEN_MAX_HEX,
    APNS_TOKEN_MIN_HEX,
    APNS_VOIP_PAYLOAD_BYTES,
)
from pushsandbox.state import ProviderJwt, Reply, SandboxState

PATH_PREFIX = "/3/device/"

# Apple's APNs hosts and the environment each one is: a client picks the environment by the host.
APNS_ENVIRONMENTS = {PRODUCTION_HOST: "production", SANDBOX_HOST: "development"}
PROVIDER_TOKEN_LIFETIME = 3600.0

_HEX_TOKEN = re.compile(f"[0-9a-fA-F]{{{APNS_TOKEN_MIN_HEX},{APNS_TOKEN_MAX_HEX}}}")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")

# push type -> the topic suffix Apple requires for it ("" = the bare bundle id).
PUSH_TYPE_SUFFIX: dict[str, str] = {
    "alert": "",
    "background": "",
    "mdm": "",
    "widgets": ".push-type.widgets",
    "voip": ".voip",
    "complication": ".complication",
    "fileprovider": ".pushkit.fileprovider",
    "location": ".location-query",
    "liveactivity": ".push-type.liveactivity",
    "pushtotalk": ".voip-ptt",
}
_TOPIC_SUFFIXES = frozenset(s for s in PUSH_TYPE_SUFFIX.values() if s)

DEFAULT_REASONS = {
    400: "BadDeviceToken",
    403: "InvalidProviderToken",
    404: "BadPath",
    405: "MethodNotAllowed",
    410: "Unregistered",
    413: "PayloadTooLarge",
    429: "TooManyRequests",
    500: "InternalServerError",
    503: "ServiceUnavailable",
}


def _error(status: int, reason: str, apns_id: str, retry_after: float | None = None,
           delay: float = 0.0) -> Reply:
    body: dict[str, Any] = {"reason": reason}
    if status == 410:
        body["timestamp"] = int(time.time() * 1000)  # Apple: milliseconds since the epoch
    headers: list[tuple[str, str]] = [("apns-id", apns_id), ("content-type", "application/json")]
    if retry_after is not None:
        headers.append(("retry-after", _format_seconds(retry_after)))
    return Reply(status, tuple(headers), json.dumps(body).encode(), delay)


def _format_seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def environment_of(authority: str | None) -> str | None:
    """"production" or "development" when the request named one of Apple's APNs hosts
    (`:authority` / `Host`, port ignored), None when it named the sandbox by its own address."""
    if not authority:
        return None
    try:
        host, _ = split_host(authority)
    except ValueError:
        return None
    return APNS_ENVIRONMENTS.get(host.rstrip(".").lower())


def bundle_of(topic: str) -> str:
    """The bundle id a topic belongs to (`com.x.voip` -> `com.x`)."""
    for suffix in _TOPIC_SUFFIXES:
        if topic.endswith(suffix):
            return topic[: -len(suffix)]
    return topic


def _topic_allowed(topic: str, bundles: frozenset[str]) -> bool:
    return topic in bundles or bundle_of(topic) in bundles


def handle_apns(
    state: SandboxState,
    method: str,
    path: str,
    headers: Mapping[str, str],
    duplicated: frozenset[str],
    body: bytes,
    cert_bundle: str | None,
) -> Reply:
    """Answer one APNs request. `headers` are lower-cased, `duplicated` names the header
    names sent more than once, `cert_bundle` is the UID of a verified client certificate."""
    state.count("apns_requests")
    reply = _check_and_record(state, method, path, headers, duplicated, body, cert_bundle)
    if reply.status != 200:
        state.count("apns_errors")
    return reply


def _check_and_record(
    state: SandboxState,
    method: str,
    path: str,
    headers: Mapping[str, str],
    duplicated: frozenset[str],
    body: bytes,
    cert_bundle: str | None,
) -> Reply:
    raw_id = headers.get("apns-id")
    apns_id = raw_id if raw_id is not None else str(uuid.uuid4()).upper()

    if not path.startswith(PATH_PREFIX):
        return _error(404, "BadPath", apns_id)
    if method != "POST":
        return _error(405, "MethodNotAllowed", apns_id)
    token = path[len(PATH_PREFIX):]
    if not token:
        return _error(400, "MissingDeviceToken", apns_id)
    if not _HEX_TOKEN.fullmatch(token) or len(token) % 2:
        return _error(400, "BadDeviceToken", apns_id)
    if any(name.startswith("apns-") or name == "authorization" for name in duplicated):
        return _error(400, "DuplicateHeaders", apns_id)

    # Authentication: a provider token when one is sent, else the client certificate.
    authorization = headers.get("authorization")
    topic = headers.get("apns-topic")
    if authorization is not None:
        scheme, _, jwt_string = authorization.partition(" ")
        if scheme.lower() != "bearer" or not jwt_string.strip():
            return _error(403, "InvalidProviderToken", apns_id)
        checked = state.check_provider_jwt(jwt_string.strip())
        if isinstance(checked, str):
            return _error(403, checked, apns_id)
        if time.time() - checked.issued_at > PROVIDER_TOKEN_LIFETIME:
            return _error(403, "ExpiredProviderToken", apns_id)
        auth = "token"
        if not topic:
            return _error(400, "MissingTopic", apns_id)
        if not _topic_allowed(topic, _key_bundles(checked)):
            return _error(400, "TopicDisallowed", apns_id)
    elif cert_bundle is not None:
        auth = "cert"
        if not topic:
            topic = cert_bundle  # Apple infers the topic from a single-topic certificate
        if bundle_of(topic) != cert_bundle:
            return _error(400, "TopicDisallowed", apns_id)
    else:
        return _error(403, "MissingProviderToken", apns_id)

    push_type = headers.get("apns-push-type", "alert")
    suffix = PUSH_TYPE_SUFFIX.get(push_type)
    if suffix is None:
        return _error(400, "InvalidPushType", apns_id)
    topic_suffix = topic[len(bundle_of(topic)):]
    if topic_suffix != suffix:
        return _error(400, "InvalidPushType", apns_id)

    raw_priority = headers.get("apns-priority", "10")
    if raw_priority not in ("1", "5", "10"):
        return _error(400, "BadPriority", apns_id)
    priority = int(raw_priority)
    if push_type == "background" and priority != 5:
        return _error(400, "BadPriority", apns_id)

    expiration: int | None = None
    if "apns-expiration" in headers:
        raw_expiration = headers["apns-expiration"]
        if not raw_expiration.isdigit():
            return _error(400, "BadExpirationDate", apns_id)
        expiration = int(raw_expiration)

    if raw_id is not None and not _UUID.fullmatch(raw_id):
        return _error(400, "BadMessageId", str(uuid.uuid4()).upper())
    collapse_id = headers.get("apns-collapse-id")
    if collapse_id is not None and len(collapse_id.encode()) > APNS_COLLAPSE_ID_BYTES:
        return _error(400, "BadCollapseId", apns_id)

    if not body:
        return _error(400, "PayloadEmpty", apns_id)
    limit = APNS_VOIP_PAYLOAD_BYTES if push_type == "voip" else APNS_PAYLOAD_BYTES
    if len(body) > limit:
        return _error(413, "PayloadTooLarge", apns_id)
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return _error(400, "BadPayload", apns_id)
    if not isinstance(payload, dict):
        return _error(400, "BadPayload", apns_id)
    aps = payload.get("aps")
    if (aps is not None and not isinstance(aps, dict)) or (push_type == "alert" and aps is None):
        return _error(400, "BadPayload", apns_id)

    behaviour = state.take_behaviour(token)
    if behaviour is not None and behaviour.status != 200:
        reason = behaviour.reason or DEFAULT_REASONS.get(behaviour.status, "InternalServerError")
        return _error(behaviour.status, reason, apns_id, behaviour.retry_after, behaviour.delay)

    state.record(
        {
            "provider": "apns",
            "time": time.time(),
            "token": token,
            "topic": topic,
            "push_type": push_type,
            "priority": priority,
            "expiration": expiration,
            "collapse_id": collapse_id,
            "apns_id": apns_id,
            "auth": auth,
            "authority": headers.get("host"),
            "environment": environment_of(headers.get("host")),
            "project_id": None,
            "headers": {k: v for k, v in headers.items() if k != "authorization"},
            "payload": payload,
        }
    )
    return Reply(200, (("apns-id", apns_id),), b"", behaviour.delay if behaviour else 0.0)


def _key_bundles(jwt: ProviderJwt) -> frozenset[str]:
    return jwt.key.topics
