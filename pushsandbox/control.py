"""`SandboxControl`: a small synchronous client of the sandbox's control API (`/_sandbox/`).

It also mints credentials the way Apple and Google hand them out (an APNs .p8-style EC key,
an APNs client certificate, a service-account JSON) and registers their public halves with
the sandbox, returning `AppCredentials` that point at the sandbox.
"""

from __future__ import annotations

import json
import secrets
import ssl
import string
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pushlib.models import AppCredentials, Provider


class SandboxControlError(RuntimeError):
    """The sandbox refused a control request (status and its error text in the message)."""


DEFAULT_TEAM_ID = "TEAM000001"


@dataclass(frozen=True)
class ApnsTokenKey:
    """An APNs token key as Apple hands it out: the .p8 text (PKCS#8 PEM), its key id, its team."""

    key_id: str
    team_id: str
    private_pem: str = field(repr=False)


def _private_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _public_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def _public_pem_of(private_pem: str) -> str:
    key = serialization.load_pem_private_key(private_pem.encode(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError("not an EC or RSA private key")
    return _public_pem(key)


def _key_id() -> str:
    # Apple key ids are 10 upper-case alphanumerics.
    return "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(10))


class SandboxControl:
    """Client of one sandbox at `base_url` (e.g. https://127.0.0.1:8443), trusting `ca_pem`."""

    def __init__(self, base_url: str, ca_pem: str, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.ca_pem = ca_pem
        parsed = urllib.parse.urlsplit(self.base_url)
        self.host = parsed.netloc  # "host:port", what AppCredentials.custom_host wants
        context = ssl.create_default_context(cadata=ca_pem)
        self._client = httpx.Client(base_url=self.base_url + "/_sandbox", verify=context, timeout=timeout)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> SandboxControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, route: str, body: dict[str, Any] | None = None,
              params: dict[str, str] | None = None) -> Any:
        response = self._client.request(method, route, json=body, params=params)
        if response.status_code >= 300:
            raise SandboxControlError(f"{method} /_sandbox{route}: {response.status_code} {response.text}")
        return response.json()

    # --- credentials -----------------------------------------------------------------------

    def register_apns_key(self, key_id: str, team_id: str, public_key_pem: str, topics: list[str]) -> None:
        self._call("POST", "/apns/keys", {"key_id": key_id, "team_id": team_id,
                                          "public_key_pem": public_key_pem, "topics": topics})

    def apns_token_key(self, bundle_ids: list[str], key_id: str | None = None,
                       team_id: str = DEFAULT_TEAM_ID) -> ApnsTokenKey:
        """A fresh APNs token key (a new P-256 key; `key_id` random unless given) of `team_id`,
        registered for `bundle_ids` (and their .voip etc. topics), like one .p8 key from Apple
        serves all the apps of a team."""
        key = ec.generate_private_key(ec.SECP256R1())
        key_id = key_id or _key_id()
        self.register_apns_key(key_id, team_id, _public_pem(key), list(bundle_ids))
        return ApnsTokenKey(key_id, team_id, _private_pem(key))

    def apns_token_app(self, bundle_id: str, team_id: str = DEFAULT_TEAM_ID) -> AppCredentials:
        """A fresh APNs token key allowed to push to `bundle_id` (and its .voip etc. topics)."""
        key = self.apns_token_key([bundle_id], team_id=team_id)
        return AppCredentials(
            provider=Provider.APNS, app_id=bundle_id, sandbox=True, apns_key_pem=key.private_pem,
            apns_key_id=key.key_id, apns_team_id=key.team_id, custom_host=self.host, ca_pem=self.ca_pem,
        )

    def apns_client_cert(self, bundle_id: str) -> tuple[str, str]:
        """(cert_pem, key_pem) of a client certificate bound to `bundle_id`."""
        issued = self._call("POST", "/apns/certs", {"bundle_id": bundle_id})
        return str(issued["cert_pem"]), str(issued["key_pem"])

    def apns_cert_app(self, bundle_id: str) -> AppCredentials:
        cert_pem, key_pem = self.apns_client_cert(bundle_id)
        return AppCredentials(
            provider=Provider.APNS, app_id=bundle_id, sandbox=True, apns_cert_pem=cert_pem,
            apns_cert_key_pem=key_pem, custom_host=self.host, ca_pem=self.ca_pem,
        )

    def register_fcm_account(self, client_email: str, public_key_pem: str, project_id: str) -> None:
        self._call("POST", "/fcm/accounts", {"client_email": client_email, "public_key_pem": public_key_pem,
                                             "project_id": project_id})

    def register_app(self, app: AppCredentials) -> None:
        """Register again what `app` authenticates with (an APNs token key or an FCM service
        account made by this class): for a sandbox that restarted."""
        if app.apns_key_pem and app.apns_key_id and app.apns_team_id:
            public = _public_pem_of(app.apns_key_pem)
            self.register_apns_key(app.apns_key_id, app.apns_team_id, public, [app.app_id])
        elif app.fcm_service_account:
            account = json.loads(app.fcm_service_account)
            public = _public_pem_of(account["private_key"])
            self.register_fcm_account(account["client_email"], public, account["project_id"])
        else:
            raise ValueError(f"cannot register {app.provider.value} app {app.app_id} again (no token key or account)")

    def service_account(self, project_id: str) -> dict[str, str]:
        """A fresh service-account JSON (as a dict) for `project_id` whose token_uri is the sandbox."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        client_email = f"sandbox-{secrets.token_hex(4)}@{project_id}.iam.gserviceaccount.com"
        self.register_fcm_account(client_email, _public_pem(key), project_id)
        return {
            "type": "service_account",
            "project_id": project_id,
            "private_key_id": secrets.token_hex(20),
            "private_key": _private_pem(key),
            "client_email": client_email,
            "client_id": str(secrets.randbelow(10**20)),
            "auth_uri": self.base_url + "/o/oauth2/auth",
            "token_uri": self.base_url + "/token",
        }

    def fcm_app(self, project_id: str) -> AppCredentials:
        return AppCredentials(
            provider=Provider.FCM, app_id=project_id, sandbox=True,
            fcm_service_account=json.dumps(self.service_account(project_id)),
            custom_host=self.host, ca_pem=self.ca_pem,
        )

    # --- observation and control -----------------------------------------------------------

    def pushes(self, token: str | None = None) -> list[dict[str, Any]]:
        """Accepted pushes, oldest first (only those to `token` if given)."""
        records = self._call("GET", "/pushes", params={"token": token} if token is not None else None)
        return list(records)

    def clear(self) -> None:
        """Forget recorded pushes, behaviours and counters (registrations stay)."""
        self._call("POST", "/clear")

    def reset(self) -> None:
        """Forget everything, registrations and issued OAuth tokens included."""
        self._call("DELETE", "/")

    def set_behaviour(self, token: str, status: int, reason: str = "", retry_after: float | None = None,
                      delay: float = 0.0, times: int | None = None) -> None:
        """Answer pushes to `token` with `status` (+ APNs reason or FCM errorCode), after `delay`
        seconds, for the next `times` valid requests (None: until cleared). Status 200 with a
        delay makes a slow success."""
        self._call("POST", "/behaviour", {"token": token, "status": status, "reason": reason,
                                          "retry_after": retry_after, "delay": delay, "times": times})

    def clear_behaviours(self) -> None:
        self._call("DELETE", "/behaviour")

    def stats(self) -> dict[str, Any]:
        """Counters: token_requests, apns_jwts (distinct JWT strings seen), *_pushes, *_requests ..."""
        return dict(self._call("GET", "/stats"))
