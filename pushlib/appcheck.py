"""Does an app's authentication work? One probe request to its provider host.

`check_app` opens a connection to the host the app's pushes go to (its custom host, Apple's
production or sandbox host, or FCM) with the app's own client (`ApnsClient` / `FcmClient`: the
same TLS trust, JWT or certificate, OAuth2 token as real pushes) and sends a request that a
provider can only refuse, and only after it authenticated the sender:

- APNs: `POST /3/device/<64 zeros>` with the app's topic and an empty body: a good key or
  certificate gets 400 (PayloadEmpty or BadDeviceToken); a bad one 403 (InvalidProviderToken,
  BadCertificate...), a key not entitled to the topic 400 TopicDisallowed.
- FCM: the OAuth2 token is fetched from the service account's `token_uri`, then `messages:send`
  with `validate_only` and an invalid token: a working account gets 400 INVALID_ARGUMENT; a bad
  one fails at the token endpoint, or gets 401/403 (SENDER_ID_MISMATCH...) or 404 (no such project).

Nothing reaches any device. `verdict` (pure) reads the provider's answer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from pushlib.apns import PRODUCTION_HOST, SANDBOX_HOST, ApnsClient, ApnsConfigError
from pushlib.fcm import FCM_HOST, FcmClient, FcmConfigError
from pushlib.logutil import get_logger
from pushlib.models import ApnsRequest, AppCredentials, FcmMessage, Outcome, Provider, PushResult

log = get_logger(__name__)

CHECK_TIMEOUT = 10.0
_PROBE_APNS_TOKEN = "0" * 64
_PROBE_FCM_TOKEN = "not a token: pushlib credentials check"


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    host: str
    status: int  # the provider's HTTP status, 0 when there was none
    reason: str  # the provider's reason / error code, or what went wrong before
    detail: str  # one sentence for operators

    def public(self) -> dict[str, Any]:
        return asdict(self)


def probe_host(app: AppCredentials) -> str:
    """Where the app's pushes go (the sandbox flag picks Apple's development host)."""
    if app.custom_host:
        return app.custom_host
    if app.provider is Provider.FCM:
        return FCM_HOST
    return SANDBOX_HOST if app.sandbox else PRODUCTION_HOST


def verdict(result: PushResult) -> tuple[bool, str]:
    """(authentication works, why) for the provider's answer to the probe."""
    if result.outcome is Outcome.CONFIG_ERROR:
        return False, f"the provider refused the credentials or configuration ({result.status} {result.reason})"
    if result.status == 0:
        return False, f"no answer from the provider: {result.reason}"
    if result.status == 200:
        return True, "the provider accepted the probe"
    if result.status == 429 or result.status >= 500:
        return False, f"the provider is busy or failing ({result.status} {result.reason}); try again"
    return True, f"authenticated: the provider refused only the probe itself ({result.status} {result.reason})"


async def check_app(app: AppCredentials, timeout: float = CHECK_TIMEOUT) -> CheckResult:
    """Probe the app's provider (see module doc). Never raises for provider or network trouble."""
    host = probe_host(app)
    client: ApnsClient | FcmClient
    try:
        client = ApnsClient(app, host) if app.provider is Provider.APNS else FcmClient(app, host)
    except (ApnsConfigError, FcmConfigError) as exc:
        return CheckResult(False, host, 0, "unusable credentials", str(exc))
    try:
        if isinstance(client, ApnsClient):
            request = ApnsRequest(_PROBE_APNS_TOKEN, {"apns-topic": app.app_id, "apns-push-type": "alert",
                                                      "apns-priority": "10"}, b"")
            result = await client.send(request, timeout)
        else:
            body = json.dumps({"validate_only": True, "message": {"token": _PROBE_FCM_TOKEN}}).encode()
            result = await client.send(FcmMessage(_PROBE_FCM_TOKEN, body), timeout)
    finally:
        await client.aclose()
    ok, detail = verdict(result)
    log.info("app check %s:%s host=%s ok=%s status=%s reason=%s", app.provider.value, app.app_id, host, ok,
             result.status, result.reason)
    return CheckResult(ok, host, result.status, result.reason, detail)
