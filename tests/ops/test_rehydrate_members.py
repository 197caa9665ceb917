"""Members and cards survive the loss of Redis: rehydrate gives back every account hash field
(cards with their states and times, status, opening and closing times, profile) and the card
index entry of every card, and reconcile names each way the two stores can differ about them."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis

from pointauth.server.clock import ManualClock
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.ledger import AccountView, Keyspace, Ledger, LedgerRefusal, codec
from pointauth.server.ops import reconcile, rehydrate
from tests.journal.support import (
    DAY_MS,
    MEMBERS,
    TILL,
    fingerprint,
    members_and_cards,
    running_worker,
    wait_until_applied,
)

RETENTION_MS = 90 * DAY_MS


async def _card_index(redis: Redis, keyspace: Keyspace) -> dict[str, str | None]:
    """Every card index entry: card -> account."""
    index: dict[str, str | None] = {}
    async for bucket in redis.scan_iter(match=f"{keyspace.prefix}:card:*"):
        entries: Any = await redis.hgetall(bucket)  # bytes -> bytes: the client never decodes
        index.update({card.decode(): codec.decode_card_owner(owner) for card, owner in entries.items()})
    return dict(sorted(index.items()))


async def _views(ledger: Ledger) -> dict[str, AccountView]:
    """GetAccount of every member, but for x0 (where pruning resumes: rehydrate may start it later)."""
    views = {}
    for account in MEMBERS:
        view = await ledger.account(account)
        views[account] = view._replace(stored=msgspec.structs.replace(view.stored, x0=None))
    return views


async def test_rehydrate_gives_back_members_cards_and_the_card_index(
    stack: EmbeddedStack, redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace, dsn: str
) -> None:
    t0 = clock.now_ms()

    def at(seconds: int) -> int:
        return t0 + seconds * 1000

    await members_and_cards(ledger, clock)
    async with running_worker(stack.redis.url, dsn, keyspace):
        await wait_until_applied(redis, dsn, keyspace, MEMBERS)
    before = await _views(ledger)
    index = await _card_index(redis, keyspace)
    assert index == {"APP-A2": "alice", "CARD-A1": "alice", "CARD-A3": "alice", "CARD-C1": "carol", "CARD-X": "carol"}
    alice, bob = before["alice"].stored, before["bob"].stored
    assert alice.cards == {
        "APP-A2": codec.CardLink("B", "A", at(2), at(9)),
        "CARD-A1": codec.CardLink("R", "P", t0, at(5), "CARD-A3"),
        "CARD-A3": codec.CardLink("A", "P", at(5)),
    }
    assert (alice.status, alice.opened_ms, alice.closed_ms) == ("A", t0, None)
    assert alice.profile == codec.MemberProfile(bd="0416", jt=t0, attrs={"tier": "gold", "vip": "y"})
    assert (bob.cards, bob.status, bob.opened_ms, bob.closed_ms) == ({}, "C", at(10), at(13))
    assert (before["bob"].available, before["bob"].held) == (0, 0)

    await redis.flushall()  # Redis lost
    report = await rehydrate(redis, dsn, keyspace, now_ms=clock.now_ms(), transaction_retention_ms=RETENTION_MS)
    assert (report.accounts, report.cards) == (3, 5)
    assert await _views(ledger) == before
    assert await _card_index(redis, keyspace) == index
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).differences == []
    # The ledger script reads the restored fields: a blocked card is refused, a replaced one
    # names its replacement, and the closed account does no new business.
    refused = {
        "APP-A2": {"card_state": "BLOCKED"},
        "CARD-A1": {"card_state": "REPLACED", "replaced_by_card_number": "CARD-A3"},
    }
    for card, meta in refused.items():
        with pytest.raises(LedgerRefusal, match="CARD_BLOCKED") as caught:
            await ledger.on_card(card, lambda a, card=card: ledger.balance(a, card=card))  # type: ignore[misc]
        assert caught.value.result.meta == meta
    assert await ledger.on_card("CARD-A3", lambda a: ledger.balance(a, card="CARD-A3")) == (
        "alice",
        await ledger.balance("alice"),
    )
    with pytest.raises(LedgerRefusal, match="ACCOUNT_CLOSED"):
        await ledger.redeem("bob", points=1, pos=TILL, request_id="after-close", fingerprint=fingerprint("after-close"))


async def _set(redis: Redis, key: str, mapping: dict[bytes, bytes]) -> None:
    await redis.hset(key, mapping=mapping)  # type: ignore[arg-type]  # dict keys are invariant


async def test_reconcile_names_card_status_index_and_profile_differences(
    stack: EmbeddedStack, redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace, dsn: str
) -> None:
    t0 = clock.now_ms()

    def at(seconds: int) -> int:
        return t0 + seconds * 1000

    await members_and_cards(ledger, clock)
    async with running_worker(stack.redis.url, dsn, keyspace):
        await wait_until_applied(redis, dsn, keyspace, MEMBERS)
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).differences == []

    alice, bob, carol = (keyspace.account(a).account for a in MEMBERS)
    # A card's state, as if blocked behind the journal's back; a card's index entry lost, another
    # naming the wrong account; a profile field; the closed account made active again.
    blocked = codec.CardLink("B", "P", at(5), at(20))
    await _set(redis, alice, {codec.card_field("CARD-A3"): codec.encode_card_link(blocked)})
    await redis.hdel(keyspace.card_bucket("APP-A2"), "APP-A2")
    await redis.hset(keyspace.card_bucket("CARD-C1"), "CARD-C1", codec.card_owner_value("alice"))
    await _set(redis, carol, {b"bd": b"1231"})
    await redis.hdel(bob, codec.STATUS_FIELD, codec.CLOSED_FIELD)

    report = await reconcile(redis, dsn, keyspace, settle_seconds=0)
    said: list[Any] = sorted(str(d) for d in report.differences)
    assert said == [
        f"alice: card CARD-A3: Redis BP{at(5)}:{at(20)}, PostgreSQL AP{at(5)}",
        "alice: the card index has no entry for card APP-A2 of the account",
        f"bob: status: Redis active, PostgreSQL closed at {at(13)}",
        f'carol: profile: Redis {{"bd":"1231","jt":{at(15)}}}, PostgreSQL {{"jt":{at(15)}}}',
        "carol: the card index names alice for card CARD-C1 of the account",
    ]
