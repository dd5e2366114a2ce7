"""APNs provider-API client: one app's credentials, one host, one HTTP/2 connection.

Token auth: an ES256 JWT (header kid = key id, claims iss = team id, iat) signed once and
reused for `jwt_ttl` seconds (Apple wants 20–60 min: more often → 429
TooManyProviderTokenUpdates, older than 1 h → 403 ExpiredProviderToken). On 403
ExpiredProviderToken the JWT is regenerated once and the push retried once; a second one is
a CONFIG_ERROR. Certificate auth: the client certificate goes into the TLS context.

`send` never raises for provider or network trouble: it returns a PushResult.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import google.auth.crypt.es
import google.auth.crypt.es256
import google.auth.jwt
import hpack
import httpx

from pushlib.h2transport import H2Transport, client_ssl_context, header_tuple, origin_url
from pushlib.logutil import get_logger, token_prefix
from pushlib.models import ApnsRequest, AppCredentials, Outcome, PushResult
from pushlib.outcomes import classify_apns
from pushlib.provider_limits import APNS_PAYLOAD_BYTES, APNS_VOIP_PAYLOAD_BYTES

log = get_logger(__name__)

PRODUCTION_HOST = "api.push.apple.com"
SANDBOX_HOST = "api.sandbox.push.apple.com"
DEFAULT_JWT_TTL = 40 * 60.0
MIN_JWT_TTL = 20 * 60.0
MAX_JWT_TTL = 60 * 60.0

_is_hex = re.compile(r"[0-9a-fA-F]{2,4096}").fullmatch
# Distinct repeating header fields (topics x push types x priorities) an ApnsClient keeps typed.
_TYPED_HEADERS_MAX = 256


class ApnsConfigError(ValueError):
    """The app's APNs credentials are missing or unusable (bad key PEM, bad certificate)."""


def apns_ssl_context(app: AppCredentials) -> ssl.SSLContext:
    """TLS context for the app: trust app.ca_pem only for a custom host, plus the client cert if any."""
    ctx = client_ssl_context(app.ca_pem if app.custom_host else None)
    if app.apns_cert_pem and app.apns_cert_key_pem:
        _load_client_cert(ctx, app.apns_cert_pem, app.apns_cert_key_pem)
    return ctx


