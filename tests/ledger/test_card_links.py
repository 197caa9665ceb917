"""A till call on a card is one round trip when the server process knows the card's account, and
a stale card -> account link (a cache of one server process, once cards can move) never moves
points on the wrong account: every call made for a card names it, the ledger script refuses it
(CARD_NOT_FOUND, writing nothing) unless the account still has the card, and the server looks
the card up again and retries once on the account the index names."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from pointauth.server.clock import ManualClock
from pointauth.server.config import EarnSettings, LedgerSettings
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.domain import reasons
from pointauth.server.domain.reasons import ErrorReason
from pointauth.server.ledger import Keyspace, Ledger, LedgerRefusal, PointOfSaleRef, codec
from pointauth.server.ledger.keys import CARD_BUCKETS, card_bucket_number
from pointauth.server.rules.earn_policy import EarnPolicy
from pointauth.server.services.points import PointsService
from tests.journal.support import fingerprint

TILL = PointOfSaleRef("acme", "store-1", "till-1", 1)
DAY_MS = 86_400_000
CARD = "4000000000007001"
CARD_NOT_FOUND = reasons.name(ErrorReason.CARD_NOT_FOUND)


async def calls(redis: Redis, command: str) -> int:
    stats: dict[str, dict[str, int]] = await redis.info("commandstats")
    return stats.get(f"cmdstat_{command}", {}).get("calls", 0)


@pytest.fixture
async def other(
    stack: EmbeddedStack, keyspace: Keyspace, clock: ManualClock, ledger_settings: LedgerSettings
) -> AsyncIterator[Ledger]:
    """A second server process's ledger (its own connection and card cache) on the same Redis."""
    async with Redis.from_url(stack.redis.url) as client:
        yield Ledger(client, keyspace, clock, ledger_settings)


async def open_account(ledger: Ledger, account: str, card: str, points: int) -> None:
    await ledger.create_account(account, card, f"open-{account}", fingerprint(f"open-{account}"))
    if points:
        await ledger.earn(
            account, points=points, expire_ms=ledger.clock.now_ms() + 30 * DAY_MS, kind="R", pos=TILL,
            request_id=f"grant-{account}", fingerprint=fingerprint(f"grant-{account}"), grant=True,
        )  # fmt: skip


async def earn_on(ledger: Ledger, card: str, points: int, rid: str) -> tuple[str, codec.OpResult]:
    return await ledger.on_card(
        card,
        lambda account: ledger.earn(
            account, points=points, expire_ms=ledger.clock.now_ms() + 30 * DAY_MS, kind="R", pos=TILL,
            request_id=rid, fingerprint=fingerprint(rid), card=card,
        ),
    )  # fmt: skip


async def redeem_on(ledger: Ledger, card: str, points: int, rid: str) -> tuple[str, codec.OpResult]:
    return await ledger.on_card(
        card,
        lambda account: ledger.redeem(
            account, points=points, pos=TILL, request_id=rid, fingerprint=fingerprint(rid), card=card
        ),
    )


async def relink(redis: Redis, keyspace: Keyspace, card: str, source: str, target: str | None) -> None:
    """What moving a card (#9) does, written directly: off the source account's hash, onto the
    target's, and the index names the target (or, with no target, the card is unlinked)."""
    await redis.hdel(keyspace.account(source).account, codec.card_field(card))
    if target is None:
        await redis.hdel(keyspace.card_bucket(card), card)
        return
    await redis.hset(keyspace.account(target).account, codec.card_field(card), codec.encode_card_link(codec.CardLink()))
    await redis.hset(keyspace.card_bucket(card), card, codec.card_owner_value(target))


async def snapshot(redis: Redis, keyspace: Keyspace, account: str) -> tuple[object, ...]:
    """Everything of the account's in Redis, and its events in the shard's stream."""
    keys = keyspace.account(account)
    entries: list[tuple[bytes, dict[bytes, bytes]]] = await redis.xrange(keys.events)  # type: ignore[assignment]
    decoded = [codec.decode_stream_entry(fields) for _, fields in entries]
    events = [e for e in decoded if isinstance(e, codec.Event)]
    notes = [n for n in decoded if isinstance(n, codec.IdempotencyNote)]
    return (
        await redis.hgetall(keys.account),
        await redis.zrange(keys.lots, 0, -1, withscores=True),
        await redis.zrange(keys.open_holds, 0, -1, withscores=True),
        await redis.hgetall(keys.transactions),
        [e for e in events if e.account == account],
        [n for n in notes if n.account == account],
    )


async def command_counts(redis: Redis) -> dict[str, int]:
    stats: dict[str, dict[str, int]] = await redis.info("commandstats")
    skip = ("cmdstat_config|resetstat", "cmdstat_info")
    return {name: stat["calls"] for name, stat in stats.items() if name not in skip}


