"""What the coupons journal tests drive through gRPC: a coupon campaign issuing coupons to two
members, coupons used, and a merge of a member with coupons into the other (each coupon moving
under the id it was issued with), whose card then uses one of the moved coupons."""

from __future__ import annotations

from dataclasses import dataclass

from pointauth.client import PointsClient
from pointauth.server.clock import ManualClock
from pointauth.v1 import points_service_pb2 as pb
from pointauth.v1 import rules_service_pb2 as rpb
from tests.conftest import STORE, at

MEMBERS = ["q-1", "q-2"]
CARDS = {"q-1": "4000000000300001", "q-2": "4000000000300002"}
THANKS = rpb.Campaign(
    campaign_id="thanks",
    display_name="Thanks",
    conditions=rpb.CampaignConditions(min_amount=5_000),
    effect=rpb.CampaignEffect(coupon=rpb.CouponOffer(display_name="10% off", valid_days=30)),
    max_points_per_member=2,
)


@dataclass(frozen=True)
class CouponsStory:
    t0: int
    first: pb.Coupon
    """q-1's coupon "q-1.2.2" (its earn at seq 2, the campaign's line 2), used at 4 (q-1's seq 3)."""
    other: pb.Coupon
    """q-2's coupon "q-2.2.2", used at 6 (q-2's seq 4); moved to q-1 under its id."""
    kept: pb.Coupon
    """q-2's coupon "q-2.3.2", moved to q-1 under its id, used there at 8."""

    def at(self, seconds: int) -> int:
        return self.t0 + seconds * 1000


def ms(coupon: pb.Coupon) -> tuple[int, int, int]:
    """(issued, valid before, used or 0) of a coupon as the API shows it."""
    used = coupon.use_time.ToMilliseconds() if coupon.HasField("use_time") else 0
    return coupon.issue_time.ToMilliseconds(), coupon.expire_time.ToMilliseconds(), used


async def coupons_story(client: PointsClient, clock: ManualClock) -> CouponsStory:
    """A second apart from the clock's time t0:
    0 q-1 and q-2 open; 1 the rule set (version 1) with the coupon campaign "thanks";
    2 q-1 earns on 6,000: coupon q-1.2.2 (seq 2); 3 q-2 earns on 6,000: coupon q-2.2.2 (seq 2);
    4 q-1 uses its q-1.2.2 (seq 3); 5 q-2 earns on 6,000 again: coupon q-2.3.2 (seq 3);
    6 q-2 uses its q-2.2.2 (seq 4);
    7 q-2 merged into q-1 (q-2's seq 5; q-1's seq 4): q-2.2.2 and q-2.3.2 land under their ids;
    8 q-1's card uses q-2.3.2 (q-1's seq 5)."""
    t0 = clock.now_ms()
    for member, card in CARDS.items():
        await client.create_account(member, card)
    clock.set(t0 + 1000)
    await client.publish_rule_set(rpb.RuleSet(campaigns=[THANKS]))
    clock.set(t0 + 2000)
    [first] = (await client.earn_points(CARDS["q-1"], STORE, 6_000, at(clock.now_ms()))).coupons
    clock.set(t0 + 3000)
    [other] = (await client.earn_points(CARDS["q-2"], STORE, 6_000, at(clock.now_ms()))).coupons
    clock.set(t0 + 4000)
    first = await client.use_coupon(CARDS["q-1"], first.coupon_id, STORE)
    clock.set(t0 + 5000)
    [kept] = (await client.earn_points(CARDS["q-2"], STORE, 6_000, at(clock.now_ms()))).coupons
    clock.set(t0 + 6000)
    other = await client.use_coupon(CARDS["q-2"], other.coupon_id, STORE)
    clock.set(t0 + 7000)
    await client.merge_accounts("q-2", "q-1", operator_id="op-1", reason="same member")
    clock.set(t0 + 8000)
    kept = await client.use_coupon(CARDS["q-1"], kept.coupon_id, STORE)

    assert (first.coupon_id, other.coupon_id, kept.coupon_id) == ("q-1.2.2", "q-2.2.2", "q-2.3.2")
    assert [ms(c)[2] for c in (first, other, kept)] == [t0 + 4000, t0 + 6000, t0 + 8000]
    shown = {c.coupon_id: (c.campaign_id, *ms(c)) for c in (await client.get_account(account_id="q-1")).coupons}
    assert shown == {
        "q-1.2.2": ("thanks", *ms(first)),
        "q-2.2.2": ("thanks", *ms(other)),
        "q-2.3.2": ("thanks", *ms(kept)),
    }
    assert list((await client.get_account(account_id="q-2")).coupons) == []
    return CouponsStory(t0, first, other, kept)
