"""The account's layout: a call's Redis commands do not grow with the account's lots and holds,
and lots of one expiry, kind and issuer are one lot (earns merge into it; refunds and releases
find it)."""

from __future__ import annotations

from typing import Any, TypedDict

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from pointauth.server.clock import ManualClock
from pointauth.server.ledger import Keyspace, Ledger, PointOfSaleRef, codec
from tests.helpers import account_state, stream_events
from tests.journal.support import fingerprint

TILL = PointOfSaleRef("acme", "store-1", "till-1", 1)
OTHER = PointOfSaleRef("other-co", "store-1", "till-1", 1)
DAY_MS = 86_400_000


class Request(TypedDict):
    request_id: str
    fingerprint: str


class Requests:
    """A new request id (and its fingerprint) per call."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> Request:
        self.n += 1
        rid = f"00000000-0000-4000-8000-{self.n:012d}"
        return {"request_id": rid, "fingerprint": fingerprint(rid)}


async def commands(redis: Redis) -> dict[str, int]:
    """Commands Redis ran since the last CONFIG RESETSTAT, by name, the script's own included
    (FCALL and the stats commands themselves left out)."""
    stats: dict[str, dict[str, Any]] = await redis.info("commandstats")
    skip = {"cmdstat_fcall", "cmdstat_config|resetstat", "cmdstat_info"}
    return {name: int(entry["calls"]) for name, entry in stats.items() if name not in skip}


async def test_a_call_runs_the_same_commands_on_an_account_of_any_size(
    redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace
) -> None:
    rid = Requests()
    now = clock.now_ms()
    for account, lots, holds in (("small", 1, 0), ("large", 300, 300)):
        await ledger.create_account(account, f"card-{account}", **rid())
        for i in range(lots):
            # A day apart: no two lots merge.
            await ledger.earn(account, points=10_000, expire_ms=now + (30 + i) * DAY_MS, kind="R", pos=TILL,
                              grant=True, **rid())  # fmt: skip
        for _ in range(holds):
            await ledger.authorize(account, points=1, ttl_ms=7 * DAY_MS, pos=TILL, **rid())
    seen: dict[str, list[dict[str, int]]] = {}
    for account in ("small", "large"):
        for _ in range(2):  # settles the pruning of old records, which differs by history
            hold = await ledger.authorize(account, points=5, ttl_ms=60_000, pos=TILL, **rid())
            await ledger.void(account, hold.tx, **rid())
        per_call = []
        await redis.config_resetstat()
        hold = await ledger.authorize(account, points=5, ttl_ms=60_000, pos=TILL, **rid())
        per_call.append(await commands(redis))
        await redis.config_resetstat()
        await ledger.capture(account, hold.tx, points=2, **rid())
        per_call.append(await commands(redis))
        await redis.config_resetstat()
        await ledger.redeem(account, points=3, pos=TILL, **rid())
        per_call.append(await commands(redis))
        await redis.config_resetstat()
        await ledger.balance(account)
        per_call.append(await commands(redis))
        seen[account] = per_call
    assert seen["large"] == seen["small"], seen
    # Not one read of a whole hash or set: lots and holds are read by ranges (GetBalance's answer
    # lists every lot: its one range read).
    reads = {name for per_call in seen.values() for stats in per_call for name in stats}
    assert not reads & {"cmdstat_hgetall", "cmdstat_zrange", "cmdstat_hvals", "cmdstat_hkeys"}
    state = await account_state(redis, keyspace, "large")
    assert (state.lot_points, state.held_points) == (
        sum(lot.points for lot in state.lots.values()),
        sum(hold.points for hold in state.holds.values()),
    )
    assert (len(state.lots), len(state.holds)) == (300, 300)


async def test_earns_of_one_expiry_kind_and_issuer_are_one_lot(
    redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace
) -> None:
    rid = Requests()
    exp = clock.now_ms() + 30 * DAY_MS
    await ledger.create_account("m", "card-m", **rid())  # seq 1
    first = await ledger.earn("m", points=100, expire_ms=exp, kind="R", pos=TILL, **rid())  # 2: lot 2
    second = await ledger.earn("m", points=50, expire_ms=exp, kind="R", pos=TILL, **rid())  # 3: into lot 2
    limited = await ledger.earn("m", points=7, expire_ms=exp, kind="L", pos=TILL, grant=True, **rid())  # 4: lot 4
    other = await ledger.earn("m", points=9, expire_ms=exp, kind="R", pos=OTHER, **rid())  # 5: lot 5
    assert [(r.tx, [lot.lot_id for lot in r.lots]) for r in (first, second, limited, other)] == [
        (2, [2]), (3, [2]), (4, [4]), (5, [5]),
    ]  # fmt: skip
    assert second.lots == [codec.LotEntry(2, 50, exp, "R", "acme")]
    balance = await ledger.balance("m")
    assert [(lot.lot_id, lot.points) for lot in balance.lots] == [(4, 7), (2, 150), (5, 9)]

    # The second earn's refund takes its points back from the lot it went into.
    refund = await ledger.refund("m", 3, points=None, pos=None, **rid())
    assert refund.lots == [codec.LotEntry(2, -50, exp, "R", "acme")]
    state = await account_state(redis, keyspace, "m")
    assert {i: lot.points for i, lot in state.lots.items()} == {2: 100, 4: 7, 5: 9}
    assert state.lot_points == 116


async def test_points_given_back_to_an_emptied_lot_go_to_its_bucket_if_another_lot_holds_it(
    redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace
) -> None:
    rid = Requests()
    exp = clock.now_ms() + 30 * DAY_MS
    await ledger.create_account("m", "card-m", **rid())  # seq 1
    await ledger.earn("m", points=100, expire_ms=exp, kind="R", pos=TILL, **rid())  # 2: lot 2
    await ledger.redeem("m", points=100, pos=TILL, **rid())  # 3: lot 2 emptied and gone
    again = await ledger.earn("m", points=30, expire_ms=exp, kind="R", pos=TILL, **rid())  # 4: a new lot 4
    assert [lot.lot_id for lot in again.lots] == [4]
    refund = await ledger.refund("m", 3, points=60, pos=None, **rid())  # 5: back to lot 2's bucket: lot 4
    assert refund.lots == [codec.LotEntry(4, 60, exp, "R", "acme")]
    assert (await stream_events(redis, keyspace, "m"))[-1].lots == refund.lots
    state = await account_state(redis, keyspace, "m")
    assert state.lots == {4: codec.LotEntry(4, 90, exp, "R", "acme")}
    # With no lot in the bucket, a refund recreates the lot it took from, with its own id.
    await ledger.redeem("m", points=90, pos=TILL, **rid())  # 6: lot 4 gone
    back = await ledger.refund("m", 3, points=40, pos=None, **rid())  # 7
    assert back.lots == [codec.LotEntry(2, 40, exp, "R", "acme")]
    assert (await account_state(redis, keyspace, "m")).lots == {2: codec.LotEntry(2, 40, exp, "R", "acme")}


async def test_an_account_of_the_older_layout_is_refused_not_misread(
    redis: Redis, ledger: Ledger, keyspace: Keyspace
) -> None:
    # Its points were in l: fields of the hash: read as this layout, it would have none.
    await redis.hset(keyspace.account("old").account, mapping={"seq": "1", "l:1": "500:1800000000000:R:acme"})
    with pytest.raises(ResponseError, match="account old is stored in an older layout"):
        await ledger.balance("old")


async def test_old_records_are_forgotten_a_few_per_commit_and_a_commit_reads_none_before_then(
    redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace
) -> None:
    rid = Requests()
    keys = keyspace.account("aging")
    start = clock.now_ms()
    await ledger.create_account("aging", "card-aging", **rid())  # seq 1, no record
    for _ in range(6):  # seqs 2-7, a receipt each
        await ledger.earn("aging", points=10, expire_ms=start + 400 * DAY_MS, kind="R", pos=TILL, grant=True, **rid())

    async def kept() -> tuple[Any, Any, list[int]]:
        """x0, the pruning hint and the seqs of the records kept."""
        x0, hint = await redis.hmget(keys.account, [codec.X0_FIELD, codec.PRUNE_HINT_FIELD])
        return x0, hint, sorted(int(seq) for seq in await redis.hkeys(keys.transactions))

    # Record 2, the oldest, is within the refund window (90 days): a commit reads no record to
    # find that out, and forgets none.
    assert await kept() == (b"2", b"%d" % start, [2, 3, 4, 5, 6, 7])
    await redis.config_resetstat()
    await ledger.redeem("aging", points=1, pos=TILL, **rid())  # seq 8
    ran = await commands(redis)
    assert ("cmdstat_hget" in ran, "cmdstat_hdel" in ran) == (False, False)
    assert await kept() == (b"2", b"%d" % start, [2, 3, 4, 5, 6, 7, 8])
    # Past the window, each commit forgets up to four: 2-5, in one HDEL, with no hint left ...
    clock.advance(90 * DAY_MS + 1)
    await redis.config_resetstat()
    await ledger.redeem("aging", points=1, pos=TILL, **rid())  # seq 9
    ran = await commands(redis)
    assert (ran["cmdstat_hget"], ran["cmdstat_hdel"]) == (4, 1)
    assert await kept() == (b"6", b"0", [6, 7, 8, 9])
    # ... then 6-8, stopping at 9 (made just now), whose time is the hint again.
    await ledger.redeem("aging", points=1, pos=TILL, **rid())  # seq 10
    assert await kept() == (b"9", b"%d" % clock.now_ms(), [9, 10])
    assert (await ledger.balance("aging")).available == 57
