"""MembersService through gRPC, against real Redis: profiles, account status and cards (link,
unlink, block, unblock, reissue), their refusals, and what tills see."""

from __future__ import annotations

import grpc
import pytest
from redis.asyncio import Redis

from pointauth.client import (
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
    PointauthError,
    PointsClient,
    RefusedError,
    new_request_id,
)
from pointauth.server.clock import ManualClock
from pointauth.server.ledger import Keyspace, codec
from pointauth.v1 import members_service_pb2 as mpb
from tests.conftest import CARD, DAY_MS, START_MS, STORE, at
from tests.helpers import account_state, stream_events

APP_ID = "APP-0000000001"
SPARE = "4000000000000002"


async def redis_snapshot(redis: Redis) -> dict[bytes | str, object]:
    """Every key with its value, but the idempotency records and the shard streams (a refusal
    writes its record, and a note for the write-behind to keep it)."""
    out: dict[bytes | str, object] = {}
    for key in sorted(await redis.keys("*")):
        if b":r:" in key:
            continue
        kind = await redis.type(key)
        if kind == b"hash":
            out[key] = await redis.hgetall(key)
        elif kind == b"zset":
            out[key] = await redis.zrange(key, 0, -1, withscores=True)
        elif kind == b"string":
            out[key] = await redis.get(key)
    return out


async def refused(call: object) -> PointauthError:
    with pytest.raises(PointauthError) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def test_an_account_opened_with_a_profile_shows_it_with_its_card_and_balance(
    client: PointsClient, clock: ManualClock
) -> None:
    profile = mpb.MemberProfile(birth_month=2, birth_day=29, home_company_id="acme", attributes={"segment": "family"})
    profile.join_time.FromMilliseconds(START_MS - 400 * DAY_MS)
    await client.create_account("member-9", APP_ID, profile=profile, card_kind=mpb.CARD_KIND_APP)
    await client.grant_points(APP_ID, 300, at(clock.now_ms() + DAY_MS), STORE)
    by_id = await client.get_account(account_id="member-9")
    assert by_id == await client.get_account(card_number=APP_ID)
    assert by_id.account_id == "member-9"
    assert by_id.status == mpb.ACCOUNT_STATUS_ACTIVE
    assert (by_id.profile.birth_month, by_id.profile.birth_day) == (2, 29)
    assert by_id.profile.join_time.ToMilliseconds() == START_MS - 400 * DAY_MS
    assert (by_id.profile.home_company_id, dict(by_id.profile.attributes)) == ("acme", {"segment": "family"})
    [card] = by_id.cards
    assert (card.card_number, card.kind, card.state) == (APP_ID, mpb.CARD_KIND_APP, mpb.CARD_STATE_ACTIVE)
    assert card.link_time.ToMilliseconds() == START_MS
    assert not card.HasField("state_time")
    assert by_id.create_time.ToMilliseconds() == START_MS
    assert (by_id.balance.available_points, by_id.balance.held_points) == (300, 0)


async def test_a_profile_without_join_time_joined_when_opened(client: PointsClient) -> None:
    await client.create_account("member-2", SPARE)
    account = await client.get_account(account_id="member-2")
    assert account.profile.join_time.ToMilliseconds() == START_MS
    assert (account.profile.birth_month, account.profile.home_company_id, len(account.profile.attributes)) == (0, "", 0)
    assert account.cards[0].kind == mpb.CARD_KIND_PHYSICAL


@pytest.mark.parametrize(
    ("profile", "field"),
    [
        (mpb.MemberProfile(birth_month=2, birth_day=30), "profile.birth_day"),
        (mpb.MemberProfile(birth_month=13, birth_day=1), "profile.birth_month"),
        (mpb.MemberProfile(birth_day=5), "profile.birth_month"),
        (mpb.MemberProfile(home_company_id="-acme"), "profile.home_company_id"),
        (mpb.MemberProfile(attributes={"bad key": "x"}), "profile.attributes"),
        (mpb.MemberProfile(attributes={"k": "v" * 257}), "profile.attributes[k]"),
        (mpb.MemberProfile(attributes={f"k{i}": "v" for i in range(33)}), "profile.attributes"),
    ],
)
async def test_a_bad_profile_is_invalid_and_opens_nothing(
    client: PointsClient, redis: Redis, profile: mpb.MemberProfile, field: str
) -> None:
    before = await redis_snapshot(redis)
    error = await refused(client.create_account("member-3", SPARE, profile=profile))
    assert isinstance(error, InvalidArgumentError)
    assert (error.reason, list(error.field_violations)) == ("INVALID_ARGUMENT", [field])
    assert await redis_snapshot(redis) == before


