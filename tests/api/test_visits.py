"""CheckIn (行動ポイント) through gRPC, against real Redis: visit rules give their points within
their limits, idempotently, and refuse with a reason otherwise."""

from __future__ import annotations

import asyncio
from datetime import date

import grpc
import pytest
from redis.asyncio import Redis

from pointauth.client import PointauthError, PointsClient, RefusedError, new_request_id
from pointauth.server.clock import ManualClock
from pointauth.server.ledger import Keyspace
from pointauth.v1 import common_pb2
from pointauth.v1 import rules_service_pb2 as rpb
from tests.conftest import DAY_MS, STORE, at
from tests.helpers import account_state, stream_events

CARD = "4000000000000701"
KIOSK = common_pb2.PointOfSale(
    company_id="partner", store_id="store-9", terminal_id="kiosk-1", channel=common_pb2.CHANNEL_KIOSK
)
VISITS = [
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
]


@pytest.fixture
async def visitor(client: PointsClient) -> str:
    await client.create_account("visitor", CARD)
    await client.publish_rule_set(rpb.RuleSet(visits=VISITS))
    return CARD


async def test_a_visit_earns_each_rule_once_per_its_limit(
    client: PointsClient, visitor: str, clock: ManualClock
) -> None:
    first = await client.check_in(visitor, KIOSK, at(clock.now_ms()))
    assert [(b.rule_id, b.points, b.kind, b.note) for b in first.breakdown] == [
        ("kiosk-day", 2, common_pb2.LOT_KIND_LIMITED_TIME, ""),
        ("visit", 5, common_pb2.LOT_KIND_REGULAR, ""),
    ]
    assert (first.earned_points, first.balance.available_points, first.rule_set_version) == (7, 7, 1)
    assert first.breakdown[0].expire_time.ToMilliseconds() == clock.now_ms() + 30 * DAY_MS
    # Another store the same day: its own visit points; the kiosk rule gave today already.
    other = await client.check_in(visitor, STORE, at(clock.now_ms()))
    assert [(b.rule_id, b.points, b.note) for b in other.breakdown] == [("visit", 5, "")]
    # The same store again the same day: nothing left to give.
    with pytest.raises(RefusedError) as caught:
        await client.check_in(visitor, KIOSK, at(clock.now_ms()))
    assert (caught.value.code, caught.value.reason, caught.value.metadata) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ALREADY_CHECKED_IN",
        {"rule_ids": "kiosk-day,visit"},
    )
    # The next day, again.
    clock.advance(DAY_MS)
    again = await client.check_in(visitor, KIOSK, at(clock.now_ms()))
    assert again.earned_points == 7
    receipt = await client.get_receipt(again.transaction_id)
    assert (receipt.earned_points, [b.rule_id for b in receipt.breakdown]) == (7, ["kiosk-day", "visit"])


async def test_a_retried_check_in_answers_as_the_first_time(
    client: PointsClient, visitor: str, clock: ManualClock
) -> None:
    rid = new_request_id()
    first = await client.check_in(visitor, KIOSK, at(clock.now_ms()), request_id=rid)
    assert await client.check_in(visitor, KIOSK, at(clock.now_ms()), request_id=rid) == first


async def test_concurrent_check_ins_give_once(
    client: PointsClient, visitor: str, clock: ManualClock, redis: Redis, keyspace: Keyspace
) -> None:
    outcomes = await asyncio.gather(
        *(client.check_in(visitor, KIOSK, at(clock.now_ms())) for _ in range(20)), return_exceptions=True
    )
    given = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, PointauthError)]
    assert (len(given), len(refused)) == (1, 19)
    assert {e.reason for e in refused} == {"ALREADY_CHECKED_IN"}
    assert (await client.get_balance(visitor)).balance.available_points == 7
    visits = [e for e in await stream_events(redis, keyspace, "visitor") if e.type == "VISIT"]
    assert len(visits) == 1
    today = date(2026, 11, 18).toordinal()  # START_MS in Tokyo
    assert visits[0].visits == {"kiosk-day:*": today, "visit:store-9": today}
    assert (await account_state(redis, keyspace, "visitor")).visits == {"kiosk-day:*": today, "visit:store-9": today}


async def test_a_visit_no_rule_rewards_is_refused(client: PointsClient, clock: ManualClock) -> None:
    await client.create_account("visitor", CARD)
    with pytest.raises(RefusedError) as caught:
        await client.check_in(CARD, KIOSK, at(clock.now_ms()))
    assert caught.value.reason == "NO_VISIT_RULE"
    await client.publish_rule_set(rpb.RuleSet(visits=VISITS[1:]))  # kiosks only
    with pytest.raises(RefusedError) as caught:
        await client.check_in(CARD, STORE, at(clock.now_ms()))
    assert caught.value.reason == "NO_VISIT_RULE"


async def test_a_back_dated_visit_does_not_pay_a_day_twice(
    client: PointsClient, visitor: str, clock: ManualClock
) -> None:
    await client.check_in(visitor, KIOSK, at(clock.now_ms()))
    with pytest.raises(RefusedError) as caught:
        await client.check_in(visitor, KIOSK, at(clock.now_ms() - DAY_MS))
    assert caught.value.reason == "ALREADY_CHECKED_IN"
    assert (await client.get_balance(visitor)).balance.available_points == 7
