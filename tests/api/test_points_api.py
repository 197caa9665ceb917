"""PointsService and AdminService through gRPC, against real Redis: successes and refusals."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
import pytest
from redis.asyncio import Redis

from pointauth.client import ConflictError, NotFoundError, PointauthError, PointsClient, RefusedError, new_request_id
from pointauth.server.clock import ManualClock
from pointauth.server.ledger import Keyspace
from pointauth.v1 import common_pb2
from pointauth.v1 import points_service_pb2 as pb
from tests.conftest import CARD, DAY_MS, STORE, at
from tests.helpers import account_state, events

OTHER_STORE = common_pb2.PointOfSale(
    company_id="partner", store_id="store-9", terminal_id="kiosk-1", channel=common_pb2.CHANNEL_KIOSK
)


async def test_earn_computes_points_by_base_rate_rounding_down(
    client: PointsClient, member: str, clock: ManualClock
) -> None:
    earned = await client.earn_points(member, STORE, 12_399, at(clock.now_ms()))
    assert earned.earned_points == 123  # 1 point per 100 yen, rounded down
    assert earned.lot.points == 123
    assert earned.lot.kind == common_pb2.LOT_KIND_REGULAR
    assert earned.lot.issuer_id == "acme"
    assert earned.balance.available_points == 1123
    small = await client.earn_points(member, STORE, 99, at(clock.now_ms()))
    assert small.earned_points == 0
    assert not small.HasField("lot")
    receipt = await client.get_receipt(earned.transaction_id)
    assert receipt.type == pb.TRANSACTION_TYPE_EARN
    assert receipt.earned_points == 123
    assert receipt.balance_after.available_points == 1123
    assert receipt.point_of_sale.store_id == "store-1"


async def test_earned_lot_expires_at_end_of_month_a_year_later(
    client: PointsClient, member: str, clock: ManualClock
) -> None:
    # 2026-11-22 12:00 JST; the default policy is the end of the month 12 months later.
    clock.advance(1_795_316_400_000 - clock.now_ms())
    earned = await client.earn_points(member, STORE, 1000, at(1_795_316_400_000))
    assert earned.lot.expire_time.ToJsonString() == "2027-11-30T15:00:00Z"  # 2027-12-01 00:00 JST


async def test_balance_lists_lots_soonest_expiring_first(client: PointsClient, member: str, clock: ManualClock) -> None:
    now = clock.now_ms()
    await client.grant_points(member, 50, at(now + 5 * DAY_MS), STORE, kind=common_pb2.LOT_KIND_LIMITED_TIME)
    await client.grant_points(member, 70, at(now + 60 * DAY_MS), STORE)
    balance = await client.get_balance(member)
    assert balance.account_id == "member-1"
    assert balance.balance.available_points == 1120
    assert [(lot.points, lot.kind) for lot in balance.lots] == [
        (50, common_pb2.LOT_KIND_LIMITED_TIME),
        (1000, common_pb2.LOT_KIND_REGULAR),
        (70, common_pb2.LOT_KIND_REGULAR),
    ]


async def test_hold_takes_earliest_expiring_lots_and_capture_spends_them(
    client: PointsClient, member: str, clock: ManualClock
) -> None:
    await client.grant_points(member, 50, at(clock.now_ms() + DAY_MS), STORE, kind=common_pb2.LOT_KIND_LIMITED_TIME)
    hold = await client.authorize_hold(member, STORE, 80)
    assert hold.held_points == 80
    assert hold.balance.available_points == 970
    assert hold.balance.held_points == 80
    balance = await client.get_balance(member)
    assert [lot.points for lot in balance.lots] == [970]  # the limited-time lot went first, then 30 regular
    captured = await client.capture_hold(hold.hold_id)
    assert captured.captured_points == 80
    assert captured.released_points == 0
    assert captured.balance.available_points == 970
    assert captured.balance.held_points == 0
    receipt = await client.get_receipt(captured.transaction_id)
    assert receipt.type == pb.TRANSACTION_TYPE_CAPTURE
    assert receipt.used_points == 80
    assert receipt.related_transaction_id == hold.hold_id
    assert sorted(e.delta_points for e in receipt.lot_effects) == [-50, -30]


async def test_partial_capture_releases_the_rest(client: PointsClient, member: str) -> None:
    hold = await client.authorize_hold(member, STORE, 300)
    captured = await client.capture_hold(hold.hold_id, 120)
    assert (captured.captured_points, captured.released_points) == (120, 180)
    assert captured.balance.available_points == 880
    assert captured.balance.held_points == 0
    hold_receipt = await client.get_receipt(hold.hold_id)
    assert hold_receipt.hold_state == pb.HOLD_STATE_CAPTURED
    assert hold_receipt.related_transaction_id == captured.transaction_id


async def test_void_returns_all_points(client: PointsClient, member: str, redis: Redis, keyspace: Keyspace) -> None:
    before = await account_state(redis, keyspace, "member-1")
    hold = await client.authorize_hold(member, STORE, 400)
    voided = await client.void_hold(hold.hold_id)
    assert voided.released_points == 400
    assert voided.balance.available_points == 1000
    after = await account_state(redis, keyspace, "member-1")
    assert after.lots == before.lots
    assert after.holds == {}


@pytest.mark.parametrize(
    ("resolve", "reason"),
    [("capture", "HOLD_ALREADY_CAPTURED"), ("void", "HOLD_ALREADY_VOIDED")],
)
async def test_hold_resolves_exactly_once(client: PointsClient, member: str, resolve: str, reason: str) -> None:
    hold = await client.authorize_hold(member, STORE, 100)
    if resolve == "capture":
        await client.capture_hold(hold.hold_id)
    else:
        await client.void_hold(hold.hold_id)
    for again in (client.capture_hold(hold.hold_id), client.void_hold(hold.hold_id)):
        with pytest.raises(RefusedError) as refused:
            await again
        assert refused.value.reason == reason
    balance = await client.get_balance(member)
    assert balance.balance.available_points == (900 if resolve == "capture" else 1000)


async def test_capture_above_the_hold_is_refused(client: PointsClient, member: str) -> None:
    hold = await client.authorize_hold(member, STORE, 100)
    with pytest.raises(RefusedError) as refused:
        await client.capture_hold(hold.hold_id, 101)
    assert refused.value.reason == "CAPTURE_EXCEEDS_HOLD"
    assert refused.value.metadata == {"held_points": "100", "requested_points": "101"}
    captured = await client.capture_hold(hold.hold_id, 100)  # the hold is still open
    assert captured.captured_points == 100


async def test_hold_expires_after_its_ttl_without_a_sweeper(
    client: PointsClient, member: str, clock: ManualClock, redis: Redis, keyspace: Keyspace
) -> None:
    hold = await client.authorize_hold(member, STORE, 250, hold_ttl=timedelta(seconds=60))
    clock.advance(59_999)
    assert (await client.get_balance(member)).balance.held_points == 250
    clock.advance(1)
    # Reads see the expiry at once; capture and void are refused even before anything swept it.
    assert (await client.get_receipt(hold.hold_id)).hold_state == pb.HOLD_STATE_EXPIRED
    for late in (client.capture_hold(hold.hold_id), client.void_hold(hold.hold_id)):
        with pytest.raises(RefusedError) as refused:
            await late
        assert refused.value.reason == "HOLD_EXPIRED"
    balance = await client.get_balance(member)
    assert (balance.balance.available_points, balance.balance.held_points) == (1000, 0)
    assert [e["type"] for e in await events(redis, keyspace, "member-1")][-1] == "HOLD_EXPIRED"


async def test_sweeper_releases_untouched_expired_holds(
    client: PointsClient, member: str, clock: ManualClock, redis: Redis, keyspace: Keyspace, server: object
) -> None:
    from pointauth.server.app import PointauthServer

    assert isinstance(server, PointauthServer)
    await client.authorize_hold(member, STORE, 100, hold_ttl=timedelta(seconds=10))
    clock.advance(10_000)
    assert await server.ledger.sweep_expired_holds() == 1
    state = await account_state(redis, keyspace, "member-1")
    assert state.holds == {}
    assert await redis.zcard(keyspace.account("member-1").holds) == 0
    assert await server.ledger.sweep_expired_holds() == 0


async def test_a_call_after_many_holds_expired_together_answers_with_all_of_them_released(
    client: PointsClient, member: str, clock: ManualClock, redis: Redis, keyspace: Keyspace
) -> None:
    """120 holds, more than one ledger call releases (50): the till's one RPC still sees them all
    released, and the journal gets each expiry once."""
    for _ in range(120):
        await client.authorize_hold(member, STORE, 2, hold_ttl=timedelta(seconds=60))
    clock.advance(60_000)
    hold = await client.authorize_hold(member, STORE, 30)
    assert (hold.balance.available_points, hold.balance.held_points) == (970, 30)
    types = [e["type"] for e in await events(redis, keyspace, "member-1")]
    assert (types.count("HOLD_EXPIRED"), types[-1]) == (120, "HOLD_AUTHORIZED")


async def test_hold_ttl_out_of_bounds_is_invalid(client: PointsClient, member: str) -> None:
    from pointauth.client import InvalidArgumentError

    with pytest.raises(InvalidArgumentError) as invalid:
        await client.authorize_hold(member, STORE, 10, hold_ttl=timedelta(days=8))
    assert "hold_ttl" in invalid.value.field_violations


async def test_expired_lot_is_never_spendable(client: PointsClient, member: str, clock: ManualClock) -> None:
    await client.grant_points(member, 500, at(clock.now_ms() + DAY_MS), STORE, kind=common_pb2.LOT_KIND_LIMITED_TIME)
    clock.advance(DAY_MS)  # the limited-time lot expires; nothing has swept it
    with pytest.raises(RefusedError) as refused:
        await client.redeem_points(member, STORE, 1001)
    assert refused.value.reason == "INSUFFICIENT_POINTS"
    assert refused.value.metadata["available_points"] == "1000"
    balance = await client.get_balance(member)
    assert [lot.points for lot in balance.lots] == [1000]


async def test_redeem_and_insufficient_points(client: PointsClient, member: str) -> None:
    redeemed = await client.redeem_points(member, STORE, 400)
    assert redeemed.redeemed_points == 400
    assert redeemed.balance.available_points == 600
    with pytest.raises(RefusedError) as refused:
        await client.redeem_points(member, STORE, 601)
    assert refused.value.reason == "INSUFFICIENT_POINTS"
    with pytest.raises(RefusedError):
        await client.authorize_hold(member, STORE, 601)
    assert (await client.get_balance(member)).balance.available_points == 600


async def test_refund_of_redemption_returns_points_to_their_lots_with_original_expiry(
    client: PointsClient, member: str, clock: ManualClock
) -> None:
    now = clock.now_ms()
    limited = await client.grant_points(member, 100, at(now + 3 * DAY_MS), STORE, kind=common_pb2.LOT_KIND_LIMITED_TIME)
    redeemed = await client.redeem_points(member, STORE, 300)  # 100 limited + 200 regular
    balance = await client.get_balance(member)
    assert [lot.points for lot in balance.lots] == [800]  # the limited lot is emptied and gone
    partial = await client.refund_transaction(redeemed.transaction_id, 250, point_of_sale=OTHER_STORE)
    # Last spent, first returned: 200 to the regular lot, then 50 to the limited one, recreated.
    assert [(e.lot_id, e.delta_points) for e in partial.lot_effects] == [("2", 200), (limited.lot.lot_id, 50)]
    balance = await client.get_balance(member)
    assert [(lot.lot_id, lot.points, lot.expire_time) for lot in balance.lots] == [
        (limited.lot.lot_id, 50, limited.lot.expire_time),
        ("2", 1000, balance.lots[1].expire_time),
    ]
    rest = await client.refund_transaction(redeemed.transaction_id)
    assert rest.refunded_points == 50
    with pytest.raises(RefusedError) as refused:
        await client.refund_transaction(redeemed.transaction_id, 1)
    assert refused.value.reason == "REFUND_EXCEEDS_ORIGINAL"
    receipt = await client.get_receipt(redeemed.transaction_id)
    assert (receipt.used_points, receipt.refunded_points) == (300, 300)
    assert (await client.get_balance(member)).balance.available_points == 1100


async def test_refund_of_capture_and_of_earn(client: PointsClient, member: str, clock: ManualClock) -> None:
    hold = await client.authorize_hold(member, STORE, 200)
    captured = await client.capture_hold(hold.hold_id, 150)
    refund = await client.refund_transaction(captured.transaction_id, 100)
    assert refund.balance.available_points == 950
    earned = await client.earn_points(member, STORE, 10_000, at(clock.now_ms()))
    assert earned.earned_points == 100
    taken_back = await client.refund_transaction(earned.transaction_id, 40)
    # Taken back from the earn's own lot first.
    assert [(e.lot_id, e.delta_points) for e in taken_back.lot_effects] == [(earned.lot.lot_id, -40)]
    assert taken_back.balance.available_points == 1010
    with pytest.raises(RefusedError) as refused:
        await client.refund_transaction(earned.transaction_id, 61)
    assert refused.value.reason == "REFUND_EXCEEDS_ORIGINAL"
    with pytest.raises(NotFoundError) as missing:
        await client.refund_transaction(hold.hold_id)  # a hold is not refundable: capture it, refund that
    assert missing.value.reason == "TRANSACTION_NOT_FOUND"


@pytest.mark.parametrize(
    ("call", "reason"),
    [
        (lambda c: c.get_balance("4999999999999999"), "CARD_NOT_FOUND"),
        (lambda c: c.redeem_points("4999999999999999", STORE, 1), "CARD_NOT_FOUND"),
        (lambda c: c.capture_hold("member-1.999"), "HOLD_NOT_FOUND"),
        (lambda c: c.void_hold("nobody.2"), "HOLD_NOT_FOUND"),
        (lambda c: c.refund_transaction("member-1.999"), "TRANSACTION_NOT_FOUND"),
        (lambda c: c.refund_transaction("nobody.2"), "TRANSACTION_NOT_FOUND"),
        (lambda c: c.get_receipt("member-1.999"), "TRANSACTION_NOT_FOUND"),
    ],
)
async def test_unknown_things_are_not_found(client: PointsClient, member: str, call: object, reason: str) -> None:
    with pytest.raises(NotFoundError) as missing:
        await call(client)  # type: ignore[operator]
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    assert missing.value.reason == reason


async def test_replay_returns_the_first_response_and_applies_once(
    client: PointsClient, member: str, redis: Redis, keyspace: Keyspace
) -> None:
    request_id = new_request_id()
    first = await client.redeem_points(member, STORE, 100, request_id=request_id)
    await client.redeem_points(member, STORE, 50)  # the balance moves on
    again = await client.redeem_points(member, STORE, 100, request_id=request_id)
    assert again.SerializeToString() == first.SerializeToString()
    assert (await client.get_balance(member)).balance.available_points == 850
    assert [e["type"] for e in await events(redis, keyspace, "member-1")].count("REDEEMED") == 2


async def test_reused_request_id_with_other_content_is_already_exists(client: PointsClient, member: str) -> None:
    request_id = new_request_id()
    await client.redeem_points(member, STORE, 100, request_id=request_id)
    with pytest.raises(ConflictError) as conflict:
        await client.redeem_points(member, STORE, 101, request_id=request_id)
    assert conflict.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert conflict.value.reason == "IDEMPOTENCY_KEY_REUSED"
    assert (await client.get_balance(member)).balance.available_points == 900


async def test_refusal_is_remembered_after_the_balance_changes(client: PointsClient, member: str) -> None:
    request_id = new_request_id()
    with pytest.raises(RefusedError):
        await client.redeem_points(member, STORE, 1500, request_id=request_id)
    await client.grant_points(member, 1000, at(1_900_000_000_000), STORE)
    with pytest.raises(RefusedError) as again:
        await client.redeem_points(member, STORE, 1500, request_id=request_id)
    assert again.value.reason == "INSUFFICIENT_POINTS"
    assert again.value.metadata["available_points"] == "1000"  # the first answer, as it was
    assert (await client.get_balance(member)).balance.available_points == 2000


async def test_create_account_conflicts(client: PointsClient, member: str) -> None:
    with pytest.raises(ConflictError) as taken:
        await client.create_account("member-2", CARD)
    assert taken.value.reason == "CARD_ALREADY_LINKED"
    with pytest.raises(ConflictError) as exists:
        await client.create_account("member-1", "4000000000000002")
    assert exists.value.reason == "ACCOUNT_ALREADY_EXISTS"
    with pytest.raises(NotFoundError):
        await client.get_balance("4000000000000002")


async def test_a_refused_opening_leaves_no_trace(client: PointsClient, member: str, redis: Redis) -> None:
    keys_before = {k for k in await redis.keys("*") if b":r:" not in k}
    with pytest.raises(ConflictError):
        await client.create_account("member-2", CARD)  # CARD belongs to member-1
    with pytest.raises(ConflictError):
        await client.create_account("member-1", "4000000000000002")  # member-1 exists
    # Nothing of either refusal was stored but their idempotency records ("r:" keys).
    assert {k for k in await redis.keys("*") if b":r:" not in k} == keys_before
    with pytest.raises(NotFoundError):
        await client.get_balance("4000000000000002")
    opened = await client.create_account("member-2", "4000000000000002")
    assert (opened.account_id, opened.card_number) == ("member-2", "4000000000000002")


async def test_concurrent_openings_with_one_card_have_exactly_one_winner(
    client: PointsClient, redis: Redis, keyspace: Keyspace
) -> None:
    for race in range(30):
        card = f"40000000009{race:05d}"
        accounts = [f"race-{race}-a", f"race-{race}-b"]
        results = await asyncio.gather(
            *(client.create_account(account, card) for account in accounts), return_exceptions=True
        )
        winners = [a for a, r in zip(accounts, results, strict=True) if not isinstance(r, BaseException)]
        losers = [r for r in results if isinstance(r, BaseException)]
        assert len(winners) == 1, results
        assert [(type(e), getattr(e, "reason", "")) for e in losers] == [(ConflictError, "CARD_ALREADY_LINKED")]
        assert (await client.get_balance(card)).account_id == winners[0]
        loser = next(a for a in accounts if a != winners[0])
        assert not await redis.exists(keyspace.account(loser).account)
        assert [e["account"] for e in await events(redis, keyspace, loser)] == []
        # The loser's id is free: opening it with another card works.
        await client.create_account(loser, f"40000000008{race:05d}")


async def test_no_path_adds_points_past_the_balance_cap(client: PointsClient, clock: ManualClock) -> None:
    cap = 10**15
    card = "4000000000000777"
    await client.create_account("capped", card)
    expiry = at(clock.now_ms() + 30 * DAY_MS)
    await client.grant_points(card, cap, expiry, STORE)
    redemption = await client.redeem_points(card, STORE, 10)
    await client.grant_points(card, 10, expiry, STORE)
    with pytest.raises(RefusedError) as refund:
        await client.refund_transaction(redemption.transaction_id)
    assert refund.value.reason == "BALANCE_LIMIT_EXCEEDED"
    assert refund.value.metadata["max_balance_points"] == str(cap)
    with pytest.raises(RefusedError) as grant:
        await client.grant_points(card, 1, expiry, STORE)
    assert grant.value.reason == "BALANCE_LIMIT_EXCEEDED"
    balance = await client.get_balance(card)
    assert (balance.balance.available_points, balance.balance.held_points) == (cap, 0)
    # Holds and voids only move points between available and held: they stay within the cap.
    hold = await client.authorize_hold(card, STORE, 10)
    await client.void_hold(hold.hold_id)
    assert (await client.get_balance(card)).balance.available_points == cap


async def test_library_reloads_after_function_flush(client: PointsClient, member: str, redis: Redis) -> None:
    await redis.function_flush()
    redeemed = await client.redeem_points(member, STORE, 10)
    assert redeemed.balance.available_points == 990


async def test_every_change_appends_its_event(
    client: PointsClient, member: str, redis: Redis, keyspace: Keyspace
) -> None:
    hold = await client.authorize_hold(member, STORE, 100)
    await client.capture_hold(hold.hold_id, 60)
    log = await events(redis, keyspace, "member-1")
    assert [e["type"] for e in log] == ["ACCOUNT_OPENED", "GRANT", "HOLD_AUTHORIZED", "HOLD_CAPTURED"]
    assert [e["seq"] for e in log] == [1, 2, 3, 4]
    assert log[2]["lots"] == [[2, -100, log[1]["lots"][0][2], "R", "acme"]]
    assert log[3]["lots"] == [[2, 40, log[1]["lots"][0][2], "R", "acme"]]
    assert log[3]["pos"] == ["acme", "store-1", "till-1", common_pb2.CHANNEL_STORE]


async def test_sweep_in_slices_covers_every_shard(
    client: PointsClient, clock: ManualClock, redis: Redis, keyspace: Keyspace, server: object
) -> None:
    from pointauth.server.app import PointauthServer

    assert isinstance(server, PointauthServer)
    cards = [f"40000000000001{i:02d}" for i in range(12)]
    for i, card in enumerate(cards):
        await client.create_account(f"sweep-{i}", card)
        await client.grant_points(card, 10, at(clock.now_ms() + DAY_MS), STORE)
        await client.authorize_hold(card, STORE, 10, hold_ttl=timedelta(seconds=5))
    clock.advance(5_000)
    swept = [await server.ledger.sweep_expired_holds(4) for _ in range(4)]  # 16 shards, 4 at a time
    assert sum(swept) == len(cards)
    assert [await redis.zcard(keyspace.holds(shard)) for shard in range(keyspace.shards)] == [0] * keyspace.shards


async def test_a_card_unknown_at_first_is_found_once_linked(client: PointsClient) -> None:
    with pytest.raises(NotFoundError):
        await client.get_balance("4000000000000777")
    await client.create_account("late-1", "4000000000000777")
    assert (await client.get_balance("4000000000000777")).account_id == "late-1"


async def test_balance_pages_through_the_lots_in_spending_order(
    client: PointsClient, member: str, clock: ManualClock
) -> None:
    now = clock.now_ms()
    # 1,000 points expiring in 30 days (the member's), and 45 more lots, three at each of 15
    # expiries (two issuers, two kinds): 46 lots.
    for day in range(1, 16):
        await client.grant_points(member, day, at(now + day * DAY_MS), STORE)
        await client.grant_points(member, 100 + day, at(now + day * DAY_MS), OTHER_STORE)
        await client.grant_points(
            member, 200 + day, at(now + day * DAY_MS), STORE, kind=common_pb2.LOT_KIND_LIMITED_TIME
        )
    everything = [
        (lot.expire_time.ToMilliseconds(), lot.kind, lot.lot_id)
        for lot in (await client.get_balance(member, page_size=500)).lots
    ]
    assert len(everything) == 46
    seen, token, pages = [], "", 0
    while True:
        page = await client.get_balance(member, page_size=7, page_token=token)
        assert page.balance.available_points == 1000 + sum(300 + 3 * day for day in range(1, 16))
        seen += [(lot.expire_time.ToMilliseconds(), lot.kind, lot.lot_id) for lot in page.lots]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert (seen, pages) == (everything, 7)  # 6 full pages and one of 4
    default = await client.get_balance(member)
    assert [lot.lot_id for lot in default.lots] == [lot_id for _, _, lot_id in everything[:20]]
    assert default.next_page_token


async def test_a_lot_spent_between_pages_is_not_shown_and_none_twice(
    client: PointsClient, member: str, clock: ManualClock
) -> None:
    now = clock.now_ms()
    for day in range(1, 5):
        await client.grant_points(member, 10, at(now + day * DAY_MS), STORE)
    first = await client.get_balance(member, page_size=2)
    await client.redeem_points(member, STORE, 25)  # empties day 1 and 2, 5 points off day 3
    rest = await client.get_balance(member, page_size=10, page_token=first.next_page_token)
    assert [(lot.points, lot.expire_time.ToMilliseconds()) for lot in rest.lots] == [
        (5, now + 3 * DAY_MS),
        (10, now + 4 * DAY_MS),
        (1000, now + 30 * DAY_MS),
    ]
    assert rest.next_page_token == ""


@pytest.mark.parametrize(
    ("page_size", "page_token", "field"),
    [(-1, "", "page_size"), (501, "", "page_size"), (0, "bm90IGEgdG9rZW4", "page_token")],
)
async def test_a_bad_page_is_invalid(
    client: PointsClient, member: str, page_size: int, page_token: str, field: str
) -> None:
    with pytest.raises(PointauthError) as caught:
        await client.get_balance(member, page_size=page_size, page_token=page_token)
    assert list(caught.value.field_violations) == [field]
