"""Merges survive the loss of Redis: rehydrate gives back the merged account (status, target,
merge id and time, its move record), the target's merge history and the refund states it keeps
of the merged account's transactions, the moved cards' index entries naming the target; and a
merge whose step 2 never ran comes back unfinished, for the recovery pass to finish once.
Reconcile names each merge field that differs."""

from __future__ import annotations

from typing import Any

import msgspec
from redis.asyncio import Redis

from pointauth.server.clock import ManualClock, to_time
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.journal.pg import connection
from pointauth.server.ledger import AccountView, Keyspace, Ledger, codec
from pointauth.server.ops import reconcile, rehydrate
from tests.helpers import stream_events
from tests.journal.support import (
    DAY_MS,
    KIOSK,
    MERGED,
    TILL,
    fingerprint,
    merged_pair,
    request_ids,
    running_worker,
    wait_until_applied,
)

RETENTION_MS = 90 * DAY_MS
EXTRA = codec.EXTRA_LOT_ID_STEP


async def _card_index(redis: Redis, keyspace: Keyspace) -> dict[str, str | None]:
    """Every card index entry: card -> account."""
    index: dict[str, str | None] = {}
    async for bucket in redis.scan_iter(match=f"{keyspace.prefix}:card:*"):
        entries: Any = await redis.hgetall(bucket)  # bytes -> bytes: the client never decodes
        index.update({card.decode(): codec.decode_card_owner(owner) for card, owner in entries.items()})
    return dict(sorted(index.items()))


async def _views(ledger: Ledger) -> dict[str, AccountView]:
    """GetAccount of S and T, but for x0 (where pruning resumes: rehydrate may start it later)."""
    views = {}
    for account in MERGED:
        view = await ledger.account(account)
        views[account] = view._replace(stored=msgspec.structs.replace(view.stored, x0=None))
    return views


async def _records(redis: Redis, keyspace: Keyspace, account: str) -> dict[str, Any]:
    """The account's transactions hash, decoded: records by seq, and the move record "m"."""
    raw: Any = await redis.hgetall(keyspace.account(account).transactions)
    return {
        field.decode(): codec.decode_merge_move(value) if field == b"m" else codec.decode_record(value)
        for field, value in raw.items()
    }


async def _unfinished(redis: Redis, keyspace: Keyspace) -> list[tuple[bytes, float]]:
    """Every shard's list of unfinished merges."""
    found: list[tuple[bytes, float]] = []
    for shard in range(keyspace.shards):
        entries: Any = await redis.zrange(keyspace.merges(shard), 0, -1, withscores=True)
        found += entries
    return found


