"""`pointauth seed`: both stores loaded alike, reconcile agrees, a rerun changes nothing, and
seeded accounts take traffic whose events follow the seeded ones without a gap."""

from __future__ import annotations

import asyncio
import io

from redis.asyncio import Redis

from pointauth.server.clock import SystemClock
from pointauth.server.config import LedgerSettings, PostgresSettings, RedisSettings, Settings
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.domain.settlement import Flow, Period
from pointauth.server.journal import settlement
from pointauth.server.journal.pg import connection
from pointauth.server.ledger import Keyspace, Ledger, OpResult, PointOfSaleRef
from pointauth.server.ops import reconcile
from pointauth.server.ops.seed import SEED_ISSUER, account_id, primary_card, seed_account, seed_command
from tests.journal.support import running_worker

ACCOUNTS = 300


async def _pg_counts(dsn: str) -> tuple[int, int, int, int]:
    async with connection(dsn) as conn:
        row = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM accounts), (SELECT count(*) FROM cards),"
            " (SELECT count(*) FROM lots), (SELECT count(*) FROM journal)"
        )
        assert row is not None
        return row[0], row[1], row[2], row[3]


async def test_seed_loads_both_stores_idempotently(
    stack: EmbeddedStack, redis: Redis, keyspace: Keyspace, dsn: str
) -> None:
    settings = Settings(
        redis=RedisSettings(url=stack.redis.url), postgres=PostgresSettings(dsn=dsn), ledger=LedgerSettings(shards=16)
    )
    out = io.StringIO()
    assert await asyncio.to_thread(seed_command, settings, ACCOUNTS, out) == 0
    assert "Redis memory per new account" in out.getvalue()

    expected = [seed_account(n, 0) for n in range(ACCOUNTS)]
    cards = sum(len(c) for _, c, _ in expected)
    lots = sum(len(lot) for _, _, lot in expected)
    assert await _pg_counts(dsn) == (ACCOUNTS, cards, lots, lots)
    assert {len(c) for _, c, _ in expected} == {1, 2, 3}
    # The seed month settles like any other: each seeded lot is the seed issuer's, issued.
    async with connection(dsn) as conn:
        period = Period.of(await conn.fetchval("SELECT min(event_time) FROM journal"), "Asia/Tokyo")
        statement = await settlement.compute(conn, period)
    assert statement.ties_out, statement.mismatches()
    seeded_points = sum(points for _, _, lot in expected for _, points, _, _ in lot)
    assert [(i.issuer_id, i.totals[Flow.ISSUED]) for i in statement.issuers] == [(SEED_ISSUER.decode(), seeded_points)]
    assert {kind for _, _, lot in expected for *_, kind in lot} == {b"R", b"L"}

    ledger = Ledger(redis, keyspace, SystemClock(), settings.ledger)
    assert await ledger.account_for_card(primary_card(7)) == account_id(7)
    balance = await ledger.balance(account_id(7))
    _, _, seeded_lots = seed_account(7, 0)
    # Each of the account's cards is in its hash too, so a call on any of them passes the check.
    for n in range(ACCOUNTS):
        account, its_cards, _ = seed_account(n, 0)
        for raw_card in its_cards:
            card = raw_card.decode()

            async def balance_on(a: str, card: str = card) -> OpResult:
                return await ledger.balance(a, card=card)

            assert (await ledger.on_card(card, balance_on))[0] == account.decode()
    assert balance.available == sum(points for _, points, _, _ in seeded_lots)
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).ok

    # Traffic on a seeded account continues its sequence; a second seed leaves it alone. A seeded
    # account has no transaction records, and says so (x0 past its events): its first call looks
    # for none of them.
    pos = PointOfSaleRef("acme", "store-1", "till-1", 1)
    await redis.config_resetstat()
    redeemed = await ledger.redeem(
        account_id(7), points=5, pos=pos, request_id="00000000-0000-4000-8000-000000000007", fingerprint="s" * 32
    )
    assert redeemed.tx == len(seeded_lots) + 1
    stats: dict[str, dict[str, int]] = await redis.info("commandstats")
    assert "cmdstat_hget" not in stats
    async with running_worker(stack.redis.url, dsn, keyspace) as worker:
        for _ in range(100):
            if worker.applied_total >= 1:
                break
            await asyncio.sleep(0.05)
    assert await asyncio.to_thread(seed_command, settings, ACCOUNTS, io.StringIO()) == 0
    assert await _pg_counts(dsn) == (ACCOUNTS, cards, lots, lots + 1)
    assert (await ledger.balance(account_id(7))).available == balance.available - 5
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=2)).ok


async def test_a_larger_seed_adds_only_the_missing_accounts(
    stack: EmbeddedStack, redis: Redis, keyspace: Keyspace, dsn: str
) -> None:
    settings = Settings(
        redis=RedisSettings(url=stack.redis.url), postgres=PostgresSettings(dsn=dsn), ledger=LedgerSettings(shards=16)
    )
    assert await asyncio.to_thread(seed_command, settings, 100, io.StringIO()) == 0
    out = io.StringIO()
    assert await asyncio.to_thread(seed_command, settings, 250, out) == 0
    assert "(150 new in Redis)" in out.getvalue()
    expected = [seed_account(n, 0) for n in range(250)]
    assert (await _pg_counts(dsn))[:3] == (
        250,
        sum(len(c) for _, c, _ in expected),
        sum(len(lot) for _, _, lot in expected),
    )
    ledger = Ledger(redis, keyspace, SystemClock(), settings.ledger)
    assert await ledger.account_for_card(primary_card(249)) == account_id(249)
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).ok
