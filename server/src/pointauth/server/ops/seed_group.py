"""`pointauth seed`'s group directory: companies, their stores (with regions) and the stores'
terminals, the same for the same sizes, so the load generators know the points of sale without
asking. Loaded like the accounts: into both stores at once, adding only what is missing.

The seeding contract: company c is "seed-retail" (c = 0, the issuer of the seeded lots) or
f"seed-retail-{c}"; store s is f"seed-store-{s:04d}", of company s % companies, in region
REGIONS[s % 8]; its terminals are "till-0" .. f"till-{terminals - 1}".
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from pointauth.server.clock import SystemClock
from pointauth.server.domain.group import Company, Entry, Store, Terminal
from pointauth.server.journal import directory as journaled
from pointauth.server.journal.pg import connection
from pointauth.server.ledger import Keyspace, codec
from pointauth.server.ledger.directory import DirectoryStore, to_stored

REGIONS = ("hokkaido", "tohoku", "kanto", "chubu", "kinki", "chugoku", "shikoku", "kyushu")


@dataclass(frozen=True)
class SeedGroup:
    companies: int = 3
    stores: int = 100
    """In all, spread over the companies in turn."""
    terminals: int = 4
    """Per store."""

    def __post_init__(self) -> None:
        if min(self.companies, self.stores, self.terminals) < 1:
            raise ValueError("a seeded group has at least one company, one store and one terminal per store")

    def company_id(self, c: int) -> str:
        return "seed-retail" if c == 0 else f"seed-retail-{c}"

    def store(self, s: int) -> Store:
        company = self.company_id(s % self.companies)
        return Store(f"seed-store-{s:04d}", company, REGIONS[s % len(REGIONS)], f"Store {s}")

    @property
    def points_of_sale(self) -> int:
        return self.stores * self.terminals

    def point_of_sale(self, n: int) -> tuple[str, str, str]:
        """(company, store, terminal) of point of sale n (0 .. points_of_sale - 1, then round again)."""
        store = self.store(n // self.terminals % self.stores)
        return store.company_id, store.store_id, f"till-{n % self.terminals}"

    def entries(self) -> list[Entry]:
        """Companies, then stores, then terminals: each after what it names."""
        stores = [self.store(s) for s in range(self.stores)]
        return [
            *(Company(self.company_id(c), f"Seed Retail {c}") for c in range(self.companies)),
            *stores,
            *(Terminal(s.store_id, f"till-{t}", f"Till {t}") for s in stores for t in range(self.terminals)),
        ]


async def load_group(redis_url: str, dsn: str, keyspace: Keyspace, group: SeedGroup) -> int:
    """Adds the group's missing entries to Redis (raising the directory's version once, so
    running servers reload it) and to PostgreSQL at that version; returns how many Redis lacked."""
    entries = group.entries()
    redis = Redis.from_url(redis_url)
    try:
        version, added = await DirectoryStore(redis, keyspace, SystemClock()).add_missing(entries)
    finally:
        await redis.aclose()
    stored = [to_stored(entry) for entry in entries]
    async with connection(dsn) as conn, conn.transaction():
        await journaled.add_missing(
            conn,
            max(version, 1),
            SystemClock().now_ms(),
            [e for e in stored if isinstance(e, codec.CompanyEntry)],
            [e for e in stored if isinstance(e, codec.StoreEntry)],
            [e for e in stored if isinstance(e, codec.TerminalEntry)],
        )
    return len(added)
