"""How a client proves who it is and checks whom it talks to: TLS (with a client certificate
for mTLS) and an API key, given as arguments or read from the environment.

Without arguments, `PointsClient` reads:
- POINTAUTH_CA_FILE: PEM of the CA that signed the server's certificate (default: the system's);
- POINTAUTH_CERT_FILE, POINTAUTH_KEY_FILE: the client certificate and key, for mTLS;
- POINTAUTH_API_KEY, or POINTAUTH_API_KEY_FILE naming a file that holds it;
- POINTAUTH_PLAINTEXT=1: no TLS (a server configured with tls.plaintext).
`pointauth dev` writes these for its stack to `.pointauth/client.env`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class ClientTLS:
    """TLS to the server: `root_ca` (PEM) checks its certificate (None: the system's roots);
    `cert_chain` and `private_key` (PEM) are this client's certificate, for mTLS."""

    root_ca: bytes | None = None
    cert_chain: bytes | None = None
    private_key: bytes | None = None

    def __post_init__(self) -> None:
        if (self.cert_chain is None) != (self.private_key is None):
            raise ValueError("a client certificate needs its private key, and a key its certificate")

    @classmethod
    def from_files(
        cls, root_ca: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None
    ) -> ClientTLS:
        def read(path: str | Path | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return cls(root_ca=read(root_ca), cert_chain=read(cert), private_key=read(key))

    def channel_credentials(self, api_key: str | None = None) -> grpc.ChannelCredentials:
        """For a channel of your own stubs: TLS, and the API key on every call if given."""
        credentials = grpc.ssl_channel_credentials(self.root_ca, self.private_key, self.cert_chain)
        if api_key:
            # Sent as `authorization: Bearer <key>`, which gRPC allows on secure channels only.
            credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(api_key))
        return credentials

    def __repr__(self) -> str:  # never the key's bytes, e.g. in a traceback's locals
        return f"ClientTLS(root_ca={self.root_ca is not None}, client_certificate={self.cert_chain is not None})"


@dataclass(frozen=True)
class Security:
    """What a client channel uses: TLS (None: plaintext) and an API key (None: none)."""

    tls: ClientTLS | None
    api_key: str | None

    def __repr__(self) -> str:
        return f"Security(tls={self.tls!r}, api_key={'***' if self.api_key else None})"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes"}


def security_from(
    tls: ClientTLS | None, api_key: str | None, plaintext: bool, env: Mapping[str, str] | None = None
) -> Security:
    """Arguments first; what they leave open comes from the environment."""
    env = os.environ if env is None else env
    if api_key is None:
        api_key = env.get("POINTAUTH_API_KEY") or None
        if api_key is None and (key_file := env.get("POINTAUTH_API_KEY_FILE")):
            api_key = Path(key_file).read_text().strip()
    if plaintext:
        return Security(None, api_key)
    if tls is None:
        if _truthy(env.get("POINTAUTH_PLAINTEXT")):
            return Security(None, api_key)
        tls = ClientTLS.from_files(
            env.get("POINTAUTH_CA_FILE") or None,
            env.get("POINTAUTH_CERT_FILE") or None,
            env.get("POINTAUTH_KEY_FILE") or None,
        )
    return Security(tls, api_key)