def _load_client_cert(ctx: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    # The ssl module loads client certificates from files only: write them into a private
    # directory (0700, files 0600) and remove it right after loading.
    workdir = Path(tempfile.mkdtemp(prefix="pn-apns-cert-"))
    try:
        cert_path = workdir / "cert.pem"
        key_path = workdir / "key.pem"
        for path, text in ((cert_path, cert_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
        ctx.load_cert_chain(cert_path, key_path)
    except (ssl.SSLError, OSError) as exc:
        raise ApnsConfigError(f"unusable APNs client certificate/key: {exc.__class__.__name__}") from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class ApnsClient:
    """Sends APNs pushes for one app (`app`) to one host ("host" or "host:port").

    `clock` gives the epoch seconds used for the JWT's iat (tests move it).
    Raises ApnsConfigError at construction when the credentials cannot be used.
    """

    def __init__(
        self,
        app: AppCredentials,
        host: str,
        *,
        jwt_ttl: float = DEFAULT_JWT_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.app = app
        self.host = host
        self._clock = clock
        self._jwt_ttl = min(max(jwt_ttl, MIN_JWT_TTL), MAX_JWT_TTL)
        self._signer: google.auth.crypt.es.EsSigner | None = None
        self._bearer: str | None = None
        self._auth_header: hpack.HeaderTuple | None = None  # the bearer, built once per JWT
        # (name, value) -> the field as sent, for the values that repeat push after push (topic,
        # push type, priority): built once instead of lower-cased, encoded and typed every time
        self._typed: dict[tuple[str, str], hpack.HeaderTuple] = {}
        self._issued_at = 0.0
        if app.apns_key_pem and app.apns_key_id and app.apns_team_id:
            try:
                self._signer = google.auth.crypt.es256.ES256Signer.from_string(
                    app.apns_key_pem, app.apns_key_id
                )
            except (ValueError, TypeError) as exc:
                raise ApnsConfigError(f"unusable APNs token key: {exc.__class__.__name__}") from None
        elif not (app.apns_cert_pem and app.apns_cert_key_pem):
            raise ApnsConfigError("APNs app has neither a token key (key, key id, team id) nor a certificate")
        self._transport = H2Transport(apns_ssl_context(app))
        self._base_url = httpx.URL(origin_url(host))

    @property
    def uses_token_auth(self) -> bool:
        return self._signer is not None

    def _current_bearer(self) -> str:
        """The cached JWT (as an authorization value), regenerated when older than the TTL."""
        assert self._signer is not None and self.app.apns_team_id is not None
        now = self._clock()
        age = now - self._issued_at
        if self._bearer is None or age >= self._jwt_ttl or age < -60:
            issued = int(now)
            token = google.auth.jwt.encode(  # type: ignore[no-untyped-call]
                self._signer,
                {"iss": self.app.apns_team_id, "iat": issued},
                header={"alg": "ES256", "kid": self.app.apns_key_id},
            )
            self._bearer = "bearer " + token.decode("ascii")
            self._auth_header = hpack.HeaderTuple(b"authorization", b"bearer " + token)
            self._issued_at = float(issued)
        return self._bearer

    def _renew_bearer(self, rejected: str) -> None:
        """Forget the JWT Apple called expired (unless a concurrent push already replaced it)."""
        if self._bearer == rejected:
            self._bearer = None

    async def send(self, request: ApnsRequest, timeout: float) -> PushResult:
        """POST /3/device/<token>; the result says what happened (never raises for I/O trouble)."""
        voip = request.headers.get("apns-push-type") == "voip"
        limit = APNS_VOIP_PAYLOAD_BYTES if voip else APNS_PAYLOAD_BYTES
        if len(request.payload) > limit:
            return PushResult(Outcome.REJECTED, 0, "PayloadTooLarge")
        if not _is_hex(request.token):
            return PushResult(Outcome.DEVICE_SUSPECT, 0, "BadDeviceToken")
        path = b"/3/device/" + request.token.encode("ascii")
        result = await self._post(path, request, timeout)
        if (
            result.status == 403
            and result.reason == "ExpiredProviderToken"
            and self._signer is not None
        ):
            # Our clock or cache produced a stale JWT: one fresh token, one retry.
            result = await self._post(path, request, timeout)
        return result

    async def _post(self, path: bytes, request: ApnsRequest, timeout: float) -> PushResult:
        typed = self._typed
        headers: list[hpack.HeaderTuple] = []
        for name, value in request.headers.items():
            field = typed.get((name, value))
            if field is None:
                field = header_tuple(name.lower().encode(), value.encode())
                if field.indexable:  # a repeating value (never-indexed ones are per push)
                    if len(typed) >= _TYPED_HEADERS_MAX:
                        typed.clear()
                    typed[(name, value)] = field
            headers.append(field)
        bearer = None
        if self._signer is not None:
            bearer = self._current_bearer()
            assert self._auth_header is not None
            headers.append(self._auth_header)
        try:
            response = await self._transport.request_raw(
                b"POST", self._base_url, path, headers, request.payload, timeout
            )
        except httpx.TimeoutException as exc:
            return PushResult(Outcome.RETRYABLE, 0, f"timeout ({exc.__class__.__name__})")
        except httpx.HTTPError as exc:
            return PushResult(Outcome.RETRYABLE, 0, f"connection error ({exc.__class__.__name__}: {exc})")
        raw_id = response.header(b"apns-id")
        apns_id = raw_id.decode("latin-1") if raw_id is not None else None
        if response.status == 200:  # the common case: skip classification and JSON
            return PushResult(Outcome.DELIVERED, 200, "", None, apns_id)
        reason = ""
        content = response.content
        if content:
            try:
                doc = json.loads(content)
                if isinstance(doc, dict) and isinstance(doc.get("reason"), str):
                    reason = doc["reason"]
            except ValueError:
                reason = ""
        retry_after = response.header(b"retry-after")
        result = classify_apns(
            response.status, reason, retry_after.decode("latin-1") if retry_after is not None else None
        )
        if bearer is not None and reason == "ExpiredProviderToken":
            self._renew_bearer(bearer)
        if apns_id is not None:
            result = PushResult(result.outcome, result.status, result.reason, result.retry_after, apns_id)
        log.debug(
            "apns push app=%s token=%s status=%s reason=%s",
            self.app.app_id, token_prefix(request.token), result.status, result.reason,
        )
        return result

    async def aclose(self) -> None:
        await self._transport.aclose()
