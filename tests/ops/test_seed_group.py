"""`pointauth seed` registers a group directory in both stores, idempotently, whose points of sale
a server accepts: the load generators' tills are registered ones."""

from __future__ import annotations

import asyncio
import io

from redis.asyncio import Redis

from pointauth.client import Channel, PointOfSale, PointsClient
from pointauth.server.app import PointauthServer
from pointauth.server.clock import ManualClock as Clock
from pointauth.server.config import (
    AuthSettings,
    LedgerSettings,
    PostgresSettings,
    RedisSettings,
    ServerSettings,
    Settings,
    TLSSettings,
)
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.domain.group import Company, Store, Terminal
from pointauth.server.journal.pg import connection
from pointauth.server.ledger import Keyspace
from pointauth.server.ledger.directory import DirectoryStore
from pointauth.server.ops import reconcile
from pointauth.server.ops.seed import primary_card, seed_command
from pointauth.server.ops.seed_group import SeedGroup
from tests.conftest import START_MS


def test_the_seeded_group_is_named_by_the_contract() -> None:
    group = SeedGroup(companies=2, stores=3, terminals=2)
    assert group.entries() == [
        Company("seed-retail", "Seed Retail 0"),
        Company("seed-retail-1", "Seed Retail 1"),
        Store("seed-store-0000", "seed-retail", "hokkaido", "Store 0"),
        Store("seed-store-0001", "seed-retail-1", "tohoku", "Store 1"),
        Store("seed-store-0002", "seed-retail", "kanto", "Store 2"),
        Terminal("seed-store-0000", "till-0", "Till 0"),
        Terminal("seed-store-0000", "till-1", "Till 1"),
        Terminal("seed-store-0001", "till-0", "Till 0"),
        Terminal("seed-store-0001", "till-1", "Till 1"),
        Terminal("seed-store-0002", "till-0", "Till 0"),
        Terminal("seed-store-0002", "till-1", "Till 1"),
    ]
    assert [group.point_of_sale(n) for n in (0, 1, 2, 5, 6)] == [
        ("seed-retail", "seed-store-0000", "till-0"),
        ("seed-retail", "seed-store-0000", "till-1"),
        ("seed-retail-1", "seed-store-0001", "till-0"),
        ("seed-retail", "seed-store-0002", "till-1"),
        ("seed-retail", "seed-store-0000", "till-0"),
    ]


async def test_seed_registers_the_group_in_both_stores_once(
    stack: EmbeddedStack, redis: Redis, keyspace: Keyspace, dsn: str
) -> None:
    settings = Settings(
        server=ServerSettings(port=0),
        redis=RedisSettings(url=stack.redis.url),
        postgres=PostgresSettings(dsn=dsn),
        ledger=LedgerSettings(shards=16),
        tls=TLSSettings(plaintext=True),
        auth=AuthSettings(enabled=False),
    )
    group = SeedGroup(companies=3, stores=10, terminals=2)
    out = io.StringIO()
    assert await asyncio.to_thread(seed_command, settings, 20, out, group) == 0
    assert "group directory: 3 companies, 10 stores, 20 terminals (33 entries new in Redis)" in out.getvalue()
    loaded = await DirectoryStore(redis, keyspace, Clock(START_MS)).load()
    assert (loaded.version, len(loaded.companies), len(loaded.stores), len(loaded.terminals)) == (1, 3, 10, 20)
    async with connection(dsn) as conn:
        counts = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM companies), (SELECT count(*) FROM stores), (SELECT count(*) FROM terminals),"
            " (SELECT max(version) FROM stores)"
        )
    assert counts is not None
    assert tuple(counts[i] for i in range(4)) == (3, 10, 20, 1)
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).ok

    again = io.StringIO()
    assert await asyncio.to_thread(seed_command, settings, 20, again, group) == 0
    assert "(0 entries new in Redis)" in again.getvalue()
    assert (await DirectoryStore(redis, keyspace, Clock(START_MS)).load()).version == 1

    # A server on the seeded data takes a seeded member's call at any seeded point of sale.
    async with (
        PointauthServer(settings, sweeper=False) as server,
        PointsClient(f"127.0.0.1:{server.port}", plaintext=True) as till,
    ):
        for n in (0, 7, 19):
            company, store, terminal = group.point_of_sale(n)
            where = PointOfSale(company_id=company, store_id=store, terminal_id=terminal, channel=Channel.CHANNEL_STORE)
            hold = await till.authorize_hold(primary_card(n), where, 1)
            assert hold.held_points == 1