async def test_a_cached_card_costs_exactly_one_command_per_till_call(ledger: Ledger, redis: Redis) -> None:
    await open_account(ledger, "one-trip", CARD, 1000)
    points = PointsService(ledger, EarnPolicy(EarnSettings()), ledger.clock)
    await points.balance(CARD)  # the first call on the card reads the index, and caches it
    # What one AuthorizeHold runs in Redis when the account is already known ...
    await redis.config_resetstat()
    await ledger.authorize(
        "one-trip", points=100, ttl_ms=600_000, pos=TILL, request_id="hold-0", fingerprint=fingerprint("hold-0")
    )
    direct = await command_counts(redis)
    # ... is all that one on the card runs: one FCALL, no card lookup (no HGET of the index).
    await redis.config_resetstat()
    batches = ledger.pipeline.batches_sent
    outcome = await points.authorize(
        CARD, points=100, ttl_ms=600_000, pos=TILL, request_id="hold-1", fingerprint=fingerprint("hold-1")
    )
    assert (outcome.account_id, outcome.result.pts, outcome.result.available) == ("one-trip", 100, 800)
    assert ledger.pipeline.batches_sent == batches + 1
    assert await calls(redis, "fcall") == 1
    # The card check inside the function reads the card's field (its state) with the account's
    # own fields: not one command more than the direct call.
    assert await command_counts(redis) == direct


async def test_a_stale_cached_link_never_moves_points_on_the_wrong_account(
    ledger: Ledger, other: Ledger, redis: Redis, keyspace: Keyspace
) -> None:
    await open_account(ledger, "old-owner", CARD, 500)
    await open_account(ledger, "new-owner", "4000000000007002", 500)
    # Server A caches CARD -> old-owner with a successful earn.
    account, result = await earn_on(ledger, CARD, 10, "earn-0")
    assert (account, result.available) == ("old-owner", 510)
    assert ledger.cards.get(CARD) == "old-owner"
    # Another server (or #9's relink) moves the card to new-owner; A's cache still names old-owner.
    await relink(redis, keyspace, CARD, "old-owner", "new-owner")
    before = await snapshot(redis, keyspace, "old-owner")

    account, result = await earn_on(ledger, CARD, 20, "earn-1")
    assert (account, result.available) == ("new-owner", 520)
    account, result = await redeem_on(ledger, CARD, 5, "redeem-1")
    assert (account, result.available) == ("new-owner", 515)
    # The old owner is unchanged to the point: no points, no record, no event, no idempotency record.
    assert await snapshot(redis, keyspace, "old-owner") == before
    assert (await other.balance("old-owner")).available == 510
    for rid in ("earn-1", "redeem-1"):
        assert not await redis.exists(keyspace.idempotency("old-owner", rid))
    assert ledger.cards.get(CARD) == "new-owner"
    # A retry of an earlier success on the old link still answers as it did (the replay check
    # comes first), whichever server the till reaches.
    retry = await ledger.earn(
        "old-owner", points=10, expire_ms=ledger.clock.now_ms() + 30 * DAY_MS, kind="R", pos=TILL,
        request_id="earn-0", fingerprint=fingerprint("earn-0"), card=CARD,
    )  # fmt: skip
    assert (retry.code, retry.available) == ("OK", 510)
    # The other server, which had not cached the card, finds new-owner in the index: one call.
    assert (await other.on_card(CARD, lambda a: other.balance(a, card=CARD)))[0] == "new-owner"


async def test_a_card_no_account_has_is_refused_and_changes_nothing(
    ledger: Ledger, other: Ledger, redis: Redis, keyspace: Keyspace
) -> None:
    await open_account(ledger, "gone-owner", CARD, 500)
    assert (await earn_on(ledger, CARD, 10, "earn-0"))[0] == "gone-owner"
    await relink(redis, keyspace, CARD, "gone-owner", None)
    before = await snapshot(redis, keyspace, "gone-owner")
    for server in (ledger, other):  # cached (stale), and not cached (the index has no entry)
        with pytest.raises(LedgerRefusal) as refused:
            await earn_on(server, CARD, 20, "earn-1")
        assert (refused.value.result.code, refused.value.result.reason) == ("NOT_FOUND", CARD_NOT_FOUND)
        with pytest.raises(LedgerRefusal) as refused:
            await redeem_on(server, CARD, 5, "redeem-1")
        assert refused.value.result.reason == CARD_NOT_FOUND
        assert server.cards.get(CARD) is None
    assert await snapshot(redis, keyspace, "gone-owner") == before
    assert not await redis.exists(keyspace.idempotency("gone-owner", "earn-1"))


async def test_the_function_refuses_a_card_the_account_lacks_before_anything_else(ledger: Ledger, redis: Redis) -> None:
    """Even a direct call (an index mid-move) writes nothing: no record, no event, no expiry."""
    await open_account(ledger, "checked", CARD, 500)
    with pytest.raises(LedgerRefusal) as refused:
        await ledger.authorize(
            "checked", points=10, ttl_ms=60_000, pos=TILL, request_id="h", fingerprint=fingerprint("h"),
            card="4000000000007999",
        )  # fmt: skip
    assert (refused.value.result.code, refused.value.result.reason) == ("NOT_FOUND", CARD_NOT_FOUND)
    assert not await redis.exists(ledger.keyspace.idempotency("checked", "h"))
    ok = await ledger.authorize(
        "checked", points=10, ttl_ms=60_000, pos=TILL, request_id="h", fingerprint=fingerprint("h"), card=CARD
    )
    assert (ok.code, ok.available, ok.held) == ("OK", 490, 10)


