"""Settings: TOML plus environment, validated with errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from pointauth.server.config import ConfigError, load_settings


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
