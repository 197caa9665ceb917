"""The rules survive the loss of Redis: rehydrate gives back members' rule counts and first earns,
records' lines, the published rule sets (the current version too) and the campaigns' budget
counts, with the budget marks of the requests a till may still retry; reconcile names each way
the two stores can differ about them."""

from __future__ import annotations

import asyncio
import io

import msgspec
from redis.asyncio import Redis

from pointauth.client import PointsClient
from pointauth.server.app import PointauthServer
from pointauth.server.clock import ManualClock
from pointauth.server.config import LedgerSettings, PostgresSettings, RedisSettings, Settings
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.journal.pg import connection
from pointauth.server.ledger import AccountView, Keyspace, Ledger
from pointauth.server.ledger.rulebook import RuleBook
from pointauth.server.ops import reconcile, reconcile_command, rehydrate
from pointauth.server.ops.rules import RulesDifference
from tests.conftest import STORE
from tests.journal.rules_story import CARDS, EARN_2, MEMBERS, REFUND_1, RulesStory, rule_set, rules_story
from tests.journal.support import DAY_MS, running_worker, wait_until_applied
from tests.journal.test_rules_journal import applied_rule_sets, redis_records

RETENTION_MS = 90 * DAY_MS


async def _views(ledger: Ledger) -> dict[str, AccountView]:
    """GetAccount of every member, but for x0 (where pruning resumes: rehydrate may start it later)."""
    views = {}
    for account in MEMBERS:
        view = await ledger.account(account)
        views[account] = view._replace(stored=msgspec.structs.replace(view.stored, x0=None))
    return views


async def _journaled(stack: EmbeddedStack, client: PointsClient, clock: ManualClock, dsn: str) -> RulesStory:
    story = await rules_story(client, clock)
    keyspace = Keyspace(16)
    redis = Redis.from_url(stack.redis.url)
    try:
        async with running_worker(stack.redis.url, dsn, keyspace) as worker:
            await wait_until_applied(redis, dsn, keyspace, MEMBERS)
            await applied_rule_sets(worker, 2)
    finally:
        await redis.aclose()
    return story


async def test_rehydrate_gives_back_counts_first_earns_lines_rule_sets_and_budgets(
    stack: EmbeddedStack,
    redis: Redis,
    ledger: Ledger,
    client: PointsClient,
    server: PointauthServer,
    clock: ManualClock,
    keyspace: Keyspace,
    dsn: str,
) -> None:
    story = await _journaled(stack, client, clock, dsn)
    book = RuleBook(redis, keyspace, clock)
    before = await _views(ledger)
    records = {m: await redis_records(redis, keyspace, m) for m in MEMBERS}
    rule_sets = {v: await book.get(v) for v in (1, 2)}
    assert (before["m-1"].stored.rule_counts, before["m-1"].stored.first_earn_ms) == ({"capped": 184}, story.at(2))
    assert (before["m-2"].stored.rule_counts, before["m-2"].stored.first_earn_ms) == ({"capped": 20}, story.at(5))
    assert [line.refunded for line in records["m-1"][2].lines] == [34, 66, 11]
    assert await ledger.budget_spent("funded") == 122

    await redis.flushall()  # Redis lost
    report = await rehydrate(redis, dsn, keyspace, now_ms=clock.now_ms(), transaction_retention_ms=RETENTION_MS)
    assert (report.accounts, report.rule_sets, report.budgets) == (2, 2, 1)
    assert await _views(ledger) == before
    assert {m: await redis_records(redis, keyspace, m) for m in MEMBERS} == records
    assert (await book.version(), {v: await book.get(v) for v in (1, 2)}) == (2, rule_sets)
    assert (await ledger.budget_spent("funded"), await redis.exists(keyspace.budget("capped"))) == (122, 0)
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).ok
    # The server follows the directory's and rule set's versions every second; a poll may have
    # seen the flushed Redis: take in what rehydrate restored now rather than wait for the next.
    await server.directory.refresh()
    await server.rules.refresh()

    # The tills carry on. A retried refund and a retried earn get their first answers, and the
    # budget marks that came back with their records keep either from counting twice.
    again = await client.refund_transaction(story.first.transaction_id, points=111, request_id=REFUND_1)
    assert again == story.refund
    assert await ledger.budget_spent("funded") == 122
    assert await client.earn_points(CARDS["m-1"], STORE, 10_000, story.second_at, request_id=EARN_2) == story.second
    assert await ledger.budget_spent("funded") == 122
    # The script reads the restored fields: m-1's cap has 250 - 184 = 66 points left, and m-2
    # has earned before; the next publication is version 3.
    more = await client.earn_points(CARDS["m-1"], STORE, 10_000, story.second_at)
    assert [(b.rule_id, b.points, b.note) for b in more.breakdown] == [
        ("base", 100, ""), ("capped", 66, "member_cap"), ("funded", 50, ""),
    ]  # fmt: skip
    assert await ledger.budget_spent("funded") == 172
    assert (await client.publish_rule_set(rule_set(100, 1))).version == 3


