"""`pointauth credentials issue|revoke|list` as an operator runs them: the key is printed once
and only its hash stored, the file stays one servers accept, mistakes change nothing."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from pointauth.server.cli import main
from pointauth.server.domain.credentials import Role, key_sha256, parse_credentials


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "pointauth.toml"
    path.write_text(f'[auth]\ncredentials_file = "{tmp_path / "credentials.toml"}"\n')
    return path


def _run(config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["--config", str(config), "credentials", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_issue_prints_the_key_once_and_stores_its_hash(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(config, capsys, "issue", "till-0001", "--role", "till", "--company", "acme")
    assert code == 0, err
    api_key = out.strip()
    assert api_key.startswith("till-0001.")
    assert len(api_key) > 40
    stored = (tmp_path / "credentials.toml").read_text()
    assert api_key not in stored
    [credential] = parse_credentials(stored)
    assert (credential.id, credential.role, credential.company) == ("till-0001", Role.TILL, "acme")
    assert credential.key_sha256 == key_sha256(api_key)
    assert stat.S_IMODE((tmp_path / "credentials.toml").stat().st_mode) == 0o600

    code, out, err = _run(
        config, capsys, "issue", "partner-1", "--role", "partner", "--scope", "PointsService/GetBalance"
    )
    assert code == 0, err
    code, out, err = _run(
        config, capsys, "issue", "till-0002", "--role", "till", "--company", "acme", "--certificate", "till-0002.acme"
    )
    assert (code, out) == (0, "")  # identified by its certificate: no key
    code, out, _ = _run(config, capsys, "list")
    assert code == 0
    assert out.splitlines() == [
        "till-0001\ttill\tacme\tkey",
        "partner-1\tpartner\t-\tkey scope=PointsService/GetBalance",
        "till-0002\ttill\tacme\tcertificate=till-0002.acme",
    ]
    assert api_key not in out


def test_revoke_keeps_the_entry_so_its_id_is_never_reused(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(config, capsys, "issue", "kiosk-1", "--role", "kiosk")[0] == 0
    code, _, err = _run(config, capsys, "revoke", "kiosk-1")
    assert code == 0
    assert "revoked kiosk-1" in err
    assert [c.revoked for c in parse_credentials((tmp_path / "credentials.toml").read_text())] == [True]
    code, _, err = _run(config, capsys, "issue", "kiosk-1", "--role", "kiosk")
    assert code == 1
    assert "exists already" in err
    assert _run(config, capsys, "list")[1] == "kiosk-1\tkiosk\t-\tkey REVOKED\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["issue", "till-1", "--role", "till"], "a till needs its company"),
        (["issue", "p-1", "--role", "partner", "--scope", "PointsService/Nope"], "unknown RPCs"),
        (["issue", "k-1", "--role", "kiosk", "--scope", "PointsService/GetBalance"], "only a partner"),
        (["issue", "bad id", "--role", "kiosk"], "id must be"),
        (["revoke", "nobody"], "no credential 'nobody'"),
    ],
)
def test_a_mistake_changes_nothing(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert _run(config, capsys, "issue", "kiosk-1", "--role", "kiosk")[0] == 0
    before = (tmp_path / "credentials.toml").read_text()
    code, out, err = _run(config, capsys, *args)
    assert (code, out) == (1, "")
    assert message in err
    assert (tmp_path / "credentials.toml").read_text() == before


def test_without_a_credentials_file_setting_the_command_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "pointauth.toml"
    config.write_text("")
    code, _, err = _run(config, capsys, "issue", "kiosk-1", "--role", "kiosk")
    assert code == 2
    assert "auth.credentials_file is not set" in err
