"""Coupons survive the loss of Redis: rehydrate gives back each member's coupons (q:<coupon id>,
used or not, those a merge brought among them) and a merged member's move record with its
coupons; the ledger script then goes on from them (a used coupon stays used). Reconcile names a
coupon that differs."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis

from pointauth.client import PointsClient, RefusedError
from pointauth.server.app import PointauthServer
from pointauth.server.clock import ManualClock
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.journal.pg import connection
from pointauth.server.ledger import AccountView, Keyspace, Ledger, codec
from pointauth.server.ops import reconcile, rehydrate
from tests.conftest import STORE
from tests.journal.coupons_story import CARDS, MEMBERS, CouponsStory, coupons_story, ms
from tests.journal.support import DAY_MS, running_worker, wait_until_applied

RETENTION_MS = 90 * DAY_MS


async def _views(ledger: Ledger) -> dict[str, AccountView]:
    """GetAccount of every member, but for x0 (where pruning resumes: rehydrate may start it later)."""
    views = {}
    for account in MEMBERS:
        view = await ledger.account(account)
        views[account] = view._replace(stored=msgspec.structs.replace(view.stored, x0=None))
    return views


async def _records(redis: Redis, keyspace: Keyspace, account: str) -> dict[str, Any]:
    """The account's transactions hash decoded: records by seq, and a merged account's move ("m")."""
    raw: Any = await redis.hgetall(keyspace.account(account).transactions)
    return {
        field.decode(): codec.decode_merge_move(value) if field == b"m" else codec.decode_record(value)
        for field, value in raw.items()
    }


async def _journaled(
    stack: EmbeddedStack, client: PointsClient, clock: ManualClock, redis: Redis, keyspace: Keyspace, dsn: str
) -> CouponsStory:
    story = await coupons_story(client, clock)
    async with running_worker(stack.redis.url, dsn, keyspace):
        await wait_until_applied(redis, dsn, keyspace, MEMBERS)
    return story


async def test_rehydrate_gives_back_coupons_used_or_not_and_the_moved_ones(
    stack: EmbeddedStack,
    redis: Redis,
    ledger: Ledger,
    client: PointsClient,
    server: PointauthServer,
    clock: ManualClock,
    keyspace: Keyspace,
    dsn: str,
) -> None:
    story = await _journaled(stack, client, clock, redis, keyspace, dsn)
    before = await _views(ledger)
    records = {m: await _records(redis, keyspace, m) for m in MEMBERS}
    other, kept = ms(story.other), ms(story.kept)
    assert sorted(before["q-1"].stored.coupons) == ["q-1.2.2", "q-2.2.2", "q-2.3.2"]
    assert before["q-2"].stored.coupons == {}
    assert records["q-2"]["m"].coupons == {
        "q-2.2.2": f"thanks|{other[0]}|{other[1]}|{story.at(6)}",
        "q-2.3.2": f"thanks|{kept[0]}|{kept[1]}|0",
    }

    await redis.flushall()  # Redis lost
    report = await rehydrate(redis, dsn, keyspace, now_ms=clock.now_ms(), transaction_retention_ms=RETENTION_MS)
    assert report.accounts == 2
    assert await _views(ledger) == before
    assert {m: await _records(redis, keyspace, m) for m in MEMBERS} == records
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).ok
    # The server follows the directory's version every second; a poll may have seen the flushed
    # Redis: take in what rehydrate restored now rather than wait for the next.
    await server.directory.refresh()

    # The script reads what came back: each coupon used is refused as used, whoever used it.
    for coupon, used in (("q-1.2.2", story.at(4)), ("q-2.3.2", story.at(8)), ("q-2.2.2", story.at(6))):
        with pytest.raises(RefusedError) as caught:
            await client.use_coupon(CARDS["q-1"], coupon, STORE)
        assert (caught.value.reason, caught.value.metadata) == ("COUPON_ALREADY_USED", {"used_at": str(used)}), coupon


async def test_an_unfinished_merge_gets_its_coupons_back_in_its_move_record(
    stack: EmbeddedStack,
    redis: Redis,
    ledger: Ledger,
    client: PointsClient,
    server: PointauthServer,
    clock: ManualClock,
    keyspace: Keyspace,
    dsn: str,
) -> None:
    """A merge whose step 2 had not reached PostgreSQL: the source's move record comes back with
    its coupons (the merges row's), and the recovery pass lands them on the target."""
    story = await _journaled(stack, client, clock, redis, keyspace, dsn)
    before = await _views(ledger)
    async with connection(dsn) as conn:  # as if q-1's MERGED_IN and later had not been applied
        await conn.execute("UPDATE merges SET landed_on = NULL, landed_at = NULL")
        await conn.execute("DELETE FROM coupons WHERE account_id = 'q-1' AND coupon_id <> 'q-1.2.2'")
        await conn.execute("DELETE FROM journal WHERE account_id = 'q-1' AND seq > 3")
        await conn.execute("UPDATE accounts SET last_seq = 3 WHERE account_id = 'q-1'")

    await redis.flushall()
    await rehydrate(redis, dsn, keyspace, now_ms=clock.now_ms(), transaction_retention_ms=RETENTION_MS)
    assert sorted((await ledger.account("q-1")).stored.coupons) == ["q-1.2.2"]
    assert await ledger.finish_merges() == 1
    after = (await ledger.account("q-1")).stored.coupons
    # Landed as before, under their ids; q-2.3.2 unused, its use after the merge having been lost.
    assert after == {
        **before["q-1"].stored.coupons,
        "q-2.3.2": codec.CouponEntry("q-2.3.2", "thanks", *ms(story.kept)[:2], 0),
    }


async def test_reconcile_names_coupons_that_differ(
    stack: EmbeddedStack,
    redis: Redis,
    client: PointsClient,
    server: PointauthServer,
    clock: ManualClock,
    keyspace: Keyspace,
    dsn: str,
) -> None:
    story = await _journaled(stack, client, clock, redis, keyspace, dsn)
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).ok
    q1, q2 = (keyspace.account(m).account for m in MEMBERS)
    kept = ms(story.kept)
    # A used coupon made unused again behind the journal's back, one lost, one added.
    await redis.hset(q1, "q:q-2.3.2", f"thanks|{kept[0]}|{kept[1]}|0")
    await redis.hdel(q1, "q:q-1.2.2")
    await redis.hset(q2, "q:q-2.9.2", "thanks|1|2|0")

    report = await reconcile(redis, dsn, keyspace, settle_seconds=0)
    first = ms(story.first)
    assert sorted(str(d) for d in report.differences) == [
        f"q-1: coupon q-1.2.2: Redis absent, PostgreSQL thanks|{first[0]}|{first[1]}|{story.at(4)}",
        f"q-1: coupon q-2.3.2: Redis thanks|{kept[0]}|{kept[1]}|0, PostgreSQL thanks|{kept[0]}|{kept[1]}|{story.at(8)}",
        "q-2: coupon q-2.9.2: Redis thanks|1|2|0, PostgreSQL absent",
    ]
    assert not report.ok
