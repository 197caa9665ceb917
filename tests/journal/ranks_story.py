"""What the ranks and visits journal tests drive through gRPC: a rank program with a rank-only
campaign and visit rules, earns crossing ranks, refunds lowering the spend (one of a merged
member's earn, twice, on the account it was merged into), check-ins, a merge carrying a visit
limit, and the period's review (see ranks_story's comments for the figures)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from redis.asyncio import Redis

from pointauth.client import PointsClient
from pointauth.server.clock import ManualClock
from pointauth.server.config import Settings
from pointauth.server.ops.ranks import review_ranks
from pointauth.v1 import common_pb2
from pointauth.v1 import points_service_pb2 as pb
from pointauth.v1 import rules_service_pb2 as rpb
from tests.conftest import DAY_MS, STORE, at

MEMBERS = ["r-1", "r-2", "r-3"]
CARDS = {"r-1": "4000000000200001", "r-2": "4000000000200002", "r-3": "4000000000200003"}
KIOSK = common_pb2.PointOfSale(
    company_id="partner", store_id="store-9", terminal_id="kiosk-1", channel=common_pb2.CHANNEL_KIOSK
)
# START_MS is 2026-11-18 in Tokyo: rank period 2026 (yearly periods are the years); 60 days on
# is 2027-01-17, in period 2027.
PERIOD, NEXT_PERIOD = 2026, 2027
DAY, NEXT_DAY = date(2026, 11, 18).toordinal(), date(2027, 1, 17).toordinal()
NEXT_PERIOD_MS = 60 * DAY_MS


def rule_set() -> rpb.RuleSet:
    return rpb.RuleSet(
        ranks=rpb.RankProgram(
            tiers=[
                rpb.RankTier(rank_id="regular", display_name="Regular", min_spend=0),
                rpb.RankTier(rank_id="silver", display_name="Silver", min_spend=50_000),
                rpb.RankTier(rank_id="gold", display_name="Gold", min_spend=200_000),
            ],
            period_months=12,
            downgrade=rpb.RANK_DOWNGRADE_ONE_STEP,
        ),
        campaigns=[
            rpb.Campaign(
                campaign_id="gold-double",
                display_name="Gold double",
                conditions=rpb.CampaignConditions(rank_ids=["gold"]),
                effect=rpb.CampaignEffect(multiply_basis_points=10_000),
            )
        ],
        visits=[
            rpb.VisitRule(rule_id="visit", display_name="Visit", points=5, limit=rpb.VISIT_LIMIT_PER_STORE_PER_DAY),
            rpb.VisitRule(
                rule_id="kiosk-day",
                display_name="Kiosk check-in",
                points=2,
                limit=rpb.VISIT_LIMIT_PER_DAY,
                conditions=rpb.CampaignConditions(channels=[common_pb2.CHANNEL_KIOSK]),
                lot_kind=common_pb2.LOT_KIND_LIMITED_TIME,
                expire_days=30,
            ),
        ],
    )


@dataclass(frozen=True)
class RanksStory:
    t0: int
    silver: pb.EarnPointsResponse
    """r-1's earn of 55,000 reaching silver (its seq 3, after its first review at seq 2)."""
    gold: pb.EarnPointsResponse
    """r-1's earn of 150,000 reaching gold (seq 4)."""
    merged_earn: pb.EarnPointsResponse
    """r-3's earn of 20,000 (its seq 3), refunded twice on r-1 once r-3 is merged into it."""
    visit: pb.CheckInResponse
    """r-1's check-in at the kiosk (seq 6)."""
    later: pb.EarnPointsResponse
    """r-1's earn of 1,000 in the next period (seq 12)."""

    def at(self, seconds: int) -> int:
        return self.t0 + seconds * 1000


