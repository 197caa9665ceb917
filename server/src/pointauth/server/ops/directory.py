"""The group directory in rehydrate and reconcile: restoring Redis's directory keys from
PostgreSQL, and listing where the two differ."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from pointauth.server.clock import SystemClock
from pointauth.server.domain.settlement import PointValue
from pointauth.server.journal import directory as journaled
from pointauth.server.journal.pg import Connection
from pointauth.server.ledger import Keyspace, codec
from pointauth.server.ledger.directory import DirectoryStore


@dataclass(frozen=True)
class DirectoryDifference:
    what: str
    """The entry: "company acme", "store store-1", "terminal store-1/till-1"."""
    redis: str
    postgres: str

    def __str__(self) -> str:
        return f"group directory: {self.what}: Redis {self.redis}, PostgreSQL {self.postgres}"


async def restore(redis: Redis, conn: Connection, keyspace: Keyspace) -> int:
    """Makes Redis's directory exactly PostgreSQL's, at its newest version, so the next change
    gets a version above every row's; returns the entries restored. Running servers see the
    version move and reload it."""
    found = await journaled.read(conn)
    store = DirectoryStore(redis, keyspace, SystemClock())
    await store.replace(found.version, found.companies, found.stores, found.terminals)
    return found.entries


async def differences(redis: Redis, conn: Connection, keyspace: Keyspace) -> list[DirectoryDifference]:
    """Every entry that is not the same on both sides (changes still on their way show here
    until the worker has copied them: the caller looks again)."""
    in_redis = await DirectoryStore(redis, keyspace, SystemClock()).read()
    async with conn.transaction():
        in_postgres = await journaled.read(conn)
    out: list[DirectoryDifference] = []
    for kind, rd, pg in (
        ("company", in_redis.companies, in_postgres.companies),
        ("store", in_redis.stores, in_postgres.stores),
        ("terminal", in_redis.terminals, in_postgres.terminals),
    ):
        r_by = {_key(e): e for e in rd}
        p_by = {_key(e): e for e in pg}
        for key in sorted(r_by.keys() | p_by.keys()):
            r, p = r_by.get(key), p_by.get(key)
            if r != p:
                out.append(DirectoryDifference(f"{kind} {key}", _fmt(r), _fmt(p)))
    return out


def _key(entry: codec.DirectoryEntry) -> str:
    return codec.directory_field(entry).decode()


def _fmt(entry: codec.DirectoryEntry | None) -> str:
    """company: name and point value; store: company/region/name; terminal: name (names quoted)."""
    if entry is None:
        return "missing"
    if isinstance(entry, codec.StoreEntry):
        return f"company {entry.company_id}, region {entry.region_id}, name {entry.name!r}"
    if isinstance(entry, codec.CompanyEntry):
        return f"name {entry.name!r}, {PointValue(entry.yen, entry.per)}"
    return f"name {entry.name!r}"