async def test_rehydrate_gives_back_a_merge_and_refunds_go_on_after_it(
    stack: EmbeddedStack, redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace, dsn: str
) -> None:
    t0 = clock.now_ms()

    def at(seconds: int) -> int:
        return t0 + seconds * 1000

    await merged_pair(ledger, clock)
    async with running_worker(stack.redis.url, dsn, keyspace):
        await wait_until_applied(redis, dsn, keyspace, MERGED)
    before = await _views(ledger)
    index = await _card_index(redis, keyspace)
    records = {a: await _records(redis, keyspace, a) for a in MERGED}
    s, t = before["S"], before["T"]
    merged = (s.stored.status, s.stored.merged_into, s.stored.merge_id, s.stored.merged_ms)
    assert merged == ("M", "T", "S:merge-1", at(11))
    assert (s.stored.cards, s.stored.foreign_refunds, s.available) == ({}, {}, 0)
    assert t.stored.cards == {
        "APP-S2": codec.CardLink("B", "A", at(3), at(4)),
        "S-CARD1": codec.CardLink("B", "P", t0, at(13)),
        "T-CARD1": codec.CardLink("A", "P", at(9)),
    }
    assert t.stored.merges_in == {"S:merge-1": codec.MergeIn("S", at(11))}
    assert t.stored.foreign_refunds == {"S.6": "120|90,30"}
    assert (t.available, t.held) == (505, 0)
    assert index == {"APP-S2": "T", "S-CARD1": "T", "T-CARD1": "T"}
    moved = [
        codec.LotEntry(8, 40, t0 + 10 * DAY_MS, "L", "partner"),
        codec.LotEntry(2, 280, t0 + 30 * DAY_MS, "R", "acme"),
        codec.LotEntry(9, 25, t0 + 60 * DAY_MS, "R", "partner"),
    ]
    cards = {"APP-S2": f"BA{at(3)}:{at(4)}", "S-CARD1": f"AP{t0}"}
    assert records["S"]["m"] == codec.MergeMove("S:merge-1", "S", "T", at(11), moved, cards, earned=True)
    assert (records["S"]["6"].refunded, [e.returned for e in records["S"]["6"].alloc]) == (10, [0, 10])

    await redis.flushall()  # Redis lost
    report = await rehydrate(redis, dsn, keyspace, now_ms=clock.now_ms(), transaction_retention_ms=RETENTION_MS)
    assert (report.accounts, report.cards, report.unfinished_merges) == (2, 3, 0)
    assert await _views(ledger) == before
    assert await _card_index(redis, keyspace) == index
    assert await _unfinished(redis, keyspace) == []
    # Every record as it was, but S.6, which says everything refunded of it (PostgreSQL's), where
    # Redis had kept it as at the merge: T's f: field, which refunds read first, says the same.
    after = {a: await _records(redis, keyspace, a) for a in MERGED}
    refunded_since = msgspec.structs.replace(
        records["S"]["6"],
        refunded=120,
        alloc=[msgspec.structs.replace(e, returned=r) for e, r in zip(records["S"]["6"].alloc, [90, 30], strict=True)],
    )
    assert after == {"S": {**records["S"], "6": refunded_since}, "T": records["T"]}
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).differences == []

    # Refunds of S's transactions go on, on T: the 10 points left of the redemption, to lot 3's
    # bucket, which T keeps as its lot 4 (100 of 100 returned now).
    clock.set(at(20))
    on, last = await ledger.refund_following("S", 6, points=None, pos=None, **request_ids("refund-rest"))
    assert (on, last.tx, last.pts, last.lots) == ("T", 6, 10, [codec.LotEntry(4, 10, t0 + 10 * DAY_MS, "L", "acme")])
    assert (await ledger.account("T")).stored.foreign_refunds == {"S.6": "130|100,30"}
    async with running_worker(stack.redis.url, dsn, keyspace):
        await wait_until_applied(redis, dsn, keyspace, MERGED)
    async with connection(dsn) as conn:
        row = await conn.fetchrow("SELECT refunded, alloc::text FROM transactions WHERE account_id = 'S' AND seq = 6")
    assert row is not None
    assert (row[0], [e[5] for e in msgspec.json.decode(row[1])]) == (130, [100, 30])
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).differences == []


async def test_reconcile_names_merge_differences(
    stack: EmbeddedStack, redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace, dsn: str
) -> None:
    t0 = clock.now_ms()
    await merged_pair(ledger, clock)
    async with running_worker(stack.redis.url, dsn, keyspace):
        await wait_until_applied(redis, dsn, keyspace, MERGED)
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).differences == []

    s, t = keyspace.account("S").account, keyspace.account("T").account
    # A merge into T that never was, one whose time changed, a refund state changed, one of a
    # transaction never refunded there; S merged elsewhere.
    await redis.hset(t, "mh:merge-x", "X|5")
    await redis.hset(t, "mh:S:merge-1", f"S|{t0}")
    await redis.hset(t, "f:S.6", "121|90,31")
    await redis.hset(t, "f:S.2", "5|")
    await redis.hset(s, "mt", "X")

    said = sorted(str(d) for d in (await reconcile(redis, dsn, keyspace, settle_seconds=0)).differences)
    merged = f"S:merge-1 at {t0 + 11_000}"
    assert said == [
        f"S: status: Redis merged into X by {merged}, PostgreSQL merged into T by {merged}",
        f"T: merge S:merge-1 into the account: Redis S|{t0}, PostgreSQL S|{t0 + 11_000}",
        "T: merge merge-x into the account: Redis X|5, PostgreSQL absent",
        "T: refund state of S.2: Redis 5|, PostgreSQL absent",
        "T: refund state of S.6: Redis 121|90,31, PostgreSQL 120|90,30",
    ]


