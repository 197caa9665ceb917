"""Settings: TOML plus environment, validated with errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from pointauth.server.cli import main
from pointauth.server.config import ConfigError, TLSSettings, load_settings
from pointauth.server.transport import check_security, server_credentials


def test_toml_then_environment(tmp_path: Path) -> None:
    path = tmp_path / "pointauth.toml"
    path.write_text('[server]\nport = 6000\nworkers = 2\n[earn]\nrate_points = 3\n[earn.expiry]\npolicy = "days"\n')
    settings = load_settings(path, env={"POINTAUTH__SERVER__WORKERS": "4", "POINTAUTH__LEDGER__SHARDS": "64"})
    assert settings.server.port == 6000
    assert settings.server.workers == 4
    assert settings.ledger.shards == 64
    assert settings.earn.rate_points == 3
    assert settings.earn.expiry.policy == "days"


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("[server]\nport = -1\n", {}, "$.server.port"),
        ("[server]\nprot = 1\n", {}, "unknown field `prot`"),
        ("[earn.expiry]\npolicy = 'weekly'\n", {}, "$.earn.expiry.policy"),
        ("[earn]\ntimezone = 'Mars/Olympus'\n", {}, "unknown timezone"),
        ("[ledger]\nhold_ttl_seconds = 10\nhold_ttl_min_seconds = 60\n", {}, "hold_ttl_seconds must lie"),
        ("", {"POINTAUTH__SERVER__WORKERS": "many"}, "$.server.workers"),
        ("[server\n", {}, "cannot read settings file"),
    ],
)
def test_bad_settings_name_the_field(tmp_path: Path, toml: str, env: dict[str, str], message: str) -> None:
    path = tmp_path / "pointauth.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as error:
        load_settings(path, env=env)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("", "tls.cert_file and tls.key_file are required (or tls.plaintext = true"),
        ("[tls]\ncert_file = 'a.crt'\n", "tls.cert_file and tls.key_file are required"),
        ("[tls]\nplaintext = true\nclient_ca_file = 'ca.crt'\n", "tls.plaintext = true with tls files set"),
        ("[tls]\nplaintext = true\n", "auth.credentials_file is required while auth.enabled = true"),
    ],
)
def test_the_port_is_secured_unless_the_settings_say_otherwise(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "pointauth.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as error:
        check_security(load_settings(path, env={}))
    assert message in str(error.value)


def test_plaintext_without_auth_is_an_explicit_choice(tmp_path: Path) -> None:
    path = tmp_path / "pointauth.toml"
    path.write_text("[tls]\nplaintext = true\n[auth]\nenabled = false\n")
    check_security(load_settings(path, env={}))
    assert server_credentials(load_settings(path, env={}).tls) is None


def test_serve_refuses_to_start_unsecured_naming_the_fields(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve"]) == 2
    assert "tls.cert_file and tls.key_file are required" in capsys.readouterr().err


def test_unreadable_certificate_files_are_named(tmp_path: Path) -> None:
    tls = TLSSettings(cert_file=str(tmp_path / "missing.crt"), key_file=str(tmp_path / "missing.key"))
    with pytest.raises(ConfigError, match=r"tls.cert_file: cannot read .*missing.crt"):
        server_credentials(tls)
