"""The credentials file as each server process sees it: loaded at start (a bad file stops the
start), then looked at every `auth.reload_seconds` and re-read when it changed, so credentials
are added and revoked without a restart.

A file that changed but cannot be used (a typo) is logged as an ERROR and the previous
credentials stay in force: the alternative, refusing everyone, would stop every till for a typo.
`pointauth credentials` writes the file whole and renames it into place, so a server never reads
half of it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from pointauth.server.api.permissions import check_scopes
from pointauth.server.domain.credentials import Credential, CredentialsError, parse_credentials
from pointauth.server.services.following import Follower

log = logging.getLogger(__name__)


def read_credentials(path: Path) -> list[Credential]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise CredentialsError(f"cannot read credentials file {path}: {exc}") from exc
    credentials = parse_credentials(text)
    check_scopes(credentials)
    return credentials


def _version(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    # The inode too: a rename into place within the same mtime tick is still a change.
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


class CredentialStore:
    """The current credentials by id and by certificate identity."""

    def __init__(self, path: Path, reload_seconds: float) -> None:
        self.path = path
        self.by_id: dict[str, Credential] = {}
        self.by_certificate: dict[str, Credential] = {}
        self._version: tuple[int, int, int] | None = None
        self._loads = 0
        self._follower = Follower("credentials", reload_seconds, self._reload)

    def load(self) -> None:
        """Reads the file now; CredentialsError if it cannot be used."""
        version = _version(self.path)
        credentials = read_credentials(self.path)
        self.by_id = {c.id: c for c in credentials}
        self.by_certificate = {c.certificate: c for c in credentials if c.certificate}
        self._version = version
        self._loads += 1
        revoked = sum(c.revoked for c in credentials)
        log.info("credentials: %d from %s (%d revoked)", len(credentials), self.path, revoked)

    def reload_if_changed(self) -> bool:
        version = _version(self.path)
        if version == self._version:
            return False
        try:
            self.load()
        except CredentialsError as exc:
            self._version = version  # logged once per change, not every poll
            log.error("credentials file changed but cannot be used; keeping the previous credentials: %s", exc)
            return False
        return True

    async def start(self) -> None:
        self.load()
        self._follower.start()

    async def _reload(self) -> int:
        """For the follower: how many times the file was loaded (its version, as far as the log
        goes). A stat is cheap; the read and parse happen only when the file changed."""
        await asyncio.to_thread(self.reload_if_changed)
        return self._loads

    async def stop(self) -> None:
        await self._follower.stop()


def write_credentials_atomically(path: Path, text: str) -> None:
    """Whole or not at all: a server polling the file never reads it half-written. Readable by
    its owner alone: it holds key hashes and who may do what."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(path)
