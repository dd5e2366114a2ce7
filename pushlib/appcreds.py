"""App credentials as operators hand them in, and the only view of them we ever give back.

Validation (pure, on text: the CLI reads files, the HTTP API takes JSON strings): an APNs token key
must be an EC P-256 private key (ES256), an APNs certificate must parse and match its key, an FCM
service account must be a JSON object with the fields google-auth needs, an FCM alias must be a
name a device can give in `pn-param`. Each raises `CredentialsError` (a ValueError) with a message
that never quotes the secret.

`public_view` is what `GET /apps/...` and `pushlib-admin app show --json` return: the kind of
credentials, sha256 fingerprints of their public halves (the key's SubjectPublicKeyInfo, the
certificate's DER) and expiry dates; never the secret itself.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pushlib.models import AppCredentials, Provider
from pushlib.params import PushParamError, parse_push_params

_SPKI = serialization.PublicFormat.SubjectPublicKeyInfo
_DER = serialization.Encoding.DER


class CredentialsError(ValueError):
    """Credentials that cannot be used (the message names the problem, never the secret)."""


def _private_key(pem: str, what: str) -> Any:
    try:
        return serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise CredentialsError(f"{what} is not an unencrypted PEM private key") from exc


def check_apns_key(pem: str, what: str = "the APNs key") -> str:
    """The .p8 token key as PEM text, checked to be an EC P-256 private key (what ES256 needs)."""
    key = _private_key(pem, what)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise CredentialsError(f"{what} is not an EC P-256 key (APNs token keys are)")
    return pem


def check_apns_cert(cert_pem: str, key_pem: str) -> tuple[str, str]:
    """Certificate and key PEM, checked to parse and to belong together."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
    except ValueError as exc:
        raise CredentialsError(f"cannot parse the certificate: {exc}") from exc
    key = _private_key(key_pem, "the certificate key")
    if cert.public_key().public_bytes(_DER, _SPKI) != key.public_key().public_bytes(_DER, _SPKI):
        raise CredentialsError("the key does not belong to the certificate")
    return cert_pem, key_pem


def check_service_account(text: str, what: str = "the service account", *, parse_key: bool = False
                          ) -> tuple[str, str]:
    """Service-account JSON text and its project id, checked for the fields google-auth needs
    (`parse_key`: and for a private key that parses, as the HTTP API requires)."""
    try:
        info = json.loads(text)
    except ValueError as exc:
        raise CredentialsError(f"{what} is not valid JSON") from exc
    if not isinstance(info, dict):
        raise CredentialsError(f"{what} is not a service-account object")
    missing = [k for k in ("project_id", "client_email", "private_key", "token_uri")
               if not isinstance(info.get(k), str) or not info.get(k)]
    if missing:
        raise CredentialsError(f"{what} lacks {', '.join(missing)}")
    if parse_key:
        _private_key(info["private_key"], f"the private_key of {what}")
    return text, str(info["project_id"])


def check_fcm_alias(alias: str) -> str:
    """`alias` if an FCM device can name an app so: the Contact parser takes it verbatim as the app
    id of `pn-provider=fcm;pn-param=<alias>` (a sender id, a package name...)."""
    try:
        params = parse_push_params({"pn-provider": "fcm", "pn-param": alias, "pn-prid": "x"}, "", ())
    except PushParamError as exc:
        raise CredentialsError(f"alias {alias[:80]!r} cannot be an FCM pn-param: {exc}") from None
    if params is None or params.app_id != alias:
        raise CredentialsError(f"alias {alias[:80]!r} cannot be an FCM pn-param (a device names it differently)")
    return alias


def check_aliases(given: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Checked aliases, repeats dropped, order kept."""
    return tuple(dict.fromkeys(check_fcm_alias(a) for a in given))


def check_ca(ca_pem: str | None, host: str | None) -> str | None:
    """A custom CA is only trusted for a custom host, and must parse as a certificate."""
    if ca_pem is None:
        return None
    if not host:
        raise CredentialsError("a CA is only trusted for a custom host (the sandbox); give the host too")
    try:
        x509.load_pem_x509_certificates(ca_pem.encode())
    except ValueError as exc:
        raise CredentialsError("the CA is not a PEM certificate") from exc
    return ca_pem


# ----------------------------------------------------------------------------- public view


def _fingerprint(der: bytes) -> str:
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")


def auth_kind(app: AppCredentials) -> str:
    if app.apns_key_pem:
        return "apns-token"
    if app.apns_cert_pem:
        return "apns-certificate"
    if app.fcm_service_account:
        return "fcm-service-account"
    return "none"


def credentials_view(app: AppCredentials) -> dict[str, Any]:
    """Fingerprints, public identifiers and expiry of the app's credentials (never a secret).
    Credentials that no longer parse show `"unreadable": true` instead of a fingerprint."""
    kind = auth_kind(app)
    out: dict[str, Any] = {"kind": kind}
    try:
        if kind == "apns-token":
            key = serialization.load_pem_private_key((app.apns_key_pem or "").encode(), password=None)
            out.update(key_id=app.apns_key_id, team_id=app.apns_team_id,
                       fingerprint=_fingerprint(key.public_key().public_bytes(_DER, _SPKI)), expires_at=None)
        elif kind == "apns-certificate":
            cert = x509.load_pem_x509_certificate((app.apns_cert_pem or "").encode())
            out.update(fingerprint=_fingerprint(cert.public_bytes(serialization.Encoding.DER)),
                       subject=cert.subject.rfc4514_string(), not_before=_iso(cert.not_valid_before_utc),
                       expires_at=_iso(cert.not_valid_after_utc))
        elif kind == "fcm-service-account":
            info = json.loads(app.fcm_service_account or "")
            key = serialization.load_pem_private_key(str(info["private_key"]).encode(), password=None)
            out.update(client_email=info.get("client_email"), private_key_id=info.get("private_key_id"),
                       fingerprint=_fingerprint(key.public_key().public_bytes(_DER, _SPKI)), expires_at=None)
    except (ValueError, TypeError, KeyError):
        out["unreadable"] = True
    return out


def public_view(app: AppCredentials, status: dict[str, Any] | None = None) -> dict[str, Any]:
    """An app as operators and API clients see it: ids, switches, host, aliases, credentials view."""
    out: dict[str, Any] = {
        "provider": app.provider.value,
        "app_id": app.app_id,
        "enabled": app.enabled,
        "sandbox": app.sandbox,
        "host": app.custom_host,
        "custom_ca": app.ca_pem is not None,
        "aliases": list(app.aliases) if app.provider is Provider.FCM else [],
        "credentials": credentials_view(app),
    }
    if status is not None:
        out["status"] = status
    return out