async def loaded(ledger: Ledger) -> int:
    """Loads `ledger`'s snapshot of the card index, as a server process does when it starts."""
    return (await ledger.cards.load_snapshot(ledger.redis, ledger.keyspace)).cards


async def test_with_the_snapshot_a_first_call_on_any_card_is_one_round_trip(
    ledger: Ledger, other: Ledger, redis: Redis
) -> None:
    for n in range(3):
        await open_account(ledger, f"member-{n}", f"400000000000710{n}", 1000)
    assert await loaded(other) == 3
    await other.pipeline.execute("PING")  # its connection open (and its handshake run), as a serving process's is
    await redis.config_resetstat()
    await other.authorize(
        "member-1", points=100, ttl_ms=600_000, pos=TILL, request_id="h", fingerprint=fingerprint("h")
    )
    direct = await command_counts(redis)
    points = PointsService(other, EarnPolicy(EarnSettings()), other.clock)
    await redis.config_resetstat()
    batches = other.pipeline.batches_sent
    outcome = await points.authorize(
        "4000000000007102", points=100, ttl_ms=600_000, pos=TILL, request_id="h", fingerprint=fingerprint("h")
    )
    assert (outcome.account_id, outcome.result.available) == ("member-2", 900)
    assert other.pipeline.batches_sent == batches + 1
    # What a direct call runs, the function's check of the card included: no read of the card index.
    assert await command_counts(redis) == direct


@pytest.mark.parametrize("scan_below", [CARD_BUCKETS, 0], ids=["buckets-scanned-for", "every-bucket-asked"])
async def test_the_snapshot_reads_every_bucket_of_the_index(
    other: Ledger, redis: Redis, keyspace: Keyspace, scan_below: int
) -> None:
    owners = {f"C{n:07d}": f"owner-{n % 997}" for n in range(5_000)}
    # Cards in the first and the last bucket, where a reader's rounds begin and end.
    for wanted in (0, CARD_BUCKETS - 1):
        owners[next(c for n in range(10**7) if card_bucket_number(c := f"E{n}") == wanted)] = f"edge-{wanted}"
    async with redis.pipeline(transaction=False) as pipe:
        for card, owner in owners.items():
            pipe.hset(keyspace.card_bucket(card), card, codec.card_owner_value(owner))
        await pipe.execute()

    read = await other.cards.load_snapshot(redis, keyspace, scan_below=scan_below)
    assert read.cards == len(owners) == 5_002
    assert read.bytes == sum(len(f"\n{card}\t{owner}") for card, owner in owners.items())
    assert {card: other.cards.get(card) for card in owners} == owners
    assert other.cards.get("C0005000") is None
    assert other.cards.get("C000000") is None  # a prefix of a card in the index is not that card


async def test_a_snapshot_gone_stale_never_moves_points_and_is_not_used_again(
    ledger: Ledger, other: Ledger, redis: Redis, keyspace: Keyspace
) -> None:
    await open_account(ledger, "old-owner", CARD, 500)
    await open_account(ledger, "new-owner", "4000000000007002", 500)
    await open_account(ledger, "leaving", "4000000000007003", 500)
    assert await loaded(other) == 3
    # After the snapshot: CARD moves to new-owner, 7003 is unlinked, 7004 is linked.
    await relink(redis, keyspace, CARD, "old-owner", "new-owner")
    await relink(redis, keyspace, "4000000000007003", "leaving", None)
    await ledger.link_card("new-owner", "4000000000007004", "P", request_id="link-4", fingerprint=fingerprint("link-4"))
    old, leaving = await snapshot(redis, keyspace, "old-owner"), await snapshot(redis, keyspace, "leaving")

    assert other.cards.get(CARD) == "old-owner"  # the snapshot's (stale) hint
    account, result = await earn_on(other, CARD, 20, "earn-1")
    assert (account, result.available) == ("new-owner", 520)
    assert other.cards.get(CARD) == "new-owner"
    account, result = await earn_on(other, "4000000000007004", 5, "earn-4")
    assert (account, result.available) == ("new-owner", 525)
    for attempt in range(2):
        batches = other.pipeline.batches_sent
        with pytest.raises(LedgerRefusal) as refused:
            await earn_on(other, "4000000000007003", 20, f"earn-3-{attempt}")
        assert refused.value.result.reason == CARD_NOT_FOUND
        # The first attempt tries the snapshot's hint, then the index; the second, the index only.
        assert other.pipeline.batches_sent == batches + (2 if attempt == 0 else 1)
    assert (await snapshot(redis, keyspace, "old-owner"), await snapshot(redis, keyspace, "leaving")) == (old, leaving)