async def test_a_merge_whose_second_step_never_ran_is_rehydrated_unfinished_and_finished_once(
    stack: EmbeddedStack, redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace, dsn: str
) -> None:
    t0 = clock.now_ms()
    rid = request_ids
    await ledger.create_account("S", "S-CARD1", "open-s", fingerprint("open-s"))  # S 1
    await ledger.earn("S", points=70, expire_ms=t0 + 30 * DAY_MS, kind="R", pos=TILL, **rid("earn-s"))  # 2: lot 2
    await ledger.earn("S", points=20, expire_ms=t0 + 5 * DAY_MS, kind="L", pos=KIOSK, grant=True, **rid("grant-s"))  # 3
    await ledger.link_card("S", "APP-S2", "A", **rid("link-s2"))  # 4
    await ledger.set_card_state("APP-S2", "B", **rid("block-s2"))  # 5
    await ledger.create_account("T", "T-CARD1", "open-t", fingerprint("open-t"))  # T 1
    await ledger.earn("T", points=30, expire_ms=t0 + 30 * DAY_MS, kind="R", pos=TILL, **rid("earn-t"))  # 2: lot 2
    clock.set(t0 + 1000)
    # Step 1 alone, as a process killed right after it would leave it: S 6 MERGED_OUT.
    await ledger._call("merge_out", "S", {"target": "T", "merge": "m-1", "rid": "m-1", "actor": "a", "why": "w"})
    async with running_worker(stack.redis.url, dsn, keyspace):
        await wait_until_applied(redis, dsn, keyspace, MERGED)
    async with connection(dsn) as conn:
        merge = await conn.fetchrow("SELECT source_id, target_id, landed_on FROM merges WHERE merge_id = 'm-1'")
        cards = await conn.fetch("SELECT card_number, account_id FROM cards ORDER BY card_number")
    assert merge is not None
    assert (merge[0], merge[1], merge[2]) == ("S", "T", None)
    assert [(r[0], r[1]) for r in cards] == [("T-CARD1", "T")]  # S's cards are in the move
    before = await _views(ledger)
    index = await _card_index(redis, keyspace)
    move = (await _records(redis, keyspace, "S"))["m"]
    assert index == {"APP-S2": "S", "S-CARD1": "S", "T-CARD1": "T"}
    assert await _unfinished(redis, keyspace) == [(b"S", float(t0 + 1000))]
    assert (before["S"].stored.status, before["T"].available, before["T"].stored.merges_in) == ("M", 30, {})

    await redis.flushall()  # Redis lost
    report = await rehydrate(redis, dsn, keyspace, now_ms=clock.now_ms(), transaction_retention_ms=RETENTION_MS)
    assert (report.accounts, report.cards, report.unfinished_merges) == (2, 1, 1)
    assert await _views(ledger) == before
    assert await _card_index(redis, keyspace) == index
    assert (await _records(redis, keyspace, "S"))["m"] == move
    assert await _unfinished(redis, keyspace) == [(b"S", float(t0 + 1000))]
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).differences == []

    # The recovery pass finishes it, once: T 3 MERGED_IN, S's lot 2 joining T's, the partner lot
    # new (its id the event's seq), the cards on T with their states, the index naming T.
    clock.set(t0 + 2000)
    assert await ledger.finish_merges() == 1
    assert await ledger.finish_merges() == 0
    assert await ledger.finish_merge("S") is False
    target = await ledger.account("T")
    assert (target.available, target.stored.merges_in) == (120, {"m-1": codec.MergeIn("S", t0 + 2000)})
    assert target.stored.cards == {
        "APP-S2": codec.CardLink("B", "A", t0, t0),
        "S-CARD1": codec.CardLink("A", "P", t0),
        "T-CARD1": codec.CardLink("A", "P", t0),
    }
    balance = await ledger.balance("T")
    assert balance.lots == [
        codec.LotEntry(3, 20, t0 + 5 * DAY_MS, "L", "partner"),
        codec.LotEntry(2, 100, t0 + 30 * DAY_MS, "R", "acme"),
    ]
    # The stream since Redis was lost: the one MERGED_IN, after T's seq 2 as PostgreSQL had it.
    assert [(e.type, e.seq, e.pts) for e in await stream_events(redis, keyspace, "T")] == [("MERGED_IN", 3, 90)]
    assert await _card_index(redis, keyspace) == {"APP-S2": "T", "S-CARD1": "T", "T-CARD1": "T"}
    assert await _unfinished(redis, keyspace) == []
    async with running_worker(stack.redis.url, dsn, keyspace):
        await wait_until_applied(redis, dsn, keyspace, MERGED)
    async with connection(dsn) as conn:
        landed = await conn.fetchrow("SELECT landed_on, landed_at FROM merges WHERE merge_id = 'm-1'")
    assert landed is not None
    assert (landed[0], landed[1]) == ("T", to_time(t0 + 2000))
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).differences == []
