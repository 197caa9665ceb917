"""Rule sets through gRPC, against real Redis: publishing, earning with a basket and its
breakdown, member guards and caps in the account's script, budgets never overspent under
concurrency, refunds taking back each rule's share, a rule set changed while tills earn."""

from __future__ import annotations

import asyncio
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from redis.asyncio import Redis

from pointauth.client import InvalidArgumentError, NotFoundError, PointauthError, PointsClient, new_request_id
from pointauth.server.app import PointauthServer
from pointauth.server.clock import ManualClock
from pointauth.server.config import Settings
from pointauth.server.ledger import Keyspace
from pointauth.v1 import common_pb2
from pointauth.v1 import members_service_pb2 as mpb
from pointauth.v1 import points_service_pb2 as pb
from pointauth.v1 import rules_service_pb2 as rpb
from tests.conftest import DAY_MS, START_MS, STORE, at
from tests.helpers import account_state, stream_events

BASKET = [
    pb.BasketLine(sku="sku-coffee", category="drinks", quantity=2, amount=600),
    pb.BasketLine(sku="sku-gift", category="gift-cards", quantity=1, amount=5_000, non_earning=True),
    pb.BasketLine(sku="sku-tea", category="drinks", quantity=1, amount=4_400),
]


def campaign(cid: str, order: int = 0, **fields: object) -> rpb.Campaign:
    return rpb.Campaign(campaign_id=cid, display_name=cid.title(), order=order, **fields)  # type: ignore[arg-type]


def add(points: int) -> rpb.CampaignEffect:
    return rpb.CampaignEffect(add_points=points)


async def publish(client: PointsClient, *campaigns: rpb.Campaign, rates: list[rpb.BaseRate] | None = None) -> int:
    published = await client.publish_rule_set(rpb.RuleSet(base_rates=rates or [], campaigns=campaigns))
    return published.version


async def new_member(client: PointsClient, n: int, profile: mpb.MemberProfile | None = None) -> str:
    card = f"40000000000{n:05d}"
    await client.create_account(f"m-{n}", card, profile=profile)
    return card


async def test_a_published_rule_set_is_the_current_version_and_reads_back(client: PointsClient) -> None:
    with pytest.raises(NotFoundError) as caught:
        await client.get_rule_set()
    assert caught.value.reason == "RULE_SET_NOT_FOUND"
    drinks = campaign(
        "drinks",
        conditions=rpb.CampaignConditions(categories=["drinks"], weekdays=[1, 2, 3]),
        effect=rpb.CampaignEffect(multiply_basis_points=10_000),
        lot_kind=common_pb2.LOT_KIND_LIMITED_TIME,
        expire_days=30,
        max_points_per_member=500,
        budget_points=10_000,
    )
    first = await client.publish_rule_set(
        rpb.RuleSet(base_rates=[rpb.BaseRate(company_id="acme", points=2, per_amount=100)], campaigns=[drinks])
    )
    assert (first.version, first.publish_time.ToMilliseconds()) == (1, START_MS)
    assert await client.get_rule_set() == first
    second = await client.publish_rule_set(rpb.RuleSet())
    assert second.version == 2
    assert await client.get_rule_set(1) == first
    assert (await client.get_rule_set()).version == 2


EVERY_CHANNEL = [common_pb2.CHANNEL_STORE, common_pb2.CHANNEL_EC, common_pb2.CHANNEL_APP, common_pb2.CHANNEL_KIOSK,
                 common_pb2.CHANNEL_PARTNER]  # fmt: skip


def _one_bad_channel(channel: common_pb2.Channel.ValueType) -> rpb.RuleSet:
    """A campaign on every channel, and one on a store's and `channel`."""
    return rpb.RuleSet(
        campaigns=[
            campaign("every", effect=add(1), conditions=rpb.CampaignConditions(channels=EVERY_CHANNEL)),
            campaign("bad", effect=add(1), conditions=rpb.CampaignConditions(channels=[EVERY_CHANNEL[0], channel])),
        ]
    )


