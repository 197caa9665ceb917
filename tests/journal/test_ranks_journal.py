"""Ranks and visits on their way to PostgreSQL: the write-behind copies what the events say of the
member's rank (rank reviews, earns reaching a rank, refunds lowering the spend) and of visits
(check-ins, merges bringing visit limits) into the journal, the accounts rows (rk, rs, rp, v:)
and the transaction records (VISIT, and qual/rp of earns under a rank program), which stay what
the ledger script keeps."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
from msgspec.structs import replace
from redis.asyncio import Redis

from pointauth.client import PointsClient
from pointauth.server.app import PointauthServer
from pointauth.server.clock import ManualClock
from pointauth.server.config import Settings
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.journal import rules as journal_rules
from pointauth.server.journal.migrate import available_migrations
from pointauth.server.journal.pg import connection
from pointauth.server.journal.writer import foreign_refunds, record_from_row
from pointauth.server.ledger import Keyspace
from tests.conftest import STORE, at
from tests.helpers import account_state
from tests.journal.ranks_story import (
    CARDS,
    DAY,
    MEMBERS,
    NEXT_PERIOD,
    NEXT_PERIOD_MS,
    PERIOD,
    ranks_story,
    rule_set,
)
from tests.journal.support import running_worker, wait_until_applied
from tests.journal.test_rules_journal import redis_records


def _json(raw: str | None) -> Any:
    return None if raw is None else msgspec.json.decode(raw)


async def test_the_worker_copies_ranks_spends_periods_visits_and_their_records(
    stack: EmbeddedStack,
    redis: Redis,
    keyspace: Keyspace,
    client: PointsClient,
    server: PointauthServer,
    clock: ManualClock,
    settings: Settings,
    dsn: str,
) -> None:
    await ranks_story(client, clock, redis, settings)
    async with running_worker(stack.redis.url, dsn, keyspace):
        await wait_until_applied(redis, dsn, keyspace, MEMBERS)

    async with connection(dsn) as conn:
        journal = await conn.fetch(
            "SELECT account_id, seq, type, rank_from, rank_to, rank_spend, rank_period, qualifying_amount,"
            " visits::text, issuer_id FROM journal ORDER BY account_id, seq"
        )
        accounts = await conn.fetch(
            "SELECT account_id, rank_id, rank_spend, rank_period, visits::text FROM accounts ORDER BY account_id"
        )
        transactions = await conn.fetch(
            "SELECT account_id, seq, type, points, refunded, qual, rank_period FROM transactions"
            " ORDER BY account_id, seq"
        )
        records = await conn.fetch("SELECT * FROM transactions ORDER BY account_id, seq")
        points = await conn.fetch("SELECT * FROM campaign_points ORDER BY campaign_id, rules_version")
        foreign = await foreign_refunds(conn, MEMBERS)

    today = {"kiosk-day:*": DAY, "visit:store-9": DAY}
    store_1 = {"visit:store-1": DAY}
    assert [(*(r[i] for i in range(8)), _json(r[8]), r[9]) for r in journal] == [
        ("r-1", 1, "ACCOUNT_OPENED", None, None, None, None, None, None, None),
        ("r-1", 2, "RANK_REVIEWED", "", "regular", 0, PERIOD, None, None, None),
        ("r-1", 3, "EARN", "regular", "silver", 55_000, PERIOD, 55_000, None, "acme"),
        ("r-1", 4, "EARN", "silver", "gold", 205_000, PERIOD, 150_000, None, "acme"),
        ("r-1", 5, "REFUNDED", None, None, 130_000, None, None, None, None),
        ("r-1", 6, "VISIT", None, None, 130_000, PERIOD, 0, today, "partner"),
        ("r-1", 7, "MERGED_IN", None, None, None, None, None, store_1, None),
        ("r-1", 8, "REFUNDED", None, None, 125_000, None, None, None, None),
        ("r-1", 9, "REFUNDED", None, None, 122_000, None, None, None, None),
        ("r-1", 10, "LOTS_EXPIRED", None, None, None, None, None, None, None),
        ("r-1", 11, "RANK_REVIEWED", "gold", "silver", 122_000, NEXT_PERIOD, None, None, None),
        ("r-1", 12, "EARN", None, None, 1_000, NEXT_PERIOD, 1_000, None, "acme"),
        ("r-1", 13, "REFUNDED", None, None, None, None, None, None, None),  # of period 2026: no spend
        ("r-2", 1, "ACCOUNT_OPENED", None, None, None, None, None, None, None),
        ("r-2", 2, "RANK_REVIEWED", "", "regular", 0, NEXT_PERIOD, None, None, None),
        ("r-3", 1, "ACCOUNT_OPENED", None, None, None, None, None, None, None),
        ("r-3", 2, "RANK_REVIEWED", "", "regular", 0, PERIOD, None, None, None),
        ("r-3", 3, "EARN", None, None, 20_000, PERIOD, 20_000, None, "acme"),
        ("r-3", 4, "VISIT", None, None, 20_000, PERIOD, 0, store_1, "acme"),
        ("r-3", 5, "MERGED_OUT", None, None, None, None, None, None, None),
    ]
    # The accounts rows as the account hashes say (rk, rs, rp, v:); a merged account keeps its own.
    assert [(r[0], r[1], r[2], r[3], _json(r[4])) for r in accounts] == [
        ("r-1", "silver", 1_000, NEXT_PERIOD, today | store_1),
        ("r-2", "regular", 0, NEXT_PERIOD, {}),
        ("r-3", "regular", 20_000, PERIOD, store_1),
    ]
    for member in MEMBERS:
        stored = await account_state(redis, keyspace, member)
        assert (stored.rank_id, stored.rank_spend, stored.rank_period, stored.visits) == tuple(
            next((r[1], r[2], r[3], _json(r[4])) for r in accounts if r[0] == member)
        ), member
    # Earns and visits under the rank program keep their qualifying amount and period; the
    # refunds of r-3's earn, made on r-1 after the merge, are counted on the original's row.
    assert [tuple(r[i] for i in range(7)) for r in transactions] == [
        ("r-1", 3, "EARN", 550, 100, 55_000, PERIOD),
        ("r-1", 4, "EARN", 3_000, 1_500, 150_000, PERIOD),
        ("r-1", 5, "REFUND", 1_500, 0, None, None),
        ("r-1", 6, "VISIT", 7, 0, 0, PERIOD),
        ("r-1", 8, "REFUND", 50, 0, None, None),
        ("r-1", 9, "REFUND", 30, 0, None, None),
        ("r-1", 12, "EARN", 10, 0, 1_000, NEXT_PERIOD),
        ("r-1", 13, "REFUND", 100, 0, None, None),
        ("r-3", 3, "EARN", 200, 80, 20_000, PERIOD),
        ("r-3", 4, "VISIT", 5, 0, 0, PERIOD),
    ]
    in_redis = {m: await redis_records(redis, keyspace, m) for m in MEMBERS}
    in_postgres = {m: {r["seq"]: record_from_row(r) for r in records if r["account_id"] == m} for m in MEMBERS}
    assert in_postgres["r-1"] == in_redis["r-1"]
    assert in_postgres["r-2"] == in_redis["r-2"] == {}
    # r-3's records in Redis never change after the merge: what r-1 refunded of its earn, r-1's
    # f: field keeps, and PostgreSQL's row of the earn says.
    earn = in_redis["r-3"][3]
    lines = [replace(earn.lines[0], refunded=80), *earn.lines[1:]]
    assert in_postgres["r-3"] == {**in_redis["r-3"], 3: replace(earn, refunded=80, lines=lines)}
    assert (await account_state(redis, keyspace, "r-1")).foreign_refunds == foreign["r-1"] == {"r-3.3": "80||80,0"}
    assert set(foreign) == {"r-1"}
    # Visit rules count in campaign_points as campaigns do; none of these drew on a budget.
    assert [(r["campaign_id"], r["rules_version"], r["given"], r["refunded"]) for r in points] == [
        ("gold-double", 1, 1_500, 750),
        ("kiosk-day", 1, 2, 0),
        ("visit", 1, 10, 0),
    ]
    assert {(r["budget_given"], r["budget_refunded"]) for r in points} == {(0, 0)}


async def test_a_review_that_keeps_the_rank_is_journaled_too(
    stack: EmbeddedStack,
    redis: Redis,
    keyspace: Keyspace,
    client: PointsClient,
    server: PointauthServer,
    clock: ManualClock,
    settings: Settings,
    dsn: str,
) -> None:
    """A new period starts the spend again at 0 whether the rank changes or not: the review is an
    event either way, so PostgreSQL's rs and rp follow."""
    await client.create_account("r-1", CARDS["r-1"])
    await client.publish_rule_set(rule_set())
    await client.earn_points(CARDS["r-1"], STORE, 60_000, at(clock.now_ms()))  # silver, kept next period
    clock.advance(NEXT_PERIOD_MS)
    await client.earn_points(CARDS["r-1"], STORE, 2_000, at(clock.now_ms()))
    async with running_worker(stack.redis.url, dsn, keyspace):
        await wait_until_applied(redis, dsn, keyspace, ["r-1"])
    async with connection(dsn) as conn:
        journal = await conn.fetch(
            "SELECT seq, type, rank_from, rank_to, rank_spend, rank_period FROM journal WHERE seq > 3 ORDER BY seq"
        )
        row = await conn.fetchrow("SELECT rank_id, rank_spend, rank_period FROM accounts")
    assert [tuple(r[i] for i in range(6)) for r in journal] == [
        (4, "RANK_REVIEWED", "silver", "silver", 60_000, NEXT_PERIOD),
        (5, "EARN", None, None, 2_000, NEXT_PERIOD),
    ]
    stored = await account_state(redis, keyspace, "r-1")
    assert row is not None
    in_redis = (stored.rank_id, stored.rank_spend, stored.rank_period)
    assert (row[0], row[1], row[2]) == in_redis == ("silver", 2_000, NEXT_PERIOD)


