"""FCM HTTP v1 client: one service account, one host, one HTTP/2 connection.

The OAuth2 access token is cached and refreshed `refresh_margin` seconds before it expires,
once for all concurrent pushes (an asyncio.Lock) and off the event loop (google-auth is
synchronous: it runs in a worker thread). The token endpoint is the service account's
`token_uri`; for a custom host (the sandbox) it is verified against app.ca_pem only. A 401 means
the token went stale early: refresh once and retry once.

`send` never raises for provider or network trouble: it returns a PushResult.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import ssl
from collections.abc import Mapping
from typing import Any

import google.auth.exceptions
import google.auth.transport
import httpx
from google.oauth2 import service_account

from pushlib.h2transport import H2Transport, client_ssl_context, origin_url
from pushlib.logutil import get_logger, token_prefix
from pushlib.models import AppCredentials, FcmMessage, Outcome, PushResult
from pushlib.outcomes import classify_fcm

log = get_logger(__name__)

FCM_HOST = "fcm.googleapis.com"
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
DEFAULT_REFRESH_MARGIN = 300.0
TOKEN_TIMEOUT = 10.0


class FcmConfigError(ValueError):
    """The app's service account JSON is missing or unusable."""


class _TokenResponse(google.auth.transport.Response):
    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    @property
    def status(self) -> int:
        return self._response.status_code

    @property
    def headers(self) -> Mapping[str, str]:
        return self._response.headers

    @property
    def data(self) -> bytes:
        return self._response.content


class _TokenRequest(google.auth.transport.Request):
    """google-auth's token fetch over httpx, so the trust store is ours to choose: the sandbox CA
    for a custom host, httpx's default (certifi) otherwise (no temp files, no REQUESTS_CA_BUNDLE surprises)."""

    def __init__(self, verify: ssl.SSLContext | bool) -> None:
        self._client = httpx.Client(verify=verify, trust_env=False, timeout=TOKEN_TIMEOUT)

    def __call__(self, url: str, method: str = "GET", body: Any = None, headers: Any = None,
                 timeout: float | None = None, **kwargs: Any) -> google.auth.transport.Response:
        try:
            response = self._client.request(method, url, content=body, headers=headers,
                                            timeout=timeout or TOKEN_TIMEOUT)
        except httpx.HTTPError as exc:
            raise google.auth.exceptions.TransportError(  # type: ignore[no-untyped-call]
                f"token endpoint: {exc.__class__.__name__}"
            ) from exc
        return _TokenResponse(response)

    def close(self) -> None:
        self._client.close()


def _utcnow() -> datetime.datetime:
    # google-auth keeps `expiry` as a naive UTC datetime.
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


class FcmClient:
    """Sends FCM v1 messages for one service account to one host ("host" or "host:port").

    Raises FcmConfigError at construction when the service account cannot be used.
    """

    def __init__(
        self, app: AppCredentials, host: str, *, refresh_margin: float = DEFAULT_REFRESH_MARGIN
    ) -> None:
        self.app = app
        self.host = host
        self._margin = datetime.timedelta(seconds=refresh_margin)
        try:
            info: Any = json.loads(app.fcm_service_account or "")
            if not isinstance(info, dict):
                raise ValueError("not a JSON object")
            self.project_id = str(info["project_id"])
            self._creds = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
                info, scopes=[FCM_SCOPE]
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise FcmConfigError(f"unusable FCM service account: {exc.__class__.__name__}") from None
        self._lock = asyncio.Lock()
        custom_ca = app.ca_pem if app.custom_host else None
        self._auth_request = _TokenRequest(ssl.create_default_context(cadata=custom_ca) if custom_ca else True)
        self._transport = H2Transport(client_ssl_context(app.ca_pem if app.custom_host else None))
        self._origin = httpx.URL(origin_url(host))
        self._path = f"/v1/projects/{self.project_id}/messages:send".encode()

    def _fresh_token(self) -> str | None:
        token: str | None = self._creds.token
        expiry: datetime.datetime | None = self._creds.expiry
        if token is None or (expiry is not None and expiry - self._margin <= _utcnow()):
            return None
        return token

    async def _access_token(self, stale: str | None = None) -> str:
        """A valid access token; `stale` is one the server refused (refresh unless already replaced)."""
        token = self._fresh_token()
        if token is not None and token != stale:
            return token
        async with self._lock:
            token = self._fresh_token()
            if token is None or token == stale:
                await asyncio.to_thread(self._creds.refresh, self._auth_request)
                token = self._creds.token
                if not token:
                    raise google.auth.exceptions.RefreshError(  # type: ignore[no-untyped-call]
                        "token endpoint returned no access token"
                    )
            return token

    async def send(self, message: FcmMessage, timeout: float) -> PushResult:
        """POST messages:send; the result says what happened (never raises for I/O trouble)."""
        result, used = await self._post(message, timeout, None)
        if result.status == 401 and used is not None:
            result, _ = await self._post(message, timeout, used)
        return result

    async def _post(
        self, message: FcmMessage, timeout: float, stale: str | None
    ) -> tuple[PushResult, str | None]:
        try:
            token = await asyncio.wait_for(self._access_token(stale), TOKEN_TIMEOUT)
        except TimeoutError:
            return PushResult(Outcome.RETRYABLE, 0, "oauth token timeout"), None
        except google.auth.exceptions.RefreshError as exc:
            # invalid_grant & co: the service account is wrong; a transient one says retryable.
            retryable = bool(getattr(exc, "retryable", False))
            outcome = Outcome.RETRYABLE if retryable else Outcome.CONFIG_ERROR
            log.warning("fcm oauth refresh failed app=%s: %s", self.app.app_id, exc.__class__.__name__)
            return PushResult(outcome, 0, "oauth refresh failed"), None
        except google.auth.exceptions.TransportError as exc:
            return PushResult(Outcome.RETRYABLE, 0, f"oauth transport error ({exc.__class__.__name__})"), None
        headers = [(b"authorization", b"Bearer " + token.encode()), (b"content-type", b"application/json")]
        try:
            response = await self._transport.request_raw(
                b"POST", self._origin, self._path, headers, message.body, timeout
            )
        except httpx.TimeoutException as exc:
            return PushResult(Outcome.RETRYABLE, 0, f"timeout ({exc.__class__.__name__})"), token
        except httpx.HTTPError as exc:
            reason = f"connection error ({exc.__class__.__name__}: {exc})"
            return PushResult(Outcome.RETRYABLE, 0, reason), token
        retry_after = response.header(b"retry-after")
        result = classify_fcm(
            response.status, response.content, retry_after.decode("latin-1") if retry_after is not None else None
        )
        if result.outcome is not Outcome.DELIVERED:
            log.debug(
                "fcm push app=%s token=%s status=%s reason=%s",
                self.app.app_id, token_prefix(message.token), result.status, result.reason,
            )
        return result, token

    async def aclose(self) -> None:
        await self._transport.aclose()
        self._auth_request.close()
