"""Versioned, forward-only schema migrations: `migrations/NNNN_name.sql`, each applied once, in
order, in its own transaction, under an advisory lock so concurrent starts do not race."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from importlib.resources import files

from pointauth.server.journal.pg import Connection, connection

log = logging.getLogger(__name__)

# Months of journal partitions kept ready: the current one and three ahead.
PARTITIONS_AHEAD = 4
_LOCK_KEY = 0x706F696E74617574  # "pointaut"


def available_migrations() -> list[tuple[str, str]]:
    """(version, SQL) of every shipped migration, in order."""
    folder = files("pointauth.server.journal").joinpath("migrations")
    found = [
        (entry.name.removesuffix(".sql"), entry.read_text())
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    ]
    return sorted(found)


async def migrate(dsn: str, today: datetime | None = None) -> list[str]:
    """Applies the pending migrations and creates journal partitions ahead of `today` (default:
    the real date); returns the versions applied."""
    async with connection(dsn) as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            applied = await _apply_pending(conn)
            await create_partitions(conn, today or datetime.now(UTC), PARTITIONS_AHEAD)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied


async def _apply_pending(conn: Connection) -> list[str]:
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations"
        " (version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
    applied: list[str] = []
    for version, sql in available_migrations():
        if version in done:
            continue
        async with conn.transaction():
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
        log.info("applied migration %s", version)
        applied.append(version)
    return applied


async def create_partitions(conn: Connection, first: datetime, months: int) -> int:
    """Monthly journal partitions from the month of `first` on; returns how many were new."""
    created: int = await conn.fetchval("SELECT journal_create_partitions($1, $2)", first, months)
    if created:
        log.info("created %d journal partition(s) from %s", created, first.strftime("%Y-%m"))
    return created
