"""`pointauth credentials issue|revoke|list`: edits the credentials file the servers re-read
(auth.credentials_file). An issued API key is printed once and only its SHA-256 is stored; a
revoked credential stays in the file (revoked = true), so its id is never reused by mistake."""

from __future__ import annotations

import fcntl
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import msgspec

from pointauth.server.api.credentials import read_credentials, write_credentials_atomically
from pointauth.server.api.permissions import check_scopes
from pointauth.server.config import ConfigError, Settings
from pointauth.server.domain.credentials import (
    Credential,
    CredentialsError,
    Role,
    encode_credentials,
    key_sha256,
    new_api_key,
    parse_credentials,
)


def _path(settings: Settings) -> Path:
    if not settings.auth.credentials_file:
        raise ConfigError("auth.credentials_file is not set: which file should hold the credentials?")
    return Path(settings.auth.credentials_file)


@contextmanager
def _editing(path: Path) -> Iterator[list[Credential]]:
    """The file's credentials, written back (whole, renamed into place) when the block ends;
    one editor at a time."""
    lock_path = path.with_name(f".{path.name}.lock")
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        credentials = read_credentials(path) if path.exists() else []
        yield credentials
        text = encode_credentials(credentials)
        parse_credentials(text)  # what is written must be what servers accept
        write_credentials_atomically(path, text)


def issue_command(
    settings: Settings,
    credential_id: str,
    role: str,
    *,
    company: str = "",
    scope: Sequence[str] = (),
    certificate: str = "",
    rate_per_second: int = 0,
) -> int:
    """Adds a credential; with no certificate identity, an API key, printed once."""
    try:
        with _editing(_path(settings)) as credentials:
            if any(c.id == credential_id for c in credentials):
                raise CredentialsError(f"credential {credential_id!r} exists already (ids are never reused)")
            api_key = "" if certificate else new_api_key(credential_id)
            credential = Credential(
                id=credential_id,
                role=Role(role),
                company=company,
                scope=tuple(scope),
                key_sha256=key_sha256(api_key) if api_key else "",
                certificate=certificate,
                rate_per_second=rate_per_second,
            )
            check_scopes([credential])
            credentials.append(credential)
            parse_credentials(encode_credentials(credentials))  # refuses before anything is written
    except CredentialsError as exc:
        print(f"pointauth: {exc}", file=sys.stderr)
        return 1
    if api_key:
        print("API key (shown once; only its SHA-256 is stored):", file=sys.stderr)
        print(api_key)
    else:
        print(f"credential {credential_id} for client certificates of identity {certificate!r}", file=sys.stderr)
    return 0


def revoke_command(settings: Settings, credential_id: str) -> int:
    try:
        with _editing(_path(settings)) as credentials:
            index = next((i for i, c in enumerate(credentials) if c.id == credential_id), None)
            if index is None:
                raise CredentialsError(f"no credential {credential_id!r}")
            credentials[index] = msgspec.structs.replace(credentials[index], revoked=True)
    except CredentialsError as exc:
        print(f"pointauth: {exc}", file=sys.stderr)
        return 1
    print(
        f"revoked {credential_id}: servers refuse it within auth.reload_seconds ({settings.auth.reload_seconds} s)",
        file=sys.stderr,
    )
    return 0


def list_command(settings: Settings) -> int:
    try:
        credentials = read_credentials(_path(settings))
    except CredentialsError as exc:
        print(f"pointauth: {exc}", file=sys.stderr)
        return 1
    for c in credentials:
        ways = (["key"] if c.key_sha256 else []) + ([f"certificate={c.certificate}"] if c.certificate else [])
        scope = f" scope={','.join(c.scope)}" if c.scope else ""
        state = " REVOKED" if c.revoked else ""
        print(f"{c.id}\t{c.role}\t{c.company or '-'}\t{'+'.join(ways)}{scope}{state}")
    return 0