async def test_reconcile_names_rule_counts_first_earns_rule_sets_and_budgets_that_differ(
    stack: EmbeddedStack,
    redis: Redis,
    client: PointsClient,
    server: PointauthServer,
    clock: ManualClock,
    keyspace: Keyspace,
    dsn: str,
) -> None:
    story = await _journaled(stack, client, clock, dsn)
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).ok
    m1, m2 = (keyspace.account(m).account for m in MEMBERS)
    rules = keyspace.rules()
    # A count raised and a first earn lost behind the journal's back; a rule set lost and the
    # version moved on; the budget count lowered (points given back twice, say).
    await redis.hset(m1, "k:capped", "999")
    await redis.hset(m1, "k:funded", "5")
    await redis.hdel(m2, "fe")
    await redis.hdel(rules.sets, "1")
    await redis.set(rules.version, 3)
    await redis.set(keyspace.budget("funded"), 100)

    report = await reconcile(redis, dsn, keyspace, settle_seconds=0)
    assert sorted(str(d) for d in report.differences) == [
        "m-1: rule count capped: Redis 999, PostgreSQL 184",
        "m-1: rule count funded: Redis 5, PostgreSQL absent",
        f"m-2: first earn: Redis absent, PostgreSQL {story.at(5)}",
    ]
    assert report.rules == [
        RulesDifference("rule set 1", "missing", f"published at {story.at(1)} (2 campaigns)"),
        RulesDifference("current rule set version", "3", "2"),
        RulesDifference(
            "budget of campaign funded", "100", "122",
            "22 points given back that were never counted: the campaign may give them beyond its budget",
        ),
    ]  # fmt: skip
    assert not report.ok

    # Above PostgreSQL's, a budget count is earns in flight as long as it moves; one that stays
    # put for the whole comparison is points reserved and never settled.
    await redis.set(keyspace.budget("funded"), 130)
    leaked = RulesDifference(
        "budget of campaign funded", "130", "122", "8 points reserved and never settled, or earns in flight"
    )
    assert leaked in (await reconcile(redis, dsn, keyspace, settle_seconds=0)).rules
    moving = asyncio.Event()

    async def earns_in_flight() -> None:
        while not moving.is_set():
            await redis.incrby(keyspace.budget("funded"), 1)
            await asyncio.sleep(0.05)

    task = asyncio.create_task(earns_in_flight())
    try:
        in_flight = await reconcile(redis, dsn, keyspace, settle_seconds=1)
    finally:
        moving.set()
        await task
    assert [d.what for d in in_flight.rules] == ["rule set 1", "current rule set version"]

    settings = Settings(
        redis=RedisSettings(url=stack.redis.url), postgres=PostgresSettings(dsn=dsn), ledger=LedgerSettings(shards=16)
    )
    out = io.StringIO()
    assert await asyncio.to_thread(reconcile_command, settings, 0.0, out) == 1
    said = out.getvalue().splitlines()
    assert f"rules: rule set 1: Redis missing, PostgreSQL published at {story.at(1)} (2 campaigns)" in said
    assert said[-1].endswith("Redis and PostgreSQL DIFFER for 2 accounts and 3 rule sets or budgets")

    # And a rule set PostgreSQL has otherwise than Redis: the fields that differ are named.
    async with connection(dsn) as conn:
        rates = '[["acme", "", {"points": 3, "per_amount": 100}]]'
        await conn.execute(
            "UPDATE rule_sets SET rule_set = jsonb_set(rule_set, '{base_rates}', $1::jsonb) WHERE version = 2", rates
        )
    changed = await reconcile(redis, dsn, keyspace, settle_seconds=0)
    assert RulesDifference("rule set 2", "differs", "differs", "in base_rates") in changed.rules
