"""The gRPC port's security as the settings ask for it: TLS (mTLS with a client CA), or
plaintext only when `tls.plaintext` says so; and the credentials file when auth is on.

Checked before serving (and before `serve` starts its processes), so that a missing
certificate stops the start with the field named instead of serving something else. File
contents are never logged, only their paths.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from pointauth.server.config import ConfigError, Settings, TLSSettings


def _read(path: str, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"tls.{field}: cannot read {path}: {exc.strerror or exc}") from exc


def check_security(settings: Settings) -> None:
    """ConfigError naming the field if the port's security is not fully configured."""
    tls = settings.tls
    if tls.plaintext:
        if tls.cert_file or tls.key_file or tls.client_ca_file:
            raise ConfigError("tls.plaintext = true with tls files set: choose one")
    elif not (tls.cert_file and tls.key_file):
        raise ConfigError("tls.cert_file and tls.key_file are required (or tls.plaintext = true to serve without TLS)")
    if settings.auth.enabled and not settings.auth.credentials_file:
        raise ConfigError("auth.credentials_file is required while auth.enabled = true")


def server_credentials(tls: TLSSettings) -> grpc.ServerCredentials | None:
    """None for plaintext (after check_security)."""
    if tls.plaintext:
        return None
    chain = _read(tls.cert_file, "cert_file")
    key = _read(tls.key_file, "key_file")
    client_ca = _read(tls.client_ca_file, "client_ca_file") if tls.client_ca_file else None
    try:
        return grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )
    except (ValueError, TypeError) as exc:  # the text is not PEM (a file of the wrong kind)
        raise ConfigError(f"tls: cannot use the certificate or key: {exc}") from exc
