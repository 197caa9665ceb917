"""How the SDK decides its channel's security: arguments first, then POINTAUTH_* variables,
then TLS against the system's CAs; and that keys never show in a repr."""

from __future__ import annotations

from pathlib import Path

import pytest

from pointauth.client import ClientTLS
from pointauth.client._security import security_from


def test_arguments_win_over_the_environment(tmp_path: Path) -> None:
    env = {"POINTAUTH_API_KEY": "from-env", "POINTAUTH_PLAINTEXT": "1"}
    tls = ClientTLS(root_ca=b"ca")
    assert security_from(tls, "given", False, env).tls is tls
    assert security_from(tls, "given", False, env).api_key == "given"
    assert security_from(None, None, False, env).tls is None  # POINTAUTH_PLAINTEXT
    assert security_from(None, None, True, {}).tls is None


def test_the_environment_names_files(tmp_path: Path) -> None:
    for name in ("ca.crt", "till.crt", "till.key"):
        (tmp_path / name).write_bytes(name.encode())
    (tmp_path / "key").write_text("till-1.secret\n")
    env = {
        "POINTAUTH_CA_FILE": str(tmp_path / "ca.crt"),
        "POINTAUTH_CERT_FILE": str(tmp_path / "till.crt"),
        "POINTAUTH_KEY_FILE": str(tmp_path / "till.key"),
        "POINTAUTH_API_KEY_FILE": str(tmp_path / "key"),
    }
    security = security_from(None, None, False, env)
    assert security.tls == ClientTLS(root_ca=b"ca.crt", cert_chain=b"till.crt", private_key=b"till.key")
    assert security.api_key == "till-1.secret"


def test_nothing_given_is_tls_against_the_system_cas() -> None:
    security = security_from(None, None, False, {})
    assert security.tls == ClientTLS()
    assert security.api_key is None


def test_secrets_never_show_in_a_repr() -> None:
    security = security_from(ClientTLS(b"ca", b"cert", b"very-secret-key"), "till-1.very-secret", False, {})
    assert "secret" not in repr(security)


def test_a_certificate_needs_its_key() -> None:
    with pytest.raises(ValueError, match="needs its private key"):
        ClientTLS(cert_chain=b"cert")