@pytest.mark.parametrize(
    ("rule_set", "fields"),
    [
        (
            rpb.RuleSet(base_rates=[rpb.BaseRate(company_id="acme", points=0, per_amount=100)]),
            ["rule_set.base_rates[0].points"],
        ),
        (
            rpb.RuleSet(campaigns=[campaign("c", effect=add(1)), campaign("c", effect=add(1))]),
            ["rule_set.campaigns[1].campaign_id"],
        ),
        (rpb.RuleSet(campaigns=[campaign("no-effect")]), ["rule_set.campaigns[0].effect"]),
        (
            rpb.RuleSet(campaigns=[campaign("bad", effect=add(1), conditions=rpb.CampaignConditions(weekdays=[8]))]),
            ["rule_set.campaigns[0].conditions.weekdays"],
        ),
        *(
            (_one_bad_channel(channel), ["rule_set.campaigns[1].conditions.channels"])
            for channel in (common_pb2.CHANNEL_UNSPECIFIED, common_pb2.Channel.ValueType(99))
        ),
        (rpb.RuleSet(campaigns=[campaign("base", effect=add(1))]), ["rule_set.campaigns[0].campaign_id"]),
    ],
)
async def test_a_bad_rule_set_is_refused_and_never_published(
    client: PointsClient, rule_set: rpb.RuleSet, fields: list[str]
) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await client.publish_rule_set(rule_set)
    assert list(caught.value.field_violations) == fields
    with pytest.raises(NotFoundError):
        await client.get_rule_set()


async def test_an_earn_shows_what_each_rule_gave_and_where(client: PointsClient, clock: ManualClock) -> None:
    card = await new_member(client, 1)
    version = await publish(
        client,
        campaign(
            "drinks",
            1,
            conditions=rpb.CampaignConditions(categories=["drinks"]),
            effect=rpb.CampaignEffect(multiply_basis_points=10_000),
        ),
        campaign("bonus", 2, effect=add(30), lot_kind=common_pb2.LOT_KIND_LIMITED_TIME, expire_days=7),
        rates=[rpb.BaseRate(company_id="acme", points=2, per_amount=100)],
    )
    earned = await client.earn_points(card, STORE, 10_000, at(clock.now_ms()), basket=BASKET)
    # Earning amount 5,000 (the gift card does not earn) at 2 per 100: 100 base points; the
    # drinks (all of it) double them; the bonus is 30 limited-time points for a week.
    assert earned.rule_set_version == version
    assert [(b.rule_id, b.points, b.kind, b.note) for b in earned.breakdown] == [
        ("base", 100, common_pb2.LOT_KIND_REGULAR, ""),
        ("drinks", 100, common_pb2.LOT_KIND_REGULAR, ""),
        ("bonus", 30, common_pb2.LOT_KIND_LIMITED_TIME, ""),
    ]
    assert earned.earned_points == 230
    base, drinks, bonus = earned.breakdown
    assert base.lot_id == drinks.lot_id  # same expiry, kind and issuer: one lot
    assert bonus.expire_time.ToMilliseconds() == clock.now_ms() + 7 * DAY_MS
    balance = await client.get_balance(card)
    assert [(lot.points, lot.kind) for lot in balance.lots] == [
        (30, common_pb2.LOT_KIND_LIMITED_TIME),
        (200, common_pb2.LOT_KIND_REGULAR),
    ]
    receipt = await client.get_receipt(earned.transaction_id)
    assert list(receipt.breakdown) == list(earned.breakdown)


async def test_a_basket_must_add_up(client: PointsClient, clock: ManualClock) -> None:
    card = await new_member(client, 1)
    with pytest.raises(InvalidArgumentError) as caught:
        await client.earn_points(card, STORE, 9_999, at(clock.now_ms()), basket=BASKET)
    assert list(caught.value.field_violations) == ["purchase_amount"]


async def test_birthday_and_first_purchase_are_the_members_own(client: PointsClient, clock: ManualClock) -> None:
    # The clock's month in Tokyo: START_MS is 2026-11-18.
    november = await new_member(client, 1, mpb.MemberProfile(birth_month=11, birth_day=3))
    june = await new_member(client, 2, mpb.MemberProfile(birth_month=6, birth_day=3))
    await publish(
        client,
        campaign("birthday", 1, conditions=rpb.CampaignConditions(birthday_month=True), effect=add(300)),
        campaign("welcome", 2, conditions=rpb.CampaignConditions(first_purchase=True), effect=add(500)),
    )
    first = await client.earn_points(november, STORE, 1_000, at(clock.now_ms()))
    assert [(b.rule_id, b.points, b.note) for b in first.breakdown] == [
        ("base", 10, ""),
        ("birthday", 300, ""),
        ("welcome", 500, ""),
    ]
    second = await client.earn_points(november, STORE, 1_000, at(clock.now_ms()))
    assert [(b.rule_id, b.points, b.note) for b in second.breakdown] == [
        ("base", 10, ""),
        ("birthday", 300, ""),
        ("welcome", 0, "not_first_purchase"),
    ]
    other = await client.earn_points(june, STORE, 1_000, at(clock.now_ms()))
    assert [(b.rule_id, b.points, b.note) for b in other.breakdown] == [
        ("base", 10, ""),
        ("birthday", 0, "not_birthday_month"),
        ("welcome", 500, ""),
    ]


