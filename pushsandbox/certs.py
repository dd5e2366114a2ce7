"""The sandbox's private PKI: a CA, the server certificate, and APNs-style client certificates.

Apple's provider certificates carry the app's bundle id in the subject's UID attribute
(OID 0.9.2342.19200300.100.1.1); the sandbox issues client certificates the same way, so a
client authenticating with one is bound to that bundle's topics.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pushsandbox.apns import APNS_ENVIRONMENTS

CA_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server-key.pem"

_VALIDITY = datetime.timedelta(days=3650)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256 keys are generated in microseconds, unlike RSA: startup stays fast.
    return ec.generate_private_key(ec.SECP256R1())


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
    )


@dataclass(frozen=True)
class SandboxPki:
    """The CA and server certificate files of one sandbox directory."""

    directory: Path
    ca_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey

    @property
    def ca_path(self) -> Path:
        return self.directory / CA_FILE

    @property
    def server_cert_path(self) -> Path:
        return self.directory / SERVER_CERT_FILE

    @property
    def server_key_path(self) -> Path:
        return self.directory / SERVER_KEY_FILE

    @property
    def ca_pem(self) -> str:
        return self.ca_cert.public_bytes(serialization.Encoding.PEM).decode()

    @classmethod
    def load_or_create(cls, directory: Path) -> SandboxPki:
        """Reuse the CA found in `directory` (so clients keep trusting it across restarts),
        else create one; always (re)issue the server certificate for 127.0.0.1, ::1, localhost and
        Apple's APNs host names."""
        directory.mkdir(parents=True, exist_ok=True)
        ca_path, ca_key_path = directory / CA_FILE, directory / CA_KEY_FILE
        if ca_path.exists() and ca_key_path.exists():
            ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
            loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{ca_key_path.name} is not an EC private key")
            ca_key = loaded
        else:
            ca_key = _new_key()
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pushlib sandbox CA")])
            ca_cert = (
                _builder(name, name, ca_key.public_key())
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(
                    x509.KeyUsage(
                        digital_signature=True, content_commitment=False, key_encipherment=False,
                        data_encipherment=False, key_agreement=False, key_cert_sign=True,
                        crl_sign=True, encipher_only=False, decipher_only=False,
                    ),
                    critical=True,
                )
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256())
            )
            ca_key_path.write_bytes(_pem_key(ca_key))
            ca_key_path.chmod(0o600)
            ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        pki = cls(directory, ca_cert, ca_key)
        pki._write_server_cert()
        return pki

    def _write_server_cert(self) -> None:
        key = _new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        san = x509.SubjectAlternativeName(
            [
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1")),
                # Apple's APNs names too: a client that resolves them to the sandbox (curl
                # --connect-to, /etc/hosts) and trusts only the sandbox CA gets through TLS, and
                # the sandbox records which environment it asked for (apns.environment_of).
                *(x509.DNSName(name) for name in APNS_ENVIRONMENTS),
            ]
        )
        cert = (
            self._signed_by_ca(subject, key.public_key())
            .add_extension(san, critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )
        self.server_key_path.write_bytes(_pem_key(key))
        self.server_key_path.chmod(0o600)
        self.server_cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def _signed_by_ca(
        self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey
    ) -> x509.CertificateBuilder:
        return (
            _builder(subject, self.ca_cert.subject, public_key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()), critical=False
            )
        )

    def issue_client_cert(self, bundle_id: str) -> tuple[str, str]:
        """A client certificate for APNs certificate auth, bound to `bundle_id` like Apple's.

        Returns (cert_pem, key_pem)."""
        key = _new_key()
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.USER_ID, bundle_id),
                x509.NameAttribute(NameOID.COMMON_NAME, f"Apple Sandbox Push Services: {bundle_id}"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pushlib sandbox"),
            ]
        )
        cert = (
            self._signed_by_ca(subject, key.public_key())
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM).decode(), _pem_key(key).decode()


def bundle_id_of(cert_der: bytes) -> str | None:
    """The bundle id (subject UID) of a DER client certificate, or None if it has none."""
    cert = x509.load_der_x509_certificate(cert_der)
    values = cert.subject.get_attributes_for_oid(NameOID.USER_ID)
    if not values:
        return None
    value = values[0].value
    return value if isinstance(value, str) else value.decode()
