"""MergeAccounts (ポイント口座統合) through gRPC, against real Redis: lots, cards, transaction
ids and history of the source arrive on the target; refusals change nothing; a merge cut short
is finished by whoever meets it next."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from redis.asyncio import Redis

from pointauth.client import PointauthError, PointsClient, new_request_id
from pointauth.server.app import PointauthServer
from pointauth.server.clock import ManualClock
from pointauth.server.ledger import Keyspace, codec
from pointauth.v1 import common_pb2
from pointauth.v1 import members_service_pb2 as mpb
from tests.conftest import DAY_MS, START_MS, STORE, at
from tests.helpers import account_state, stream_events

S_CARD, S_APP, T_CARD = "4000000000000101", "APP-S-0001", "4000000000000201"
SOON, LATER = START_MS + 10 * DAY_MS, START_MS + 40 * DAY_MS
PARTNER = common_pb2.PointOfSale(
    company_id="partner", store_id="store-9", terminal_id="kiosk-1", channel=common_pb2.CHANNEL_KIOSK
)


async def merge(
    client: PointsClient, source: str = "source", target: str = "target", request_id: str | None = None
) -> mpb.MergeAccountsResponse:
    return await client.merge_accounts(
        source, target, operator_id="desk-7", reason="same member, two brands", request_id=request_id
    )


@pytest.fixture
async def pair(client: PointsClient) -> None:
    """source: 100 (acme, soon) + 50 (partner, later) and a second, blocked card;
    target: 30 (acme, soon)."""
    await client.create_account("source", S_CARD)
    await client.link_card("source", S_APP, kind=mpb.CARD_KIND_APP)
    await client.block_card(S_APP)
    await client.create_account("target", T_CARD)
    await client.grant_points(S_CARD, 100, at(SOON), STORE)
    await client.grant_points(S_CARD, 50, at(LATER), PARTNER)
    await client.grant_points(T_CARD, 30, at(SOON), STORE)


@pytest.mark.usefixtures("pair")
async def test_every_lot_and_card_of_the_source_arrives_on_the_target(
    client: PointsClient, server: PointauthServer, clock: ManualClock, redis: Redis, keyspace: Keyspace
) -> None:
    clock.advance(1_000)
    merged = await merge(client)
    assert merged.moved_points == 150
    assert [(lot.points, lot.issuer_id, lot.expire_time.ToMilliseconds()) for lot in merged.moved_lots] == [
        (100, "acme", SOON),
        (50, "partner", LATER),
    ]
    assert list(merged.moved_card_numbers) == [S_CARD, S_APP]
    # The target: the acme lot joined the target's lot of the same expiry, kind and issuer; the
    # partner lot is a new one with its own expiry and issuer.
    balance = await client.get_balance(S_CARD)
    assert balance.account_id == "target"
    assert [(lot.points, lot.issuer_id, lot.expire_time.ToMilliseconds(), lot.kind) for lot in balance.lots] == [
        (130, "acme", SOON, common_pb2.LOT_KIND_REGULAR),
        (50, "partner", LATER, common_pb2.LOT_KIND_REGULAR),
    ]
    target = await client.get_account(account_id="target")
    assert [(c.card_number, c.state) for c in target.cards] == [
        (S_CARD, mpb.CARD_STATE_ACTIVE),
        (T_CARD, mpb.CARD_STATE_ACTIVE),
        (S_APP, mpb.CARD_STATE_BLOCKED),
    ]
    assert [(m.source_account_id, m.merge_time.ToMilliseconds()) for m in target.merges] == [
        ("source", START_MS + 1_000)
    ]
    source = await client.get_account(account_id="source")
    assert (source.status, source.merged_into_account_id) == (mpb.ACCOUNT_STATUS_MERGED, "target")
    assert source.merge_time.ToMilliseconds() == START_MS + 1_000
    assert (list(source.cards), source.balance.available_points) == ([], 0)
    # The card index names the target; the merge is finished (off the shard's list).
    assert await redis.hget(keyspace.card_bucket(S_CARD), S_CARD) == b"target"
    assert await redis.zcard(keyspace.account("source").merges) == 0
    # The journal: MERGED_OUT on the source, MERGED_IN on the target, with who and why.
    [*_, out] = await stream_events(redis, keyspace, "source")
    assert (out.type, out.pts, out.target, out.cards, out.actor, out.why) == (
        "MERGED_OUT",
        150,
        "target",
        [S_CARD, S_APP],
        "desk-7",
        "same member, two brands",
    )
    [*_, came] = await stream_events(redis, keyspace, "target")
    assert (came.type, came.pts, came.source, came.merge) == ("MERGED_IN", 150, "source", out.merge)
    assert [(e.points, e.issuer_id) for e in came.lots] == [(100, "acme"), (50, "partner")]


@pytest.mark.usefixtures("pair")
async def test_the_sources_cards_and_transactions_keep_working_on_the_target(
    client: PointsClient, server: PointauthServer, clock: ManualClock
) -> None:
    earn = await client.earn_points(S_CARD, STORE, 2_000, at(clock.now_ms()))  # 20 points, on source
    redeem = await client.redeem_points(S_CARD, STORE, 70)
    assert earn.transaction_id.startswith("source.")
    await merge(client)
    # A till with the source's card now earns on the target.
    assert (await client.earn_points(S_CARD, STORE, 1_000, at(clock.now_ms()))).transaction_id.startswith("target.")
    # Refunds of the source's transactions land on the target.
    back = await client.refund_transaction(redeem.transaction_id, points=30)
    assert back.transaction_id.startswith("target.")
    assert back.balance.available_points == 30 + 100 + 50 + 20 - 70 + 10 + 30
    rest = await client.refund_transaction(redeem.transaction_id)
    assert rest.refunded_points == 40
    with pytest.raises(PointauthError) as caught:
        await client.refund_transaction(redeem.transaction_id, points=1)
    assert (caught.value.reason, caught.value.metadata["refundable_points"]) == ("REFUND_EXCEEDS_ORIGINAL", "0")
    taken = await client.refund_transaction(earn.transaction_id)
    assert (taken.refunded_points, taken.balance.available_points) == (20, 30 + 150 + 10)
    # The source's receipts still read; the refund's names the source's transaction.
    assert (await client.get_receipt(redeem.transaction_id)).used_points == 70
    assert (await client.get_receipt(rest.transaction_id)).related_transaction_id == redeem.transaction_id


@pytest.mark.usefixtures("pair")
async def test_a_merged_account_refuses_new_business_naming_its_target(
    client: PointsClient, server: PointauthServer
) -> None:
    await merge(client)
    for call in (
        client.close_account("source"),
        client.link_card("source", "4000000000000999"),
        merge(client, "source", "target"),
    ):
        with pytest.raises(PointauthError) as caught:
            await call
        assert (caught.value.code, caught.value.reason, caught.value.metadata) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "ACCOUNT_MERGED",
            {"merged_into_account_id": "target"},
        )


@pytest.mark.usefixtures("pair")
async def test_a_refused_merge_changes_nothing(
    client: PointsClient, server: PointauthServer, redis: Redis, keyspace: Keyspace
) -> None:
    hold = await client.authorize_hold(S_CARD, STORE, 10)
    before = [await account_state(redis, keyspace, a) for a in ("source", "target")]
    with pytest.raises(PointauthError) as caught:
        await merge(client)
    assert (caught.value.reason, caught.value.metadata) == ("ACCOUNT_HAS_OPEN_HOLDS", {"held_points": "10"})
    with pytest.raises(PointauthError) as caught:
        await merge(client, target="nobody")
    assert caught.value.reason == "ACCOUNT_NOT_FOUND"
    with pytest.raises(PointauthError) as caught:
        await merge(client, target="source")
    assert list(caught.value.field_violations) == ["target_account_id"]
    assert [await account_state(redis, keyspace, a) for a in ("source", "target")] == before
    await client.void_hold(hold.hold_id)
    await client.close_account("target")
    with pytest.raises(PointauthError) as caught:
        await merge(client)
    assert caught.value.reason == "ACCOUNT_CLOSED"


@pytest.mark.usefixtures("pair")
async def test_a_merge_retried_answers_as_the_first_time(client: PointsClient) -> None:
    await client.create_account("other", "4000000000000301")
    rid = new_request_id()
    first = await merge(client, request_id=rid)
    assert await merge(client, request_id=rid) == first
    with pytest.raises(PointauthError) as caught:
        await merge(client, target="other", request_id=rid)
    assert caught.value.reason == "IDEMPOTENCY_KEY_REUSED"


@pytest.mark.usefixtures("pair")
async def test_a_merge_cut_after_its_first_step_is_finished_by_the_next_till_call(
    client: PointsClient, server: PointauthServer, redis: Redis, keyspace: Keyspace
) -> None:
    # Step 1 alone, as a process killed right after it would leave it.
    await server.ledger._call(
        "merge_out", "source", {"target": "target", "merge": "m-1", "rid": "m-1", "actor": "a", "why": "w"}
    )
    assert await redis.zrange(keyspace.account("source").merges, 0, -1) == [b"source"]
    assert (await account_state(redis, keyspace, "target")).lot_points == 30
    # The till still has the source's card; the index still names the source.
    earned = await client.earn_points(S_CARD, STORE, 1_000, at(START_MS))
    assert earned.transaction_id.startswith("target.")
    assert earned.balance.available_points == 30 + 150 + 10
    assert await redis.hget(keyspace.card_bucket(S_CARD), S_CARD) == b"target"
    assert await redis.zcard(keyspace.account("source").merges) == 0
    # Finishing again changes nothing.
    assert await server.ledger.finish_merge("source") is False
    assert await server.ledger.finish_merges() == 0


@pytest.mark.usefixtures("pair")
async def test_a_merge_under_till_traffic_on_both_accounts_conserves_every_point(
    client: PointsClient, server: PointauthServer, clock: ManualClock, redis: Redis, keyspace: Keyspace
) -> None:
    earned = {"source": 0, "target": 0}
    redeemed = {"source": 0, "target": 0}
    stop = asyncio.Event()

    async def till(card: str) -> None:
        while not stop.is_set():
            e = await client.earn_points(card, STORE, 1_000, at(clock.now_ms()))
            earned[e.transaction_id.split(".")[0]] += 10
            r = await client.redeem_points(card, STORE, 3)
            redeemed[r.transaction_id.split(".")[0]] += 3

    tills = [asyncio.create_task(till(card)) for card in (S_CARD, T_CARD, S_CARD, T_CARD)]
    await asyncio.sleep(0.05)
    await merge(client)
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*tills)
    total = 180 + sum(earned.values()) - sum(redeemed.values())
    assert (await client.get_balance(T_CARD)).balance.available_points == total
    source = await account_state(redis, keyspace, "source")
    assert (source.lot_points, source.held_points, source.lots) == (0, 0, {})
    # Nothing happened on the source after it merged out.
    assert (await stream_events(redis, keyspace, "source"))[-1].type == "MERGED_OUT"
    assert earned["source"] > 0
    assert earned["target"] > 0
    assert codec.decode_card_owner(await redis.hget(keyspace.card_bucket(S_CARD), S_CARD)) == "target"


@pytest.mark.usefixtures("pair")
async def test_a_merge_finished_late_after_its_target_merged_on_applies_once(
    client: PointsClient, server: PointauthServer, redis: Redis, keyspace: Keyspace
) -> None:
    await merge(client)
    # As if the first merge's process had died before its last step: still on the list.
    await redis.zadd(keyspace.account("source").merges, {"source": 1})
    await client.create_account("third", "4000000000000301")
    await merge(client, "target", "third")
    assert await server.ledger.finish_merges() == 1
    third = await client.get_balance("4000000000000301")
    assert (third.account_id, third.balance.available_points) == ("third", 180)
    assert await server.ledger.finish_merges() == 0
