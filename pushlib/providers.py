"""ProviderPool: the one entry point the dispatcher uses to send a push.

It keeps one client (one persistent HTTP/2 connection) per (credentials, host): an
ApnsClient per APNs key/certificate and host, an FcmClient per service account and host.
Clients are keyed by a fingerprint of the credentials, so replacing an app's credentials
makes a new client; the replaced one is closed once its in-flight pushes are done.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pushlib.apns import DEFAULT_JWT_TTL, PRODUCTION_HOST, SANDBOX_HOST, ApnsClient, ApnsConfigError
from pushlib.fcm import DEFAULT_REFRESH_MARGIN, FCM_HOST, FcmClient, FcmConfigError
from pushlib.logutil import get_logger, token_prefix
from pushlib.models import ApnsRequest, AppCredentials, Device, FcmMessage, Outcome, Provider, PushResult

log = get_logger(__name__)

_Client = ApnsClient | FcmClient
_MAX_BROKEN = 1024


def credentials_fingerprint(app: AppCredentials) -> str:
    """A digest of everything that decides how we connect and authenticate (never logged raw)."""
    parts = (
        app.provider, app.apns_key_pem, app.apns_key_id, app.apns_team_id, app.apns_cert_pem,
        app.apns_cert_key_pem, app.fcm_service_account, app.custom_host, app.ca_pem,
    )
    digest = hashlib.sha256()
    for part in parts:
        digest.update((part or "").encode())
        digest.update(b"\0")
    return digest.hexdigest()


def provider_host(app: AppCredentials, device: Device) -> str:
    """Where pushes for this app and device go (custom host, APNs sandbox/production, FCM)."""
    if app.custom_host:
        return app.custom_host
    if app.provider is Provider.FCM:
        return FCM_HOST
    return SANDBOX_HOST if (device.params.sandbox or app.sandbox) else PRODUCTION_HOST


@dataclass
class _Entry:
    client: _Client
    inflight: int = 0
    retired: bool = False
    key: tuple[str, str, str] = field(default=("", "", ""))


class ProviderPool:
    """Sends pushes through cached per-credentials clients. `send` never raises for
    provider or network errors: they come back as RETRYABLE / CONFIG_ERROR results."""

    def __init__(
        self,
        *,
        jwt_ttl: float = DEFAULT_JWT_TTL,
        fcm_refresh_margin: float = DEFAULT_REFRESH_MARGIN,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._jwt_ttl = jwt_ttl
        self._fcm_margin = fcm_refresh_margin
        self._clock = clock
        self._clients: dict[tuple[str, str, str], _Entry] = {}  # (provider, host, fingerprint)
        self._current: dict[tuple[str, str, str], tuple[str, str, str]] = {}  # (provider, app, host) -> key
        self._broken: dict[tuple[str, str, str], str] = {}  # keys whose credentials failed to load
        self._closing: list[_Entry] = []
        self._fingerprints: dict[AppCredentials, str] = {}  # frozen, hashable: skip re-hashing PEMs

    async def send(
        self, app: AppCredentials, device: Device, request: ApnsRequest | FcmMessage, timeout: float
    ) -> PushResult:
        if not app.enabled:
            return PushResult(Outcome.CONFIG_ERROR, 0, "app disabled")
        wants_apns = isinstance(request, ApnsRequest)
        if wants_apns != (app.provider is Provider.APNS):
            return PushResult(Outcome.CONFIG_ERROR, 0, "request does not match the app's provider")
        host = provider_host(app, device)
        entry = await self._entry(app, host)
        if isinstance(entry, PushResult):
            return entry
        entry.inflight += 1
        try:
            if isinstance(entry.client, ApnsClient):
                assert isinstance(request, ApnsRequest)
                result = await entry.client.send(request, timeout)
            else:
                assert isinstance(request, FcmMessage)
                result = await entry.client.send(request, timeout)
        except Exception as exc:  # a bug must not kill the dispatcher; the job's deadline bounds retries
            log.exception(
                "push failed unexpectedly app=%s token=%s: %s",
                app.app_id, token_prefix(request.token), exc.__class__.__name__,
            )
            result = PushResult(Outcome.RETRYABLE, 0, f"internal error ({exc.__class__.__name__})")
        finally:
            entry.inflight -= 1
            if entry.retired and entry.inflight == 0:
                await self._close_entry(entry)
        if result.outcome is Outcome.CONFIG_ERROR:
            log.warning(
                "push config error app=%s host=%s status=%s reason=%s",
                app.app_id, host, result.status, result.reason,
            )
        return result

    async def _entry(self, app: AppCredentials, host: str) -> _Entry | PushResult:
        fingerprint = self._fingerprints.get(app)
        if fingerprint is None:
            if len(self._fingerprints) >= 1024:
                self._fingerprints.clear()
            fingerprint = self._fingerprints[app] = credentials_fingerprint(app)
        key = (app.provider.value, host, fingerprint)
        entry = self._clients.get(key)
        if entry is not None:
            return entry
        if key in self._broken:
            return PushResult(Outcome.CONFIG_ERROR, 0, self._broken[key])
        try:
            client: _Client
            if app.provider is Provider.APNS:
                client = ApnsClient(app, host, jwt_ttl=self._jwt_ttl, clock=self._clock)
            else:
                client = FcmClient(app, host, refresh_margin=self._fcm_margin)
        except (ApnsConfigError, FcmConfigError) as exc:
            if len(self._broken) >= _MAX_BROKEN:  # one per broken credentials version: keep it bounded
                self._broken.clear()
            self._broken[key] = str(exc)
            log.warning("push credentials unusable app=%s host=%s: %s", app.app_id, host, exc)
            return PushResult(Outcome.CONFIG_ERROR, 0, str(exc))
        entry = _Entry(client, key=key)
        self._clients[key] = entry
        app_key = (app.provider.value, app.app_id, host)
        old_key = self._current.get(app_key)
        self._current[app_key] = key
        if old_key is not None and old_key != key:
            old = self._clients.pop(old_key, None)
            if old is not None:
                old.retired = True
                if old.inflight == 0:
                    await self._close_entry(old)
                else:
                    self._closing.append(old)
        return entry

    async def _close_entry(self, entry: _Entry) -> None:
        if entry in self._closing:
            self._closing.remove(entry)
        await entry.client.aclose()

    async def aclose(self) -> None:
        """Close every client (open connections fail their in-flight pushes as RETRYABLE)."""
        entries = list(self._clients.values()) + self._closing
        self._clients.clear()
        self._current.clear()
        self._closing = []
        for entry in entries:
            await entry.client.aclose()