async def test_update_profile_changes_exactly_the_fields_the_mask_names(client: PointsClient, member: str) -> None:
    await client.update_profile("member-1", mpb.MemberProfile(attributes={"a": "1", "b": "2"}), ["attributes"])
    account = await client.update_profile(
        "member-1",
        mpb.MemberProfile(birth_month=12, birth_day=24, home_company_id="other", attributes={"c": "3"}),
        ["birth_month", "birth_day", "attributes.c", "attributes.a"],
    )
    # home_company_id was not named: unchanged (empty); attributes.a named but absent: removed.
    assert (account.profile.birth_month, account.profile.birth_day, account.profile.home_company_id) == (12, 24, "")
    assert dict(account.profile.attributes) == {"b": "2", "c": "3"}
    cleared = await client.update_profile("member-1", mpb.MemberProfile(), ["birth_month", "birth_day", "attributes"])
    assert (cleared.profile.birth_month, cleared.profile.birth_day, len(cleared.profile.attributes)) == (0, 0, 0)
    assert cleared.profile.join_time.ToMilliseconds() == START_MS


@pytest.mark.parametrize(
    ("paths", "profile", "fields"),
    [
        ([], mpb.MemberProfile(), ["update_mask"]),
        (["nickname"], mpb.MemberProfile(), ["update_mask"]),
        (["birth_month"], mpb.MemberProfile(birth_month=1, birth_day=1), ["update_mask"]),
        (["join_time"], mpb.MemberProfile(), ["profile.join_time"]),
        (["attributes.a"], mpb.MemberProfile(attributes={"a": "1", "b": "2"}), ["profile.attributes"]),
    ],
)
async def test_a_bad_mask_is_invalid_and_changes_nothing(
    client: PointsClient, member: str, redis: Redis, paths: list[str], profile: mpb.MemberProfile, fields: list[str]
) -> None:
    before = await redis_snapshot(redis)
    error = await refused(client.update_profile("member-1", profile, paths))
    assert isinstance(error, InvalidArgumentError)
    assert list(error.field_violations) == fields
    assert await redis_snapshot(redis) == before


async def test_a_linked_card_reaches_the_same_points(client: PointsClient, member: str, clock: ManualClock) -> None:
    card = await client.link_card("member-1", APP_ID, kind=mpb.CARD_KIND_APP)
    assert (card.card_number, card.kind, card.state) == (APP_ID, mpb.CARD_KIND_APP, mpb.CARD_STATE_ACTIVE)
    earned = await client.earn_points(APP_ID, STORE, 5_000, at(clock.now_ms()))
    assert earned.transaction_id.startswith("member-1.")
    assert (await client.get_balance(CARD)).balance.available_points == 1050
    assert (await client.get_balance(APP_ID)).account_id == "member-1"
    account = await client.get_account(account_id="member-1")
    assert [c.card_number for c in account.cards] == [CARD, APP_ID]


async def test_a_card_of_another_account_cannot_be_linked(client: PointsClient, member: str, redis: Redis) -> None:
    await client.create_account("member-2", SPARE)
    before = await redis_snapshot(redis)
    error = await refused(client.link_card("member-2", CARD))
    assert isinstance(error, ConflictError)
    assert error.reason == "CARD_ALREADY_LINKED"
    error = await refused(client.link_card("member-1", CARD))  # already this account's
    assert (error.reason, error.metadata) == ("CARD_ALREADY_LINKED", {"account_id": "member-1"})
    assert await redis_snapshot(redis) == before


async def test_a_link_to_a_missing_account_gives_its_claim_back(client: PointsClient, member: str) -> None:
    error = await refused(client.link_card("nobody", APP_ID))
    assert isinstance(error, NotFoundError)
    assert error.reason == "ACCOUNT_NOT_FOUND"
    # The card index was claimed for "nobody" first; the refusal released it.
    await client.link_card("member-1", APP_ID)
    assert (await client.get_balance(APP_ID)).account_id == "member-1"


async def test_link_is_idempotent_on_its_request_id(client: PointsClient, member: str) -> None:
    rid = new_request_id()
    first = await client.link_card("member-1", APP_ID, request_id=rid)
    await client.block_card(APP_ID)
    assert await client.link_card("member-1", APP_ID, request_id=rid) == first  # the first answer
    error = await refused(client.link_card("member-1", SPARE, request_id=rid))
    assert error.reason == "IDEMPOTENCY_KEY_REUSED"