async def test_a_members_cap_holds_under_concurrent_earns(
    client: PointsClient, clock: ManualClock, redis: Redis, keyspace: Keyspace
) -> None:
    card = await new_member(client, 1)
    await publish(client, campaign("weekly", effect=add(100), max_points_per_member=1_000))
    answers = await asyncio.gather(*(client.earn_points(card, STORE, 1_000, at(clock.now_ms())) for _ in range(40)))
    given = [a.breakdown[1].points for a in answers]
    assert sum(given) == 1_000
    assert sorted(given, reverse=True)[:10] == [100] * 10
    assert sum(1 for a in answers if a.breakdown[1].note == "member_cap") == 30
    assert (await client.get_balance(card)).balance.available_points == 40 * 10 + 1_000
    assert (await account_state(redis, keyspace, "m-1")).rule_counts == {"weekly": 1_000}


async def test_a_budget_is_never_overspent_across_members_and_shards(
    client: PointsClient, clock: ManualClock, redis: Redis, keyspace: Keyspace, server: PointauthServer
) -> None:
    cards = [await new_member(client, n) for n in range(200)]
    await publish(client, campaign("grand-opening", effect=add(50), budget_points=10_000))
    answers = await asyncio.gather(
        *(client.earn_points(cards[i % 200], STORE, 1_000, at(clock.now_ms())) for i in range(500))
    )
    given = [a.breakdown[1].points for a in answers]
    assert sum(given) == 10_000  # 200 of the 500 earns, 50 points each
    assert sorted(set(given)) == [0, 50]
    assert sum(1 for a in answers if a.breakdown[1].note == "budget") == 300
    assert await server.ledger.budget_spent("grand-opening") == 10_000
    balances = [(await client.get_balance(card)).balance.available_points for card in cards]
    assert sum(balances) == 500 * 10 + 10_000


async def test_a_refund_takes_back_each_rules_share_and_gives_back_cap_and_budget(
    client: PointsClient, clock: ManualClock, redis: Redis, keyspace: Keyspace, server: PointauthServer
) -> None:
    card = await new_member(client, 1)
    await publish(
        client,
        campaign("capped", 1, effect=rpb.CampaignEffect(multiply_basis_points=20_000), max_points_per_member=1_000),
        campaign("funded", 2, effect=add(33), budget_points=1_000),
    )
    earned = await client.earn_points(card, STORE, 10_000, at(clock.now_ms()))
    assert [(b.rule_id, b.points) for b in earned.breakdown] == [("base", 100), ("capped", 200), ("funded", 33)]
    # A third of 333 points: 33 of base (100 * 111 // 333 = 33), 66 of capped, 11 of funded, and
    # the 1 point left over to the base line.
    rid = new_request_id()
    part = await client.refund_transaction(earned.transaction_id, points=111, request_id=rid)
    assert part.refunded_points == 111
    events = await stream_events(redis, keyspace, "m-1")
    assert [(line.rule, line.points) for line in events[-1].lines or []] == [
        ("base", 34),
        ("capped", 66),
        ("funded", 11),
    ]
    stored = await account_state(redis, keyspace, "m-1")
    assert stored.rule_counts == {"capped": 200 - 66}
    assert await server.ledger.budget_spent("funded") == 33 - 11
    # Its retry answers as the first time and gives nothing back twice.
    assert await client.refund_transaction(earned.transaction_id, points=111, request_id=rid) == part
    assert await server.ledger.budget_spent("funded") == 33 - 11
    assert (await account_state(redis, keyspace, "m-1")).rule_counts == {"capped": 200 - 66}
    rest = await client.refund_transaction(earned.transaction_id)
    assert rest.refunded_points == 222
    assert (await client.get_balance(card)).balance.available_points == 0
    assert (await account_state(redis, keyspace, "m-1")).rule_counts == {"capped": 0}
    assert await server.ledger.budget_spent("funded") == 0
    with pytest.raises(PointauthError) as caught:
        await client.refund_transaction(earned.transaction_id, points=1)
    assert caught.value.reason == "REFUND_EXCEEDS_ORIGINAL"


