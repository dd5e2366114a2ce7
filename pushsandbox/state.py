"""What the sandbox knows: registered credentials, issued OAuth tokens, recorded pushes,
per-token behaviours and counters. Single-threaded (one asyncio loop), so no locks."""

from __future__ import annotations

import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pushsandbox import jwts

# Cache bounds: enough for a long benchmark, small enough not to grow without limit.
_MAX_JWT_CACHE = 10_000
DEFAULT_MAX_RECORDS = 100_000


@dataclass(frozen=True)
class Reply:
    """An HTTP answer: status, extra headers, body, and how long to hold it back (slowness)."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    delay: float = 0.0


@dataclass(frozen=True)
class ApnsKey:
    key_id: str
    team_id: str
    public_key: ec.EllipticCurvePublicKey
    topics: frozenset[str]


@dataclass(frozen=True)
class ServiceAccount:
    client_email: str
    project_id: str
    public_key: rsa.RSAPublicKey


@dataclass(frozen=True)
class AccessToken:
    client_email: str
    project_id: str
    scopes: frozenset[str]
    expires_at: float


@dataclass
class Behaviour:
    """A scripted answer for one device token. `times` None means until changed."""

    status: int
    reason: str = ""
    retry_after: float | None = None
    delay: float = 0.0
    times: int | None = None


@dataclass(frozen=True)
class ProviderJwt:
    """A verified APNs provider token: only `iat` still matters once the signature checked out."""

    key: ApnsKey
    issued_at: float


@dataclass
class SandboxState:
    max_records: int = DEFAULT_MAX_RECORDS
    apns_keys: dict[str, ApnsKey] = field(default_factory=dict)
    accounts: dict[str, ServiceAccount] = field(default_factory=dict)
    access_tokens: dict[str, AccessToken] = field(default_factory=dict)
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    records: deque[dict[str, Any]] = field(default_factory=deque)
    # A JWT string maps to its verification result, so each one is verified once.
    jwt_cache: dict[str, ProviderJwt | str] = field(default_factory=dict)
    apns_jwts: dict[str, None] = field(default_factory=dict)  # insertion-ordered set
    counters: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.records = deque(maxlen=self.max_records)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    # --- registrations -------------------------------------------------------------------

    def register_apns_key(self, key_id: str, team_id: str, public_key_pem: str, topics: list[str]) -> None:
        key = jwts.load_public_key(public_key_pem)
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ValueError("an APNs key must be an EC P-256 key")
        self.apns_keys[key_id] = ApnsKey(key_id, team_id, key, frozenset(topics))
        self.jwt_cache.clear()  # a re-registered key id may change what verifies

    def register_account(self, client_email: str, public_key_pem: str, project_id: str) -> None:
        key = jwts.load_public_key(public_key_pem)
        if not isinstance(key, rsa.RSAPublicKey):
            raise ValueError("a service account key must be an RSA key")
        self.accounts[client_email] = ServiceAccount(client_email, project_id, key)

    def issue_access_token(self, account: ServiceAccount, scopes: frozenset[str], lifetime: int) -> str:
        token = "ya29.sandbox-" + secrets.token_urlsafe(32)
        self.access_tokens[token] = AccessToken(
            account.client_email, account.project_id, scopes, time.time() + lifetime
        )
        return token

    # --- provider JWTs ---------------------------------------------------------------------

    def check_provider_jwt(self, token: str) -> ProviderJwt | str:
        """The verified APNs provider token, or the APNs reason it is refused for
        (InvalidProviderToken). Expiry is the caller's business: it depends on the time."""
        cached = self.jwt_cache.get(token)
        if cached is None:
            cached = self._verify_provider_jwt(token)
            if len(self.jwt_cache) >= _MAX_JWT_CACHE:
                self.jwt_cache.clear()
            self.jwt_cache[token] = cached
        if token not in self.apns_jwts and len(self.apns_jwts) < _MAX_JWT_CACHE:
            self.apns_jwts[token] = None
        return cached

    def _verify_provider_jwt(self, token: str) -> ProviderJwt | str:
        try:
            jwt = jwts.parse(token)
        except jwts.JwtError:
            return "InvalidProviderToken"
        key = self.apns_keys.get(str(jwt.header.get("kid", "")))
        if key is None:
            return "InvalidProviderToken"
        if jwt.claims.get("iss") != key.team_id:
            return "InvalidProviderToken"
        iat = jwt.claims.get("iat")
        if not isinstance(iat, int | float) or isinstance(iat, bool):
            return "InvalidProviderToken"
        try:
            jwts.verify(jwt, key.public_key)
        except jwts.JwtError:
            return "InvalidProviderToken"
        return ProviderJwt(key, float(iat))

    # --- behaviours and records ------------------------------------------------------------

    def take_behaviour(self, token: str) -> Behaviour | None:
        """The behaviour to apply to this request (consuming one of its `times`)."""
        behaviour = self.behaviours.get(token)
        if behaviour is None:
            return None
        if behaviour.times is not None:
            behaviour.times -= 1
            if behaviour.times <= 0:
                del self.behaviours[token]
        return behaviour

    def record(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)
        self.count(f"{rec['provider']}_pushes")

    def pushes(self, token: str | None) -> list[dict[str, Any]]:
        return [r for r in self.records if token is None or r["token"] == token]

    def stats(self) -> dict[str, Any]:
        return {
            "token_requests": self.counters.get("token_requests", 0),
            "token_errors": self.counters.get("token_errors", 0),
            "apns_pushes": self.counters.get("apns_pushes", 0),
            "fcm_pushes": self.counters.get("fcm_pushes", 0),
            "apns_requests": self.counters.get("apns_requests", 0),
            "fcm_requests": self.counters.get("fcm_requests", 0),
            "apns_errors": self.counters.get("apns_errors", 0),
            "fcm_errors": self.counters.get("fcm_errors", 0),
            "apns_jwts": list(self.apns_jwts),
            "records_kept": len(self.records),
        }

    def clear(self) -> None:
        """Forget pushes, behaviours and counters; keep registrations and issued tokens."""
        self.records.clear()
        self.behaviours.clear()
        self.counters.clear()
        self.apns_jwts.clear()

    def reset(self) -> None:
        """Forget everything."""
        self.clear()
        self.apns_keys.clear()
        self.accounts.clear()
        self.access_tokens.clear()
        self.jwt_cache.clear()
