"""Just enough JWT (RFC 7519) to check what providers' clients send: ES256 and RS256 signatures.

The sandbox verifies with `cryptography` directly rather than with a JWT library so the
checks are explicit and nothing is skipped silently (e.g. the `alg` header is enforced).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature


class JwtError(ValueError):
    """The string is not a well-formed JWT or its signature does not verify."""


@dataclass(frozen=True)
class Jwt:
    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes


def _b64url(part: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError) as exc:
        raise JwtError("bad base64url") from exc


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise JwtError("bad JSON") from exc
    if not isinstance(value, dict):
        raise JwtError("not a JSON object")
    return value


def parse(token: str) -> Jwt:
    """Split and decode a compact JWS without verifying it."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        raise JwtError("not three dot-separated parts")
    return Jwt(
        header=_json_object(_b64url(parts[0])),
        claims=_json_object(_b64url(parts[1])),
        signing_input=f"{parts[0]}.{parts[1]}".encode("ascii", errors="replace"),
        signature=_b64url(parts[2]),
    )


def load_public_key(pem: str) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    """A PEM public key (SubjectPublicKeyInfo) of a kind the sandbox can verify."""
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except ValueError as exc:
        raise ValueError("public_key_pem is not a PEM public key") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise ValueError("public key must be EC (APNs) or RSA (FCM)")
    return key


def verify(jwt: Jwt, key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> None:
    """Check the signature for the algorithm the key implies (ES256 for P-256, RS256 for RSA)."""
    alg = jwt.header.get("alg")
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            if alg != "ES256" or len(jwt.signature) != 64:
                raise JwtError("expected an ES256 signature")
            # JWS carries r||s; cryptography wants DER.
            r = int.from_bytes(jwt.signature[:32], "big")
            s = int.from_bytes(jwt.signature[32:], "big")
            key.verify(encode_dss_signature(r, s), jwt.signing_input, ec.ECDSA(hashes.SHA256()))
        else:
            if alg != "RS256":
                raise JwtError("expected an RS256 signature")
            key.verify(jwt.signature, jwt.signing_input, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature as exc:
        raise JwtError("signature does not verify") from exc