async def test_a_rule_set_changed_while_tills_earn_applies_whole_to_each_earn(
    client: PointsClient, clock: ManualClock, settings: Settings, redis: Redis, keyspace: Keyspace
) -> None:
    cards = [await new_member(client, n) for n in range(8)]
    one = await publish(client, rates=[rpb.BaseRate(company_id="acme", points=1, per_amount=100)])
    async with (
        PointauthServer(settings, clock, sweeper=False) as other,
        PointsClient(f"127.0.0.1:{other.port}", plaintext=True) as till,
    ):
        stop = asyncio.Event()
        answers: list[pb.EarnPointsResponse] = []

        async def earn_loop(card: str) -> None:
            while not stop.is_set():
                answers.append(await till.earn_points(card, STORE, 1_000, at(clock.now_ms())))

        loops = [asyncio.create_task(earn_loop(card)) for card in cards]
        await asyncio.sleep(0.05)
        two = await publish(client, rates=[rpb.BaseRate(company_id="acme", points=3, per_amount=100)])
        await asyncio.sleep(2.5)  # the other process refreshes every second
        stop.set()
        await asyncio.gather(*loops)
    rate = {one: 10, two: 30}
    assert {a.rule_set_version for a in answers} == {one, two}
    for answer in answers:
        assert answer.earned_points == rate[answer.rule_set_version]
    # The journal's events record the version each earn used.
    earns = [e for n in range(8) for e in await stream_events(redis, keyspace, f"m-{n}") if e.type == "EARN"]
    assert sorted((e.rules, e.pts) for e in earns) == sorted((a.rule_set_version, a.earned_points) for a in answers)


async def test_simulate_earn_answers_without_writing(
    client: PointsClient, clock: ManualClock, redis: Redis, keyspace: Keyspace
) -> None:
    card = await new_member(client, 1)
    await publish(client, campaign("welcome", conditions=rpb.CampaignConditions(first_purchase=True), effect=add(500)))
    keys = sorted(await redis.keys("*"))
    anyone = await client.simulate_earn(STORE, 1_000, at(clock.now_ms()))
    assert [(b.rule_id, b.points) for b in anyone.breakdown] == [("base", 10), ("welcome", 500)]
    assert (sorted(await redis.keys("*")), await redis.xlen(keyspace.account("m-1").events)) == (keys, 1)
    await client.earn_points(card, STORE, 1_000, at(clock.now_ms()))
    member = await client.simulate_earn(STORE, 1_000, at(clock.now_ms()), card_number=card)
    assert [(b.rule_id, b.points, b.note) for b in member.breakdown] == [
        ("base", 10, ""),
        ("welcome", 0, "not_first_purchase"),
    ]
    assert (member.earned_points, member.rule_set_version) == (10, 1)


async def test_earns_before_any_rule_set_use_the_configured_rate(client: PointsClient, clock: ManualClock) -> None:
    card = await new_member(client, 1)
    earned = await client.earn_points(card, STORE, 12_399, at(clock.now_ms()))
    assert (earned.earned_points, earned.rule_set_version, list(earned.breakdown)) == (123, 0, [])


async def test_a_merge_adds_the_sources_counts_to_the_targets_caps(
    client: PointsClient, clock: ManualClock, redis: Redis, keyspace: Keyspace
) -> None:
    source, target = await new_member(client, 1), await new_member(client, 2)
    await publish(client, campaign("weekly", effect=add(300), max_points_per_member=1_000))
    for card in (source, source, target):
        await client.earn_points(card, STORE, 1_000, at(clock.now_ms()))
    await client.merge_accounts("m-1", "m-2", operator_id="desk", reason="one member")
    merged = await account_state(redis, keyspace, "m-2")
    assert (merged.rule_counts, merged.first_earn_ms) == ({"weekly": 900}, START_MS)
    earned = await client.earn_points(source, STORE, 1_000, at(clock.now_ms()))  # lands on m-2
    assert [(b.rule_id, b.points, b.note) for b in earned.breakdown] == [
        ("base", 10, ""),
        ("weekly", 100, "member_cap"),
    ]


