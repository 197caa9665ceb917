"""Member ranks (会員ランク) through gRPC, against real Redis: up at once when a purchase's spend
reaches a rank (that purchase earns at it), refunds lower the spend, down only at the period's
review (`pointauth ranks review`, or lazily on the member's first earn of a new period)."""

from __future__ import annotations

import asyncio
import io

from redis.asyncio import Redis

from pointauth.client import PointsClient
from pointauth.server.clock import ManualClock
from pointauth.server.config import Settings
from pointauth.server.ledger import Keyspace
from pointauth.server.ops.commands import ranks_review_command
from pointauth.server.ops.ranks import review_ranks
from pointauth.v1 import rules_service_pb2 as rpb
from tests.conftest import DAY_MS, STORE, at
from tests.helpers import stream_events

CARD = "4000000000000501"
# START_MS is 2026-11-18 in Tokyo; 60 days on is January 2027: the next yearly period.
NEXT_PERIOD_MS = 60 * DAY_MS


def program(downgrade: rpb.RankDowngrade.ValueType = rpb.RANK_DOWNGRADE_ONE_STEP) -> rpb.RankProgram:
    return rpb.RankProgram(
        tiers=[
            rpb.RankTier(rank_id="regular", display_name="Regular", min_spend=0),
            rpb.RankTier(rank_id="silver", display_name="Silver", min_spend=50_000),
            rpb.RankTier(rank_id="gold", display_name="Gold", min_spend=200_000),
        ],
        period_months=12,
        downgrade=downgrade,
    )


GOLD_DOUBLE = rpb.Campaign(
    campaign_id="gold-double",
    display_name="Gold double",
    conditions=rpb.CampaignConditions(rank_ids=["gold"]),
    effect=rpb.CampaignEffect(multiply_basis_points=10_000),
)


async def setup(client: PointsClient, downgrade: rpb.RankDowngrade.ValueType = rpb.RANK_DOWNGRADE_ONE_STEP) -> None:
    await client.create_account("member-r", CARD)
    await client.publish_rule_set(rpb.RuleSet(ranks=program(downgrade), campaigns=[GOLD_DOUBLE]))


async def test_a_purchase_that_reaches_a_rank_earns_at_it(client: PointsClient, clock: ManualClock) -> None:
    await setup(client)
    first = await client.earn_points(CARD, STORE, 40_000, at(clock.now_ms()))
    assert (first.rank_id, first.rank_upgraded) == ("regular", False)
    silver = await client.earn_points(CARD, STORE, 15_000, at(clock.now_ms()))
    assert (silver.rank_id, silver.rank_upgraded) == ("silver", True)
    assert [(b.rule_id, b.points, b.note) for b in silver.breakdown] == [
        ("base", 150, ""),
        ("gold-double", 0, "not_rank"),
    ]
    gold = await client.earn_points(CARD, STORE, 150_000, at(clock.now_ms()))
    assert (gold.rank_id, gold.rank_upgraded) == ("gold", True)
    assert [(b.rule_id, b.points) for b in gold.breakdown] == [("base", 1_500), ("gold-double", 1_500)]
    account = await client.get_account(card_number=CARD)
    assert (account.rank_id, account.qualifying_spend) == ("gold", 205_000)


async def test_a_refund_lowers_the_spend_and_the_rank_waits_for_the_review(
    client: PointsClient, clock: ManualClock, settings: Settings, redis: Redis
) -> None:
    await setup(client)
    await client.earn_points(CARD, STORE, 55_000, at(clock.now_ms()))
    big = await client.earn_points(CARD, STORE, 150_000, at(clock.now_ms()))
    assert big.rank_id == "gold"
    await client.refund_transaction(big.transaction_id, points=1_500)  # half of its 3,000 points
    account = await client.get_account(account_id="member-r")
    assert (account.rank_id, account.qualifying_spend) == ("gold", 205_000 - 75_000)
    # The review at the next period: 130,000 fell short of gold's 200,000: one step down.
    clock.advance(NEXT_PERIOD_MS)
    report = await review_ranks(redis, settings, clock)
    assert report is not None
    assert (report.reviewed, report.changed, report.skipped) == (1, 1, 0)
    account = await client.get_account(account_id="member-r")
    assert (account.rank_id, account.qualifying_spend) == ("silver", 0)
    again = await review_ranks(redis, settings, clock)
    assert again is not None
    assert (again.reviewed, again.changed) == (1, 0)


