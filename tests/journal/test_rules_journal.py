"""The rules' way to PostgreSQL: the write-behind copies each rule set publication (once, whatever
the redeliveries), the earns' and refunds' lines, rule set versions, members' rule counts and
first earns, and the points each campaign gave and had refunded under each version; the records'
lines stay what the ledger script keeps."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from redis.asyncio import Redis

from pointauth.client import PointsClient
from pointauth.server.clock import ManualClock, to_time
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.domain.earning import Campaign, Conditions, Effect, Rate, RuleSet
from pointauth.server.journal import rules as journal_rules
from pointauth.server.journal.events import EntryId, StreamEntry
from pointauth.server.journal.pg import connection
from pointauth.server.journal.writer import JournalWriter, record_from_row
from pointauth.server.ledger import Keyspace, Ledger, codec
from pointauth.server.ledger.rulebook import RuleBook
from tests.conftest import START_MS
from tests.journal.rules_story import MEMBERS, rules_story
from tests.journal.support import running_worker, wait_until_applied


async def redis_records(redis: Redis, keyspace: Keyspace, account: str) -> dict[int, codec.TransactionRecord]:
    """The account's transaction records as the script stored them, by seq."""
    raw: Any = await redis.hgetall(keyspace.account(account).transactions)
    return {int(seq): codec.decode_record(rec) for seq, rec in raw.items() if seq.isdigit()}


async def applied_rule_sets(worker: Any, count: int) -> None:
    for _ in range(300):
        if worker.rule_sets_applied >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the worker copied {worker.rule_sets_applied} of {count} rule sets")


def _json(raw: str | None) -> Any:
    return None if raw is None else msgspec.json.decode(raw)


async def test_the_worker_copies_rule_sets_lines_counts_first_earns_and_campaign_points(
    stack: EmbeddedStack, redis: Redis, keyspace: Keyspace, client: PointsClient, clock: ManualClock, dsn: str
) -> None:
    story = await rules_story(client, clock)
    at = story.at
    lot_1, lot_2 = int(story.first.breakdown[0].lot_id), int(story.second.breakdown[0].lot_id)
    lot_m2 = int(story.third.breakdown[0].lot_id)
    async with running_worker(stack.redis.url, dsn, keyspace) as worker:
        await wait_until_applied(redis, dsn, keyspace, MEMBERS)
        await applied_rule_sets(worker, 2)

    book = RuleBook(redis, keyspace, clock)
    async with connection(dsn) as conn:
        rule_sets = await conn.fetch("SELECT version, published_at, rule_set::text FROM rule_sets ORDER BY version")
        journal = await conn.fetch(
            "SELECT account_id, seq, type, lines::text, rules_version, rule_counts::text, first_earn FROM journal"
            " ORDER BY account_id, seq"
        )
        transactions = await conn.fetch(
            "SELECT account_id, seq, type, refunded, lines::text, rules_version FROM transactions"
            " ORDER BY account_id, seq"
        )
        accounts = await conn.fetch(
            "SELECT account_id, rule_counts::text, first_earn_at FROM accounts ORDER BY account_id"
        )
        points = await conn.fetch(
            "SELECT campaign_id, rules_version, given, refunded, budget_given, budget_refunded FROM campaign_points"
            " ORDER BY 1, 2"
        )
        records = await conn.fetch("SELECT * FROM transactions ORDER BY account_id, seq")
        budgets = await journal_rules.budget_counts(conn)

    # Each version as Redis keeps it, as JSON, at its publication time.
    assert [(r[0], r[1]) for r in rule_sets] == [(1, to_time(at(1))), (2, to_time(at(3)))]
    for version, row in zip((1, 2), rule_sets, strict=True):
        assert journal_rules.rule_set_from_json(row[2]) == await book.get(version)
    assert [(c["campaign_id"], c["max_per_member"], c["budget"]) for c in _json(rule_sets[1][2])["campaigns"]] == [
        ("capped", 250, 0),
        ("funded", 0, 1_000),
    ]

    assert [(r[0], r[1], r[2], _json(r[3]), r[4], _json(r[5]), r[6]) for r in journal] == [
        ("m-1", 1, "ACCOUNT_OPENED", None, None, None, None),
        ("m-1", 2, "EARN", [["base", 100, lot_1, "", 0, 0], ["capped", 200, lot_1, "", 0, 0],
                            ["funded", 33, lot_1, "", 0, 1]], 1, {"capped": 200}, True),
        ("m-1", 3, "EARN", [["base", 100, lot_2, "", 0, 0], ["capped", 50, lot_2, "member_cap", 0, 0],
                            ["funded", 50, lot_2, "", 0, 1]], 2, {"capped": 250}, None),
        ("m-1", 4, "REFUNDED", [["base", 34, lot_1, "", 0, 0], ["capped", 66, lot_1, "", 0, 0],
                                ["funded", 11, lot_1, "", 0, 1]], None, {"capped": 184}, None),
        ("m-2", 1, "ACCOUNT_OPENED", None, None, None, None),
        ("m-2", 2, "EARN", [["base", 10, lot_m2, "", 0, 0], ["capped", 20, lot_m2, "", 0, 0],
                            ["funded", 50, lot_m2, "", 0, 1]], 2, {"capped": 20}, True),
    ]  # fmt: skip
    # The first earn's lines say what the refund took back of each (the script's figures).
    assert [(r[0], r[1], r[2], r[3], _json(r[4]), r[5]) for r in transactions] == [
        ("m-1", 2, "EARN", 111, [["base", 100, lot_1, "", 34, 0], ["capped", 200, lot_1, "", 66, 0],
                                 ["funded", 33, lot_1, "", 11, 1]], 1),
        ("m-1", 3, "EARN", 0, [["base", 100, lot_2, "", 0, 0], ["capped", 50, lot_2, "member_cap", 0, 0],
                               ["funded", 50, lot_2, "", 0, 1]], 2),
        ("m-1", 4, "REFUND", 0, [["base", 34, lot_1, "", 0, 0], ["capped", 66, lot_1, "", 0, 0],
                                 ["funded", 11, lot_1, "", 0, 1]], None),
        ("m-2", 2, "EARN", 0, [["base", 10, lot_m2, "", 0, 0], ["capped", 20, lot_m2, "", 0, 0],
                               ["funded", 50, lot_m2, "", 0, 1]], 2),
    ]  # fmt: skip
    for member in MEMBERS:
        in_postgres = {r["seq"]: record_from_row(r) for r in records if r["account_id"] == member}
        assert in_postgres == await redis_records(redis, keyspace, member), member
    assert [(r[0], _json(r[1]), r[2]) for r in accounts] == [
        ("m-1", {"capped": 184}, to_time(at(2))),
        ("m-2", {"capped": 20}, to_time(at(5))),
    ]
    # Only the funded campaign's lines drew on a budget (their sixth element, budgeted).
    assert [tuple(r[i] for i in range(6)) for r in points] == [
        ("capped", 1, 200, 66, 0, 0),
        ("capped", 2, 70, 0, 0, 0),
        ("funded", 1, 33, 11, 33, 11),
        ("funded", 2, 100, 0, 100, 0),
    ]
    assert budgets == {"funded": 122}
    assert int(await redis.get(keyspace.budget("funded")) or 0) == 122