async def test_a_blocked_card_is_refused_at_the_till_and_the_points_stay(
    client: PointsClient, member: str, clock: ManualClock, redis: Redis, keyspace: Keyspace
) -> None:
    await client.link_card("member-1", APP_ID)
    clock.advance(60_000)
    blocked = await client.block_card(CARD)
    assert (blocked.account_id, blocked.card.state) == ("member-1", mpb.CARD_STATE_BLOCKED)
    assert blocked.card.state_time.ToMilliseconds() == START_MS + 60_000
    before = await account_state(redis, keyspace, "member-1")
    for call in (
        client.earn_points(CARD, STORE, 1_000, at(clock.now_ms())),
        client.authorize_hold(CARD, STORE, 10),
        client.redeem_points(CARD, STORE, 10),
        client.get_balance(CARD),
    ):
        error = await refused(call)
        assert isinstance(error, RefusedError)
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert (error.reason, error.metadata) == ("CARD_BLOCKED", {"card_state": "BLOCKED"})
    assert await account_state(redis, keyspace, "member-1") == before
    # The other card, and the account by the blocked card, still work.
    assert (await client.get_balance(APP_ID)).balance.available_points == 1000
    account = await client.get_account(card_number=CARD)
    assert [(c.card_number, c.state) for c in account.cards] == [
        (CARD, mpb.CARD_STATE_BLOCKED),
        (APP_ID, mpb.CARD_STATE_ACTIVE),
    ]
    # Blocking again changes nothing; unblocking makes it work again.
    again = await client.block_card(CARD)
    assert again.card == blocked.card
    unblocked = await client.unblock_card(CARD)
    assert unblocked.card.state == mpb.CARD_STATE_ACTIVE
    assert (await client.redeem_points(CARD, STORE, 10)).balance.available_points == 990


async def test_a_reissued_card_keeps_the_points_and_the_old_one_stays_replaced(
    client: PointsClient, member: str, clock: ManualClock
) -> None:
    await client.block_card(CARD)
    clock.advance(1_000)
    reissued = await client.reissue_card(CARD, SPARE)
    assert reissued.account_id == "member-1"
    assert (reissued.replaced_card.state, reissued.replaced_card.replaced_by_card_number) == (
        mpb.CARD_STATE_REPLACED,
        SPARE,
    )
    assert reissued.new_card.state == mpb.CARD_STATE_ACTIVE
    assert reissued.new_card.link_time.ToMilliseconds() == START_MS + 1_000
    assert (await client.get_balance(SPARE)).balance.available_points == 1000
    error = await refused(client.redeem_points(CARD, STORE, 1))
    assert (error.reason, error.metadata) == (
        "CARD_BLOCKED",
        {"card_state": "REPLACED", "replaced_by_card_number": SPARE},
    )
    for call in (client.unblock_card(CARD), client.reissue_card(CARD, APP_ID)):
        error = await refused(call)
        assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CARD_BLOCKED")
    # The refused reissue gave back its claim on APP_ID.
    await client.link_card("member-1", APP_ID)


async def test_a_reissue_onto_a_card_in_use_changes_nothing(client: PointsClient, member: str, redis: Redis) -> None:
    await client.create_account("member-2", SPARE)
    before = await redis_snapshot(redis)
    error = await refused(client.reissue_card(CARD, SPARE))
    assert error.reason == "CARD_ALREADY_LINKED"
    error = await refused(client.reissue_card(CARD, CARD))
    assert list(error.field_violations) == ["new_card_number"]
    assert await redis_snapshot(redis) == before


async def test_an_unlinked_card_is_unknown_at_the_till_and_free_to_link_again(
    client: PointsClient, member: str, redis: Redis, keyspace: Keyspace
) -> None:
    await client.link_card("member-1", APP_ID)
    await client.unlink_card("member-1", CARD)
    assert await redis.hget(keyspace.card_bucket(CARD), CARD) is None
    error = await refused(client.get_balance(CARD))
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "CARD_NOT_FOUND")
    error = await refused(client.unlink_card("member-1", CARD))
    assert error.reason == "CARD_NOT_FOUND"
    await client.create_account("member-2", SPARE)
    await client.link_card("member-2", CARD)
    assert (await client.get_balance(CARD)).account_id == "member-2"
    assert [c.card_number for c in (await client.get_account(account_id="member-1")).cards] == [APP_ID]


