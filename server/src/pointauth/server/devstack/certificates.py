"""The dev stack's own small PKI: a local CA, a server certificate for 127.0.0.1 and localhost,
and a client certificate per dev credential, so that `pointauth dev` serves mTLS like a real
deployment would.

Kept across restarts (clients configured with them keep working) and made again when missing
or within DAYS_LEFT of expiring. Keys are EC P-256, written readable by their owner alone.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365
DAYS_LEFT = 30


@dataclass(frozen=True)
class Pki:
    """Paths of the PEM files: the CA, the server's pair, and each client's pair by name."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    def client_cert(self, name: str) -> Path:
        return self.directory / f"{name}.crt"

    def client_key(self, name: str) -> Path:
        return self.directory / f"{name}.key"


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)


def _fresh(path: Path, now: datetime.datetime) -> bool:
    if not path.is_file():
        return False
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.not_valid_after_utc - now > datetime.timedelta(days=DAYS_LEFT)


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    now: datetime.datetime,
    *,
    server: bool = False,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks a little behind still accept it
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)  # cert and CRL signing
        builder = builder.add_extension(usage, critical=True)
    elif server:
        names: list[x509.GeneralName] = [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    signer = issuer[1] if issuer else key
    return builder.sign(signer, hashes.SHA256())


def _write_pair(cert_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def ensure_pki(directory: Path, clients: Iterable[str]) -> Pki:
    """The CA, the server's certificate and one client certificate (CN = its name) per client,
    made where missing or about to expire (a new CA remakes every certificate)."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    pki = Pki(directory)
    now = datetime.datetime.now(datetime.UTC)
    renew_all = not (_fresh(pki.ca_cert, now) and pki.ca_key.is_file())
    if renew_all:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _issue("pointauth dev CA", ca_key, None, now)
        _write_pair(pki.ca_cert, pki.ca_key, ca_cert, ca_key)
    else:
        ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
        loaded = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey), "the dev CA key is not an EC key"
        ca_key = loaded
    pairs = [(pki.server_cert, pki.server_key, "localhost", True)]
    pairs += [(pki.client_cert(name), pki.client_key(name), name, False) for name in clients]
    for cert_path, key_path, subject, server in pairs:
        if renew_all or not (_fresh(cert_path, now) and key_path.is_file()):
            key = ec.generate_private_key(ec.SECP256R1())
            _write_pair(cert_path, key_path, _issue(subject, key, (ca_cert, ca_key), now, server=server), key)
    return pki