async def ranks_story(client: PointsClient, clock: ManualClock, redis: Redis, settings: Settings) -> RanksStory:
    """A second apart from the clock's time t0 (the default rate: 1 point per 100):
    0 r-1, r-2 and r-3 open; 1 the rule set (version 1);
    2 r-1 earns on 55,000: reviewed first ("" -> regular, period 2026: seq 2), then up to silver
      (seq 3: 550 points, spend 55,000);
    3 r-1 earns on 150,000: up to gold, which doubles (seq 4: 1,500 + 1,500, spend 205,000);
    4 r-3 earns on 20,000 (reviewed, seq 2; the earn seq 3: 200 points, spend 20,000);
    5 1,500 of r-1's gold earn refunded (seq 5): spend 205,000 - 75,000 = 130,000;
    6 r-1 checks in at the kiosk (seq 6: kiosk-day 2, limited-time, and visit 5; spend unchanged);
    7 r-3 checks in at the store (seq 4: visit 5);
    8 r-3 merged into r-1 (r-3's seq 5; r-1's seq 7 brings its visit limit visit:store-1);
    9 50 of r-3's earn refunded, on r-1 (seq 8): spend 130,000 - 5,000 = 125,000;
    10 30 more of it (seq 9): spend 122,000;
    then 60 days on, in period 2027:
    +0 `pointauth ranks review`: r-1's kiosk lot expires (seq 10), and 122,000 fell short of gold:
       down to silver (seq 11, spend 0); r-2 is reviewed ("" -> regular, its seq 2); r-3 is skipped;
    +1 r-1 earns on 1,000 (seq 12: 10 points, spend 1,000);
    +2 100 points of r-1's silver earn refunded (seq 13): of period 2026, so the spend stays."""
    t0 = clock.now_ms()
    for member, card in CARDS.items():
        await client.create_account(member, card)
    clock.set(t0 + 1000)
    await client.publish_rule_set(rule_set())
    clock.set(t0 + 2000)
    silver = await client.earn_points(CARDS["r-1"], STORE, 55_000, at(clock.now_ms()))
    clock.set(t0 + 3000)
    gold = await client.earn_points(CARDS["r-1"], STORE, 150_000, at(clock.now_ms()))
    clock.set(t0 + 4000)
    merged_earn = await client.earn_points(CARDS["r-3"], STORE, 20_000, at(clock.now_ms()))
    clock.set(t0 + 5000)
    await client.refund_transaction(gold.transaction_id, points=1_500)
    clock.set(t0 + 6000)
    visit = await client.check_in(CARDS["r-1"], KIOSK, at(clock.now_ms()))
    clock.set(t0 + 7000)
    await client.check_in(CARDS["r-3"], STORE, at(clock.now_ms()))
    clock.set(t0 + 8000)
    await client.merge_accounts("r-3", "r-1", operator_id="op-1", reason="same member")
    clock.set(t0 + 9000)
    await client.refund_transaction(merged_earn.transaction_id, points=50)
    clock.set(t0 + 10_000)
    await client.refund_transaction(merged_earn.transaction_id, points=30)
    clock.set(t0 + NEXT_PERIOD_MS)
    report = await review_ranks(redis, settings, clock)
    assert report is not None
    assert (report.reviewed, report.changed, report.skipped) == (2, 1, 1)
    clock.set(t0 + NEXT_PERIOD_MS + 1000)
    later = await client.earn_points(CARDS["r-1"], STORE, 1_000, at(clock.now_ms()))
    clock.set(t0 + NEXT_PERIOD_MS + 2000)
    await client.refund_transaction(silver.transaction_id, points=100)

    assert (silver.rank_id, silver.rank_upgraded, silver.earned_points) == ("silver", True, 550)
    assert (gold.rank_id, gold.rank_upgraded, gold.earned_points) == ("gold", True, 3_000)
    assert (merged_earn.rank_id, merged_earn.earned_points) == ("regular", 200)
    assert [(b.rule_id, b.points) for b in visit.breakdown] == [("kiosk-day", 2), ("visit", 5)]
    assert (later.rank_id, later.rank_upgraded, later.earned_points) == ("silver", False, 10)
    account = await client.get_account(account_id="r-1")
    assert (account.rank_id, account.qualifying_spend) == ("silver", 1_000)
    return RanksStory(t0, silver, gold, merged_earn, visit, later)