async def test_earns_and_captures_print_the_same_receipt_lines(client: PointsClient, clock: ManualClock) -> None:
    card = await new_member(client, 1, mpb.MemberProfile(birth_month=11, birth_day=3))
    await client.grant_points(card, 100, at(clock.now_ms() + 10 * DAY_MS), STORE)
    await client.publish_rule_set(
        rpb.RuleSet(
            campaigns=[campaign("bonus", effect=add(5))],
            receipt=rpb.ReceiptSettings(expiring_within_days=20, balance_template="残高 $points pt"),
        )
    )
    earned = await client.earn_points(card, STORE, 1_000, at(clock.now_ms()))
    expires = (clock.now_ms() + 10 * DAY_MS - 1) // 1000
    day = datetime.fromtimestamp(expires, tz=ZoneInfo("Asia/Tokyo")).strftime("%Y-%m-%d")
    assert [(line.kind, line.text) for line in earned.receipt_lines] == [
        (pb.RECEIPT_LINE_KIND_EARNED, "Points: 10 pt"),
        (pb.RECEIPT_LINE_KIND_EARNED, "Bonus: 5 pt"),
        (pb.RECEIPT_LINE_KIND_BALANCE, "残高 115 pt"),
        (pb.RECEIPT_LINE_KIND_EXPIRING, f"100 pt expire on {day}"),
        (pb.RECEIPT_LINE_KIND_BIRTHDAY, "Happy birthday!"),
    ]
    hold = await client.authorize_hold(card, STORE, 30)
    captured = await client.capture_hold(hold.hold_id)
    assert [(line.kind, line.text) for line in captured.receipt_lines] == [
        (pb.RECEIPT_LINE_KIND_BALANCE, "残高 85 pt"),
        (pb.RECEIPT_LINE_KIND_EXPIRING, f"70 pt expire on {day}"),
        (pb.RECEIPT_LINE_KIND_BIRTHDAY, "Happy birthday!"),
    ]


async def test_a_template_with_an_unknown_placeholder_is_refused(client: PointsClient) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await client.publish_rule_set(rpb.RuleSet(receipt=rpb.ReceiptSettings(balance_template="$points on $when")))
    assert list(caught.value.field_violations) == ["rule_set.receipt.balance_template"]


async def test_partial_refunds_of_a_merged_members_rule_earn_take_each_rules_share_once(
    client: PointsClient, clock: ManualClock, redis: Redis, keyspace: Keyspace
) -> None:
    source, _ = await new_member(client, 1), await new_member(client, 2)
    await publish(client, campaign("capped", effect=add(200), max_points_per_member=1_000))
    earned = await client.earn_points(source, STORE, 10_000, at(clock.now_ms()))  # base 100, capped 200
    await client.merge_accounts("m-1", "m-2", operator_id="desk", reason="one member")
    await client.refund_transaction(earned.transaction_id, points=100)
    await client.refund_transaction(earned.transaction_id, points=200)
    shares = [
        [(line.rule, line.points) for line in e.lines or []]
        for e in await stream_events(redis, keyspace, "m-2")
        if e.type == "REFUNDED"
    ]
    # A third, then the rest: base 33 + 1 left over, capped 66; then base 66, capped 134.
    assert shares == [[("base", 34), ("capped", 66)], [("base", 66), ("capped", 134)]]
    target = await account_state(redis, keyspace, "m-2")
    assert (target.rule_counts, target.lot_points) == ({"capped": 0}, 0)
    assert target.foreign_refunds == {earned.transaction_id: "300||100,200"}  # an earn has no allocation


async def test_a_capture_earns_for_the_sale_it_completes_in_the_same_call(
    client: PointsClient, clock: ManualClock, redis: Redis, keyspace: Keyspace, server: PointauthServer
) -> None:
    card = await new_member(client, 1)
    await client.grant_points(card, 500, at(clock.now_ms() + 10 * DAY_MS), STORE)
    await publish(client, campaign("funded", effect=add(7), budget_points=100))
    hold = await client.authorize_hold(card, STORE, 200)
    rid = new_request_id()
    captured = await client.capture_hold(
        hold.hold_id, purchase_amount=10_000, purchase_time=at(clock.now_ms()), basket=BASKET, request_id=rid
    )
    # The points paid 200 of the sale; the earn counts the earning lines (5,000 of them).
    assert (captured.captured_points, captured.earned_points, captured.rule_set_version) == (200, 57, 1)
    assert [(b.rule_id, b.points) for b in captured.breakdown] == [("base", 50), ("funded", 7)]
    assert captured.balance.available_points == 500 - 200 + 57
    assert captured.earn_transaction_id.startswith("m-1.")
    assert [line.kind for line in captured.receipt_lines][:2] == [pb.RECEIPT_LINE_KIND_EARNED] * 2
    assert (
        await client.capture_hold(
            hold.hold_id, purchase_amount=10_000, purchase_time=at(clock.now_ms()), basket=BASKET, request_id=rid
        )
        == captured
    )
    assert await server.ledger.budget_spent("funded") == 7
    types = [e.type for e in await stream_events(redis, keyspace, "m-1")]
    assert types[-2:] == ["HOLD_CAPTURED", "EARN"]
    refund = await client.refund_transaction(captured.earn_transaction_id)
    assert refund.refunded_points == 57
    assert await server.ledger.budget_spent("funded") == 0