async def test_closing_forfeits_the_points_and_stops_new_business(
    client: PointsClient, member: str, clock: ManualClock, redis: Redis, keyspace: Keyspace
) -> None:
    hold = await client.authorize_hold(CARD, STORE, 100)
    error = await refused(client.close_account("member-1"))
    assert (error.code, error.reason, error.metadata) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ACCOUNT_HAS_OPEN_HOLDS",
        {"held_points": "100"},
    )
    await client.void_hold(hold.hold_id)
    clock.advance(5_000)
    closed = await client.close_account("member-1")
    assert closed.forfeited_points == 1000
    assert [(e.delta_points, e.issuer_id) for e in closed.lot_effects] == [(-1000, "acme")]
    account = await client.get_account(card_number=CARD)
    assert (account.status, account.close_time.ToMilliseconds()) == (mpb.ACCOUNT_STATUS_CLOSED, START_MS + 5_000)
    assert (account.balance.available_points, account.balance.held_points) == (0, 0)
    for call in (
        client.earn_points(CARD, STORE, 1_000, at(clock.now_ms())),
        client.get_balance(CARD),
        client.link_card("member-1", APP_ID),
        client.close_account("member-1"),
    ):
        error = await refused(call)
        assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_CLOSED")
    [*_, last] = await stream_events(redis, keyspace, "member-1")
    assert (last.type, last.pts, last.available) == ("ACCOUNT_CLOSED", 1000, 0)
    assert (await account_state(redis, keyspace, "member-1")).lots == {}


async def test_every_card_change_is_an_event(
    client: PointsClient, member: str, redis: Redis, keyspace: Keyspace
) -> None:
    await client.link_card("member-1", APP_ID, kind=mpb.CARD_KIND_APP)
    await client.block_card(CARD)
    await client.unblock_card(CARD)
    await client.reissue_card(CARD, SPARE)
    await client.unlink_card("member-1", APP_ID)
    await client.update_profile("member-1", mpb.MemberProfile(home_company_id="acme"), ["home_company_id"])
    events = [(e.type, e.card, e.new_card, e.kind) for e in await stream_events(redis, keyspace, "member-1")]
    assert events == [
        ("ACCOUNT_OPENED", CARD, None, "P"),
        ("GRANT", None, None, None),
        ("CARD_LINKED", APP_ID, None, "A"),
        ("CARD_BLOCKED", CARD, None, None),
        ("CARD_UNBLOCKED", CARD, None, None),
        ("CARD_REISSUED", CARD, SPARE, "P"),
        ("CARD_UNLINKED", APP_ID, None, None),
        ("PROFILE_UPDATED", None, None, None),
    ]
    [*_, profile] = await stream_events(redis, keyspace, "member-1")
    assert profile.profile == codec.MemberProfile(jt=START_MS, hc="acme")


async def test_a_home_company_must_be_in_the_group_directory(client: PointsClient, member: str, redis: Redis) -> None:
    before = await redis_snapshot(redis)
    for call in (
        client.update_profile("member-1", mpb.MemberProfile(home_company_id="nowhere"), ["home_company_id"]),
        client.create_account("member-2", SPARE, profile=mpb.MemberProfile(home_company_id="nowhere")),
    ):
        error = await refused(call)
        assert (error.code, error.reason, error.metadata) == (
            grpc.StatusCode.NOT_FOUND,
            "COMPANY_NOT_FOUND",
            {"field": "profile.home_company_id"},
        )
    assert await redis_snapshot(redis) == before


async def test_a_retried_profile_update_answers_with_the_account_as_it_first_did(
    client: PointsClient, member: str
) -> None:
    rid = new_request_id()
    first = await client.update_profile(
        "member-1", mpb.MemberProfile(home_company_id="acme"), ["home_company_id"], request_id=rid
    )
    await client.update_profile("member-1", mpb.MemberProfile(birth_month=1, birth_day=2), ["birth_month", "birth_day"])
    again = await client.update_profile(
        "member-1", mpb.MemberProfile(home_company_id="acme"), ["home_company_id"], request_id=rid
    )
    assert again == first
    assert (again.profile.home_company_id, again.profile.birth_month) == ("acme", 0)
    assert (again.balance.available_points, [c.card_number for c in again.cards]) == (1000, [CARD])