async def test_to_spend_goes_down_to_the_rank_the_spend_supports(
    client: PointsClient, clock: ManualClock, settings: Settings, redis: Redis
) -> None:
    await setup(client, rpb.RANK_DOWNGRADE_TO_SPEND)
    big = await client.earn_points(CARD, STORE, 200_000, at(clock.now_ms()))
    await client.refund_transaction(big.transaction_id, points=3_800)  # 190,000 of 200,000: spend 10,000
    clock.advance(NEXT_PERIOD_MS)
    report = await review_ranks(redis, settings, clock)
    assert report is not None
    assert report.changed == 1
    assert (await client.get_account(account_id="member-r")).rank_id == "regular"


async def test_a_members_first_earn_of_a_new_period_reviews_them_first(
    client: PointsClient, clock: ManualClock, redis: Redis, keyspace: Keyspace
) -> None:
    await setup(client)
    await client.earn_points(CARD, STORE, 210_000, at(clock.now_ms()))
    clock.advance(NEXT_PERIOD_MS)
    earned = await client.earn_points(CARD, STORE, 1_000, at(clock.now_ms()))
    # Gold kept its 210,000 of last period: no downgrade; the new period's spend starts at 1,000.
    assert (earned.rank_id, earned.rank_upgraded) == ("gold", False)
    assert [(b.rule_id, b.points) for b in earned.breakdown] == [("base", 10), ("gold-double", 10)]
    assert (await client.get_account(account_id="member-r")).qualifying_spend == 1_000
    clock.advance(365 * DAY_MS)  # a year with no purchase at all: its spend was 1,000
    later = await client.earn_points(CARD, STORE, 1_000, at(clock.now_ms()))
    assert later.rank_id == "silver"
    events = await stream_events(redis, keyspace, "member-r")
    assert [(e.type, e.rank) for e in events[-2:]] == [("RANK_REVIEWED", ["gold", "silver"]), ("EARN", None)]


async def test_concurrent_earns_cross_a_rank_once(
    client: PointsClient, clock: ManualClock, redis: Redis, keyspace: Keyspace
) -> None:
    await setup(client)
    answers = await asyncio.gather(*(client.earn_points(CARD, STORE, 10_000, at(clock.now_ms())) for _ in range(30)))
    assert sum(a.rank_upgraded for a in answers) == 2  # to silver at 50,000, to gold at 200,000
    assert sorted(a.rank_id for a in answers) == ["gold"] * 11 + ["regular"] * 4 + ["silver"] * 15
    account = await client.get_account(account_id="member-r")
    assert (account.rank_id, account.qualifying_spend) == ("gold", 300_000)
    ups = [e.rank for e in await stream_events(redis, keyspace, "member-r") if e.type == "EARN" and e.rank]
    assert ups == [["regular", "silver"], ["silver", "gold"]]


async def test_simulate_earn_counts_the_purchase_towards_the_rank(client: PointsClient, clock: ManualClock) -> None:
    await setup(client)
    await client.earn_points(CARD, STORE, 190_000, at(clock.now_ms()))
    below = await client.simulate_earn(STORE, 5_000, at(clock.now_ms()), card_number=CARD)
    assert [(b.rule_id, b.points, b.note) for b in below.breakdown] == [
        ("base", 50, ""),
        ("gold-double", 0, "not_rank"),
    ]
    reaching = await client.simulate_earn(STORE, 10_000, at(clock.now_ms()), card_number=CARD)
    assert [(b.rule_id, b.points) for b in reaching.breakdown] == [("base", 100), ("gold-double", 100)]


async def test_the_review_command_reports_what_it_did(client: PointsClient, settings: Settings) -> None:
    out = io.StringIO()
    assert await asyncio.to_thread(ranks_review_command, settings, out) == 1
    assert out.getvalue() == "the current rule set has no rank program: nothing to review\n"
    await setup(client)
    await client.create_account("member-closed", "4000000000000502")
    await client.close_account("member-closed")
    out = io.StringIO()
    assert await asyncio.to_thread(ranks_review_command, settings, out) == 0
    assert out.getvalue() == "reviewed 1 accounts: 0 changed rank, 1 closed or merged skipped\n"