async def test_a_publication_delivered_again_or_late_changes_nothing(keyspace: Keyspace, dsn: str) -> None:
    stream = keyspace.events(0)
    funded = Campaign("funded", "Funded", 1, Conditions(skus=frozenset({"b", "a"})), Effect("add", points=5), budget=9)
    one = RuleSet(1, START_MS, base_rates=(("acme", "", Rate(2, 100)),), campaigns=(funded,))
    other = RuleSet(1, START_MS + 5, campaigns=())  # another rule set under the same version

    def delivered(n: int, rule_set: RuleSet) -> tuple[StreamEntry, codec.RuleSetPublished]:
        published = codec.RuleSetPublished(rule_set.version, rule_set.published_ms, rule_set)
        fields = {codec.RULE_SET_FIELD: codec.encode_rule_set_published(published)}
        return StreamEntry(stream, 0, EntryId(START_MS, n), fields), published

    writer = JournalWriter(keyspace)
    async with connection(dsn) as conn:
        await writer.prepare(conn)
        await writer.apply(conn, [], rule_sets=[delivered(1, one), delivered(1, one)])
        await writer.apply(conn, [], rule_sets=[delivered(1, one)])
        await writer.apply(conn, [], rule_sets=[delivered(2, other)])
        rows = await conn.fetch("SELECT version, published_at, rule_set::text FROM rule_sets")
        position = await conn.fetchrow("SELECT applied_ms, applied_seq, applied_events FROM stream_positions")
        assert await journal_rules.read_rule_sets(conn) == {1: one}
    assert [(r[0], r[1]) for r in rows] == [(1, to_time(START_MS))]
    assert _json(rows[0][2])["campaigns"][0]["conditions"]["skus"] == ["a", "b"]
    # Publications move the stream's applied position, and count as no events.
    assert position is not None
    assert tuple(position[i] for i in range(3)) == (START_MS, 2, 0)


async def test_a_publication_is_no_dead_letter_beside_the_events_of_shard_0(
    stack: EmbeddedStack, redis: Redis, keyspace: Keyspace, ledger: Ledger, clock: ManualClock, dsn: str
) -> None:
    book = RuleBook(redis, keyspace, clock)
    await book.publish(RuleSet(0, campaigns=(Campaign("c", "C", 1, Conditions(), Effect("add", points=1)),)))
    async with running_worker(stack.redis.url, dsn, keyspace) as worker:
        await applied_rule_sets(worker, 1)
        assert worker.dead_lettered == 0
    async with connection(dsn) as conn:
        assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 0
        assert await journal_rules.read_rule_sets(conn) == {1: await book.get(1)}
