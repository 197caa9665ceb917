"""Ranks and visits survive the loss of Redis: rehydrate gives back each member's rank,
qualifying spend and rank period (rk, rs, rp), visit limits (v:<key>, those a merge brought
among them), the records' qualifying amounts and periods, a merged member's move record with its
visit limits, and the refund state of a merged member's earn refunded on the account it went
to; the ledger script then goes on from them. Reconcile names a rank or visit limit that
differs."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis

from pointauth.client import PointsClient, RefusedError
from pointauth.server.app import PointauthServer
from pointauth.server.clock import ManualClock
from pointauth.server.config import Settings
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.ledger import AccountView, Keyspace, Ledger, codec
from pointauth.server.ops import reconcile, rehydrate
from tests.conftest import STORE, at
from tests.journal.ranks_story import CARDS, DAY, KIOSK, MEMBERS, NEXT_PERIOD, RanksStory, ranks_story
from tests.journal.support import DAY_MS, running_worker, wait_until_applied

RETENTION_MS = 90 * DAY_MS


async def _views(ledger: Ledger) -> dict[str, AccountView]:
    """GetAccount of every member, but for x0 (where pruning resumes: rehydrate may start it later)."""
    views = {}
    for account in MEMBERS:
        view = await ledger.account(account)
        views[account] = view._replace(stored=msgspec.structs.replace(view.stored, x0=None))
    return views


async def _records(redis: Redis, keyspace: Keyspace, account: str) -> dict[str, Any]:
    """The account's transactions hash decoded: records by seq, and a merged account's move ("m")."""
    raw: Any = await redis.hgetall(keyspace.account(account).transactions)
    return {
        field.decode(): codec.decode_merge_move(value) if field == b"m" else codec.decode_record(value)
        for field, value in raw.items()
    }


async def _journaled(
    stack: EmbeddedStack, client: PointsClient, clock: ManualClock, redis: Redis, settings: Settings, dsn: str
) -> RanksStory:
    story = await ranks_story(client, clock, redis, settings)
    keyspace = Keyspace(16)
    async with running_worker(stack.redis.url, dsn, keyspace):
        await wait_until_applied(redis, dsn, keyspace, MEMBERS)
    return story


async def test_rehydrate_gives_back_ranks_spends_periods_visit_limits_and_records(
    stack: EmbeddedStack,
    redis: Redis,
    ledger: Ledger,
    client: PointsClient,
    server: PointauthServer,
    clock: ManualClock,
    keyspace: Keyspace,
    settings: Settings,
    dsn: str,
) -> None:
    story = await _journaled(stack, client, clock, redis, settings, dsn)
    before = await _views(ledger)
    records = {m: await _records(redis, keyspace, m) for m in MEMBERS}
    r1, r2 = before["r-1"].stored, before["r-2"].stored
    assert (r1.rank_id, r1.rank_spend, r1.rank_period) == ("silver", 1_000, NEXT_PERIOD)
    assert r1.visits == {"kiosk-day:*": DAY, "visit:store-1": DAY, "visit:store-9": DAY}
    assert (r2.rank_id, r2.rank_spend, r2.rank_period, r2.visits) == ("regular", 0, NEXT_PERIOD, {})
    assert r1.foreign_refunds == {"r-3.3": "80||80,0"}
    assert records["r-3"]["m"].visits == {"visit:store-1": str(DAY)}

    await redis.flushall()  # Redis lost
    report = await rehydrate(redis, dsn, keyspace, now_ms=clock.now_ms(), transaction_retention_ms=RETENTION_MS)
    assert report.accounts == 3
    assert await _views(ledger) == before
    after = {m: await _records(redis, keyspace, m) for m in MEMBERS}
    assert after["r-1"] == records["r-1"]
    assert after["r-2"] == records["r-2"] == {}
    # r-3's earn comes back with what r-1 refunded of it (PostgreSQL's row); the rest as it was.
    assert {k: v for k, v in after["r-3"].items() if k != "3"} == {k: v for k, v in records["r-3"].items() if k != "3"}
    assert (after["r-3"]["3"].refunded, after["r-3"]["3"].qual, after["r-3"]["3"].rp) == (80, 20_000, 2026)
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).ok
    # The server follows the directory's and rule set's versions every second; a poll may have
    # seen the flushed Redis: take in what rehydrate restored now rather than wait for the next.
    await server.directory.refresh()
    await server.rules.refresh()

    # The script reads what came back. The visit limits: the kiosk and store-9 have given on the
    # story's day, and store-1 too (r-3's, by the merge).
    for pos in (KIOSK, STORE):
        with pytest.raises(RefusedError) as caught:
            await client.check_in(CARDS["r-1"], pos, at(story.at(6)))
        assert caught.value.reason == "ALREADY_CHECKED_IN"
    # The spend of the period: 1,000 + 199,000 reaches gold.
    gold = await client.earn_points(CARDS["r-1"], STORE, 199_000, at(clock.now_ms()))
    assert (gold.rank_id, gold.rank_upgraded) == ("gold", True)
    # The refund state of r-3's earn: 120 of its 200 points are left to refund.
    rest = await client.refund_transaction(story.merged_earn.transaction_id)
    assert rest.refunded_points == 120
    account = await client.get_account(account_id="r-1")
    assert (account.rank_id, account.qualifying_spend) == ("gold", 200_000)  # a refund of last period's


async def test_reconcile_names_ranks_and_visit_limits_that_differ(
    stack: EmbeddedStack,
    redis: Redis,
    client: PointsClient,
    server: PointauthServer,
    clock: ManualClock,
    keyspace: Keyspace,
    settings: Settings,
    dsn: str,
) -> None:
    await _journaled(stack, client, clock, redis, settings, dsn)
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).ok
    r1, r2, r3 = (keyspace.account(m).account for m in MEMBERS)
    # A rank raised, a spend changed and a period lost behind the journal's back; a visit limit
    # moved on, one added, one lost.
    await redis.hset(r1, "rk", "gold")
    await redis.hset(r2, "rs", "5")
    await redis.hdel(r3, "rp")
    await redis.hset(r1, "v:visit:store-9", str(DAY + 1))
    await redis.hset(r2, "v:visit:store-1", str(DAY))
    await redis.hdel(r3, "v:visit:store-1")

    report = await reconcile(redis, dsn, keyspace, settle_seconds=0)
    assert sorted(str(d) for d in report.differences) == [
        "r-1: rank: Redis gold (spend 1000, period 2027), PostgreSQL silver (spend 1000, period 2027)",
        f"r-1: visit limit visit:store-9: Redis {DAY + 1}, PostgreSQL {DAY}",
        "r-2: rank: Redis regular (spend 5, period 2027), PostgreSQL regular (spend 0, period 2027)",
        f"r-2: visit limit visit:store-1: Redis {DAY}, PostgreSQL absent",
        "r-3: rank: Redis regular (spend 20000, period absent), PostgreSQL regular (spend 20000, period 2026)",
        f"r-3: visit limit visit:store-1: Redis absent, PostgreSQL {DAY}",
    ]
    assert not report.ok
