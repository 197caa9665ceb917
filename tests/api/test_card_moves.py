"""A card moved between accounts by one server process while tills use it through another,
whose card cache still names the old account: points land only on the account that has the
card at that moment, as each account's own events show."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from pointauth.client import NotFoundError, PointsClient, RefusedError
from pointauth.server.app import PointauthServer
from pointauth.server.clock import ManualClock
from pointauth.server.config import Settings
from pointauth.server.domain.ids import parse_transaction_id
from pointauth.server.ledger import Keyspace, codec
from tests.conftest import CARD, STORE, at
from tests.helpers import stream_events

ACCOUNTS = ("first", "second")
MOVES = 12
TILLS = 4


def earns_while_linked(events: list[codec.Event], card: str) -> tuple[set[int], set[int]]:
    """(seqs of the account's EARN events made while it had the card, those made while not)."""
    linked, inside, outside = False, set[int](), set[int]()
    for event in events:
        if event.type in ("ACCOUNT_OPENED", "CARD_LINKED") and event.card == card:
            linked = True
        elif event.type == "CARD_UNLINKED" and event.card == card:
            linked = False
        elif event.type == "EARN":
            (inside if linked else outside).add(event.seq)
    return inside, outside


async def test_a_card_moved_under_a_till_process_never_earns_on_the_wrong_account(
    settings: Settings, clock: ManualClock, redis: Redis, keyspace: Keyspace, client: PointsClient
) -> None:
    desk = client  # the service desk's server process moves the card
    async with (
        PointauthServer(settings, clock, sweeper=False) as till_process,
        PointsClient(f"127.0.0.1:{till_process.port}", plaintext=True) as till,
    ):
        await desk.create_account("first", CARD)
        await desk.create_account("second", "4000000000000902")
        earned: list[str] = []
        missed: list[str] = []
        stop = asyncio.Event()

        async def till_loop() -> None:
            while not stop.is_set():
                try:
                    earned.append((await till.earn_points(CARD, STORE, 1_000, at(clock.now_ms()))).transaction_id)
                except NotFoundError as error:  # between the unlink and the link
                    missed.append(error.reason)

        owner = "first"
        # The till process learns the card's account, and caches it.
        earned.append((await till.earn_points(CARD, STORE, 1_000, at(clock.now_ms()))).transaction_id)
        assert till_process.ledger.cards.get(CARD) == "first"
        tills = [asyncio.create_task(till_loop()) for _ in range(TILLS)]
        for _ in range(MOVES):
            other = ACCOUNTS[1 - ACCOUNTS.index(owner)]
            await desk.unlink_card(owner, CARD)
            await desk.link_card(other, CARD)
            owner = other
            await asyncio.sleep(0.01)  # the tills go on meanwhile
        stop.set()
        await asyncio.gather(*tills)
        assert set(missed) <= {"CARD_NOT_FOUND"}
        # Deterministically stale: the till process caches the owner, the desk moves the card,
        # and the till's next earn still lands on the account that has it now.
        earned.append((await till.earn_points(CARD, STORE, 1_000, at(clock.now_ms()))).transaction_id)
        assert till_process.ledger.cards.get(CARD) == owner
        other = ACCOUNTS[1 - ACCOUNTS.index(owner)]
        await desk.unlink_card(owner, CARD)
        await desk.link_card(other, CARD)
        last = await till.earn_points(CARD, STORE, 1_000, at(clock.now_ms()))
        earned.append(last.transaction_id)
        assert last.transaction_id.startswith(f"{other}.")
        assert till_process.ledger.cards.get(CARD) == other

    per_account = dict.fromkeys(ACCOUNTS, 0)
    for transaction in earned:
        parsed = parse_transaction_id(transaction)
        assert parsed is not None
        per_account[parsed[0]] += 1
    for account in ACCOUNTS:
        events = await stream_events(redis, keyspace, account)
        inside, outside = earns_while_linked(events, CARD)
        # Every earn of the account happened while it had the card, and each is one the tills
        # were told of (10 points each): nothing landed anywhere else.
        assert outside == set()
        assert len(inside) == per_account[account]
        assert events[-1].available == 10 * per_account[account]
    assert sum(per_account.values()) == len(earned)
    # Both accounts earned while the tills ran: they followed the card from one to the other.
    assert min(per_account.values()) > 1


async def test_a_blocked_card_stops_at_once_in_a_process_that_has_it_cached(
    settings: Settings, clock: ManualClock, client: PointsClient
) -> None:
    await client.create_account("member-1", CARD)
    async with (
        PointauthServer(settings, clock, sweeper=False) as till_process,
        PointsClient(f"127.0.0.1:{till_process.port}", plaintext=True) as till,
    ):
        # Linked before the till process started: its snapshot of the card index has the card,
        # so the first call on it is one round trip (ledger.card_index_snapshot).
        assert till_process.ledger.cards.get(CARD) == "member-1"
        batches = till_process.ledger.pipeline.batches_sent
        assert (await till.earn_points(CARD, STORE, 1_000, at(clock.now_ms()))).earned_points == 10
        assert till_process.ledger.pipeline.batches_sent == batches + 1
        await client.block_card(CARD)  # through the other process
        with pytest.raises(RefusedError) as caught:
            await till.earn_points(CARD, STORE, 1_000, at(clock.now_ms()))
        assert caught.value.reason == "CARD_BLOCKED"
        await client.unblock_card(CARD)
        assert (await till.earn_points(CARD, STORE, 1_000, at(clock.now_ms()))).balance.available_points == 20
