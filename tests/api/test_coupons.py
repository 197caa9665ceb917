"""Coupons (クーポン) through gRPC, against real Redis: issued by a campaign within the member's
cap, listed, printed, used once within their validity, whatever the concurrency."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pointauth.client import NotFoundError, PointauthError, PointsClient, RefusedError, new_request_id
from pointauth.server.clock import ManualClock
from pointauth.v1 import points_service_pb2 as pb
from pointauth.v1 import rules_service_pb2 as rpb
from tests.conftest import DAY_MS, START_MS, STORE, at

CARD = "4000000000000801"
THANKS = rpb.Campaign(
    campaign_id="thanks",
    display_name="Thanks",
    conditions=rpb.CampaignConditions(min_amount=5_000),
    effect=rpb.CampaignEffect(coupon=rpb.CouponOffer(display_name="10% off", valid_days=30)),
    max_points_per_member=2,
)


@pytest.fixture
async def shopper(client: PointsClient) -> str:
    await client.create_account("shopper", CARD)
    await client.publish_rule_set(rpb.RuleSet(campaigns=[THANKS]))
    return CARD


async def test_a_campaign_issues_a_coupon_shown_on_the_answer_the_receipt_and_the_account(
    client: PointsClient, shopper: str, clock: ManualClock
) -> None:
    small = await client.earn_points(shopper, STORE, 4_999, at(clock.now_ms()))
    assert list(small.coupons) == []
    earned = await client.earn_points(shopper, STORE, 6_000, at(clock.now_ms()))
    [coupon] = earned.coupons
    assert (coupon.campaign_id, coupon.issue_time.ToMilliseconds(), coupon.expire_time.ToMilliseconds()) == (
        "thanks",
        START_MS,
        START_MS + 30 * DAY_MS,
    )
    assert not coupon.HasField("use_time")
    assert [(b.rule_id, b.points) for b in earned.breakdown] == [("base", 60), ("thanks", 0)]
    assert earned.earned_points == 60
    assert [line.text for line in earned.receipt_lines if line.kind == pb.RECEIPT_LINE_KIND_COUPON] == [
        f"Coupon 10% off ({coupon.coupon_id}) valid until 2026-12-18"
    ]
    assert list((await client.get_account(card_number=shopper)).coupons) == [coupon]


async def test_a_coupon_is_used_once_and_a_retry_answers_as_the_first_time(
    client: PointsClient, shopper: str, clock: ManualClock
) -> None:
    [coupon] = (await client.earn_points(shopper, STORE, 6_000, at(clock.now_ms()))).coupons
    clock.advance(DAY_MS)
    rid = new_request_id()
    used = await client.use_coupon(shopper, coupon.coupon_id, STORE, request_id=rid)
    assert used.use_time.ToMilliseconds() == START_MS + DAY_MS
    assert await client.use_coupon(shopper, coupon.coupon_id, STORE, request_id=rid) == used
    with pytest.raises(RefusedError) as caught:
        await client.use_coupon(shopper, coupon.coupon_id, STORE)
    assert (caught.value.code, caught.value.reason, caught.value.metadata) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "COUPON_ALREADY_USED",
        {"used_at": str(START_MS + DAY_MS)},
    )
    with pytest.raises(NotFoundError) as missing:
        await client.use_coupon(shopper, "99.9", STORE)
    assert missing.value.reason == "COUPON_NOT_FOUND"
    assert list((await client.get_account(card_number=shopper)).coupons) == [used]


async def test_an_expired_coupon_is_refused(client: PointsClient, shopper: str, clock: ManualClock) -> None:
    [coupon] = (await client.earn_points(shopper, STORE, 6_000, at(clock.now_ms()))).coupons
    clock.advance(30 * DAY_MS)
    with pytest.raises(RefusedError) as caught:
        await client.use_coupon(shopper, coupon.coupon_id, STORE)
    assert caught.value.reason == "COUPON_EXPIRED"


async def test_a_member_gets_as_many_coupons_as_the_cap_and_uses_each_once(
    client: PointsClient, shopper: str, clock: ManualClock
) -> None:
    answers = await asyncio.gather(*(client.earn_points(shopper, STORE, 6_000, at(clock.now_ms())) for _ in range(5)))
    coupons = [c for a in answers for c in a.coupons]
    assert len(coupons) == 2
    assert sorted(a.breakdown[1].note for a in answers) == ["", "", "member_cap", "member_cap", "member_cap"]
    outcomes = await asyncio.gather(
        *(client.use_coupon(shopper, coupons[0].coupon_id, STORE) for _ in range(10)), return_exceptions=True
    )
    assert sum(1 for o in outcomes if isinstance(o, pb.Coupon)) == 1
    assert {o.reason for o in outcomes if isinstance(o, PointauthError)} == {"COUPON_ALREADY_USED"}


async def test_simulate_earn_says_which_campaigns_would_issue_a_coupon(
    client: PointsClient, shopper: str, clock: ManualClock
) -> None:
    would = await client.simulate_earn(STORE, 6_000, at(clock.now_ms()), card_number=shopper)
    assert (list(would.coupon_campaign_ids), would.earned_points) == (["thanks"], 60)
    for _ in range(2):
        await client.earn_points(shopper, STORE, 6_000, at(clock.now_ms()))
    capped = await client.simulate_earn(STORE, 6_000, at(clock.now_ms()), card_number=shopper)
    assert (list(capped.coupon_campaign_ids), [b.note for b in capped.breakdown]) == ([], ["", "member_cap"])
