"""What the rules journal tests drive through gRPC: two rule set versions, earns under each with a
capped and a budgeted campaign, and a partial refund (see rules_story's comments for the figures)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pointauth.client import PointsClient
from pointauth.server.clock import ManualClock
from pointauth.v1 import points_service_pb2 as pb
from pointauth.v1 import rules_service_pb2 as rpb
from tests.conftest import STORE, at

MEMBERS = ["m-1", "m-2"]
CARDS = {"m-1": "4000000000100001", "m-2": "4000000000100002"}
EARN_2 = "0b8f6d3e-3a4c-4b8e-9a51-5f2c7d9e1a21"
REFUND_1 = "0b8f6d3e-3a4c-4b8e-9a51-5f2c7d9e1a22"


def _campaign(cid: str, order: int, effect: rpb.CampaignEffect, **fields: int) -> rpb.Campaign:
    return rpb.Campaign(campaign_id=cid, display_name=cid.title(), order=order, effect=effect, **fields)  # type: ignore[arg-type]


def rule_set(cap: int, funded: int) -> rpb.RuleSet:
    """Campaign "capped" doubles the base points, up to `cap` per member; "funded" adds `funded`
    points from a budget of 1,000."""
    return rpb.RuleSet(
        campaigns=[
            _campaign("capped", 1, rpb.CampaignEffect(multiply_basis_points=20_000), max_points_per_member=cap),
            _campaign("funded", 2, rpb.CampaignEffect(add_points=funded), budget_points=1_000),
        ]
    )


@dataclass(frozen=True)
class RulesStory:
    t0: int
    first: pb.EarnPointsResponse
    """m-1's earn under version 1 (its seq 2)."""
    second: pb.EarnPointsResponse
    """m-1's earn under version 2 (seq 3), request EARN_2 at `second_at`."""
    second_at: datetime
    third: pb.EarnPointsResponse
    """m-2's earn under version 2 (seq 2)."""
    refund: pb.RefundTransactionResponse
    """111 points of `first` (m-1's seq 4), request REFUND_1."""

    def at(self, seconds: int) -> int:
        return self.t0 + seconds * 1000


async def rules_story(client: PointsClient, clock: ManualClock) -> RulesStory:
    """A second apart from the clock's time t0 (the default rate: 1 point per 100):
    0 m-1 and m-2 open; 1 version 1 (capped up to 1,000, funded 33); 2 m-1 earns on 10,000: base
    100, capped 200, funded 33; 3 version 2 (capped up to 250, funded 50); 4 m-1 earns on 10,000:
    base 100, capped 50 (its cap), funded 50; 5 m-2 earns on 1,000: base 10, capped 20, funded 50;
    6 111 points of m-1's first earn refunded: base 34, capped 66, funded 11. So m-1 has counted
    250 - 66 = 184 for capped, m-2 20, and funded has given 33 - 11 + 50 + 50 = 122 of its budget."""
    t0 = clock.now_ms()
    for member, card in CARDS.items():
        await client.create_account(member, card)
    clock.set(t0 + 1000)
    await client.publish_rule_set(rule_set(1_000, 33))
    clock.set(t0 + 2000)
    first = await client.earn_points(CARDS["m-1"], STORE, 10_000, at(clock.now_ms()))
    clock.set(t0 + 3000)
    await client.publish_rule_set(rule_set(250, 50))
    clock.set(t0 + 4000)
    second_at = at(clock.now_ms())
    second = await client.earn_points(CARDS["m-1"], STORE, 10_000, second_at, request_id=EARN_2)
    clock.set(t0 + 5000)
    third = await client.earn_points(CARDS["m-2"], STORE, 1_000, at(clock.now_ms()))
    clock.set(t0 + 6000)
    refund = await client.refund_transaction(first.transaction_id, points=111, request_id=REFUND_1)
    assert [(b.rule_id, b.points, b.note) for b in first.breakdown] == [
        ("base", 100, ""), ("capped", 200, ""), ("funded", 33, ""),
    ]  # fmt: skip
    assert [(b.rule_id, b.points, b.note) for b in second.breakdown] == [
        ("base", 100, ""), ("capped", 50, "member_cap"), ("funded", 50, ""),
    ]  # fmt: skip
    assert [(b.rule_id, b.points, b.note) for b in third.breakdown] == [
        ("base", 10, ""), ("capped", 20, ""), ("funded", 50, ""),
    ]  # fmt: skip
    assert refund.refunded_points == 111
    return RulesStory(t0, first, second, second_at, third, refund)