async def test_migration_0005_counts_the_points_given_before_it_by_the_versions_budgets(stack: EmbeddedStack) -> None:
    """Lines journaled before they said whether they drew on a budget count as budgeted where
    their campaign had a budget in the earn's rule set version (as budgets were counted then)."""
    schema = f"m5_{uuid.uuid4().hex[:12]}"
    before = [(v, sql) for v, sql in available_migrations() if v < "0005"]
    this = dict(available_migrations())["0005_ranks_visits"]
    async with connection(stack.postgres.dsn) as conn:
        await conn.execute(f"CREATE SCHEMA {schema}")
        try:
            await conn.execute(f"SET search_path = {schema}")
            for _, sql in before:
                await conn.execute(sql)
            budgeted = '{"campaigns": [{"campaign_id": "funded", "budget": 1000}, {"campaign_id": "capped"}]}'
            unbudgeted = '{"campaigns": [{"campaign_id": "funded", "budget": 0}]}'
            await conn.execute(
                "INSERT INTO rule_sets (version, published_at, rule_set) VALUES"
                " (1, now(), $1::jsonb), (2, now(), $2::jsonb)",
                budgeted,
                unbudgeted,
            )
            await conn.execute(
                "INSERT INTO campaign_points (campaign_id, rules_version, given, refunded) VALUES"
                " ('funded', 1, 33, 11), ('funded', 2, 50, 0), ('capped', 1, 200, 66)"
            )
            await conn.execute(this)
            rows = await conn.fetch("SELECT * FROM campaign_points ORDER BY campaign_id, rules_version")
            budgets = await journal_rules.budget_counts(conn)
        finally:
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    assert [tuple(r[i] for i in range(6)) for r in rows] == [
        ("capped", 1, 200, 66, 0, 0),
        ("funded", 1, 33, 11, 33, 11),
        ("funded", 2, 50, 0, 0, 0),
    ]
    assert budgets == {"funded": 22}
