"""The group directory in PostgreSQL (migration 0003): the write-behind copies each change the
servers appended to shard 0's stream; rehydrate and reconcile read it back.

A row keeps the version of the change that last wrote it, and a change is applied only over an
older version: so applying a change twice (a redelivery) or late (a claimed entry) never undoes
a newer one, and the rows end as Redis has them whatever order the changes arrive in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from pointauth.server.journal.pg import Connection
from pointauth.server.ledger import codec


def _time(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _newest(changes: Sequence[codec.DirectoryChange]) -> list[codec.DirectoryChange]:
    """One change per entry, its newest: an upsert may not touch a row twice."""
    newest: dict[tuple[str, bytes], codec.DirectoryChange] = {}
    for change in changes:
        key = (type(change.entry).__name__, codec.directory_field(change.entry))
        if key not in newest or newest[key].version < change.version:
            newest[key] = change
    return sorted(newest.values(), key=lambda c: c.version)


async def write_changes(conn: Connection, changes: Sequence[codec.DirectoryChange]) -> None:
    """Applies the changes (in the caller's transaction)."""
    companies, stores, terminals = [], [], []
    for change in _newest(changes):
        entry, when = change.entry, _time(change.time)
        if isinstance(entry, codec.CompanyEntry):
            companies.append((entry.company_id, entry.name, entry.yen, entry.per, change.version, when))
        elif isinstance(entry, codec.StoreEntry):
            stores.append((entry.store_id, entry.company_id, entry.region_id, entry.name, change.version, when))
        else:
            terminals.append((entry.store_id, entry.terminal_id, entry.name, change.version, when))
    if companies:
        await conn.execute(
            """
            INSERT INTO companies AS c (company_id, display_name, point_value_yen, point_value_points, version,
                                        updated_at)
            SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::int[], $5::bigint[], $6::timestamptz[])
            ON CONFLICT (company_id) DO UPDATE SET
                display_name = EXCLUDED.display_name, point_value_yen = EXCLUDED.point_value_yen,
                point_value_points = EXCLUDED.point_value_points, version = EXCLUDED.version,
                updated_at = EXCLUDED.updated_at
            WHERE c.version < EXCLUDED.version
            """,
            *map(list, zip(*companies, strict=True)),
        )
    if stores:
        await conn.execute(
            """
            INSERT INTO stores AS s (store_id, company_id, region_id, display_name, version, updated_at)
            SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::timestamptz[])
            ON CONFLICT (store_id) DO UPDATE SET
                company_id = EXCLUDED.company_id, region_id = EXCLUDED.region_id,
                display_name = EXCLUDED.display_name, version = EXCLUDED.version, updated_at = EXCLUDED.updated_at
            WHERE s.version < EXCLUDED.version
            """,
            *map(list, zip(*stores, strict=True)),
        )
    if terminals:
        await conn.execute(
            """
            INSERT INTO terminals AS t (store_id, terminal_id, display_name, version, updated_at)
            SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::timestamptz[])
            ON CONFLICT (store_id, terminal_id) DO UPDATE SET
                display_name = EXCLUDED.display_name, version = EXCLUDED.version, updated_at = EXCLUDED.updated_at
            WHERE t.version < EXCLUDED.version
            """,
            *map(list, zip(*terminals, strict=True)),
        )


async def add_missing(
    conn: Connection,
    version: int,
    time_ms: int,
    companies: Sequence[codec.CompanyEntry],
    stores: Sequence[codec.StoreEntry],
    terminals: Sequence[codec.TerminalEntry],
) -> None:
    """Inserts the entries PostgreSQL lacks, as of `version`, never changing a row (bulk loads
    that write Redis themselves: `pointauth seed`)."""
    when = _time(time_ms)
    if companies:
        await conn.executemany(
            "INSERT INTO companies (company_id, display_name, point_value_yen, point_value_points, version,"
            " updated_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            [(c.company_id, c.name, c.yen, c.per, version, when) for c in companies],
        )
    if stores:
        await conn.executemany(
            "INSERT INTO stores (store_id, company_id, region_id, display_name, version, updated_at)"
            " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            [(s.store_id, s.company_id, s.region_id, s.name, version, when) for s in stores],
        )
    if terminals:
        await conn.executemany(
            "INSERT INTO terminals (store_id, terminal_id, display_name, version, updated_at)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            [(t.store_id, t.terminal_id, t.name, version, when) for t in terminals],
        )


@dataclass(frozen=True)
class JournaledDirectory:
    version: int
    """The newest change applied (0: none)."""
    companies: list[codec.CompanyEntry]
    stores: list[codec.StoreEntry]
    terminals: list[codec.TerminalEntry]

    @property
    def entries(self) -> int:
        return len(self.companies) + len(self.stores) + len(self.terminals)


async def read(conn: Connection) -> JournaledDirectory:
    """The whole directory, as of one snapshot (run it in a transaction for one)."""
    companies = await conn.fetch(
        "SELECT company_id, display_name, point_value_yen, point_value_points, version FROM companies"
        " ORDER BY company_id"
    )
    stores = await conn.fetch(
        "SELECT store_id, company_id, region_id, display_name, version FROM stores ORDER BY store_id"
    )
    terminals = await conn.fetch(
        "SELECT store_id, terminal_id, display_name, version FROM terminals ORDER BY store_id, terminal_id"
    )
    return JournaledDirectory(
        version=max((r["version"] for rows in (companies, stores, terminals) for r in rows), default=0),
        companies=[
            codec.CompanyEntry(r["company_id"], r["display_name"], r["point_value_yen"], r["point_value_points"])
            for r in companies
        ],
        stores=[codec.StoreEntry(r["store_id"], r["company_id"], r["region_id"], r["display_name"]) for r in stores],
        terminals=[codec.TerminalEntry(r["store_id"], r["terminal_id"], r["display_name"]) for r in terminals],
    )
