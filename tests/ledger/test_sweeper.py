"""The hold sweeper's work per tick is bounded: a burst of expiries is spread over ticks, and
one account's over calls."""

from __future__ import annotations

from typing import Any

import pytest

from pointauth.server.clock import ManualClock
from pointauth.server.config import LedgerSettings
from pointauth.server.ledger import Keyspace, Ledger, PointOfSaleRef, codec
from tests.journal.support import fingerprint

TILL = PointOfSaleRef("acme", "store-1", "till-1", 1)
DAY_MS = 86_400_000


@pytest.fixture
def ledger_settings() -> LedgerSettings:
    return LedgerSettings(shards=16, sweep_accounts_per_tick=5)


async def test_a_sweep_writes_down_at_most_its_share_of_accounts(
    ledger: Ledger, clock: ManualClock, keyspace: Keyspace
) -> None:
    for i in range(12):
        account = f"sweep-{i}"
        await ledger.create_account(account, f"40000000000002{i:02d}", f"open-{i}", fingerprint(f"open-{i}"))
        await ledger.earn(
            account, points=10, expire_ms=clock.now_ms() + DAY_MS, kind="R", pos=TILL,
            request_id=f"grant-{i}", fingerprint=fingerprint(f"grant-{i}"), grant=True,
        )  # fmt: skip
        await ledger.authorize(
            account, points=10, ttl_ms=5_000, pos=TILL, request_id=f"hold-{i}", fingerprint=fingerprint(f"hold-{i}")
        )
    clock.advance(5_000)
    # Each sweep covers all 16 shards; what is left is written down by the next ones.
    assert [await ledger.sweep_expired_holds(16) for _ in range(4)] == [5, 5, 2, 0]
    assert sum([await ledger.redis.zcard(keyspace.holds(shard)) for shard in range(16)]) == 0


async def _account_with_holds(ledger: Ledger, clock: ManualClock, account: str, holds: int) -> list[int]:
    """The account, 1,000 points and `holds` holds of 1 point expiring together; their ids."""
    await ledger.create_account(account, "4000000000000300", f"open-{account}", fingerprint(f"open-{account}"))
    await ledger.earn(
        account, points=1_000, expire_ms=clock.now_ms() + DAY_MS, kind="R", pos=TILL,
        request_id=f"grant-{account}", fingerprint=fingerprint(f"grant-{account}"), grant=True,
    )  # fmt: skip
    return [
        (await ledger.authorize(
            account, points=1, ttl_ms=5_000, pos=TILL, request_id=f"hold-{account}-{i}",
            fingerprint=fingerprint(f"hold-{account}-{i}"),
        )).tx
        for i in range(holds)
    ]  # fmt: skip


async def _events(ledger: Ledger, keyspace: Keyspace, account: str) -> list[codec.Event]:
    entries: list[tuple[bytes, dict[bytes, bytes]]] = await ledger.redis.xrange(  # type: ignore[assignment]
        keyspace.account(account).events
    )
    decoded = [codec.decode_stream_entry(fields) for _, fields in entries]
    return [e for e in decoded if isinstance(e, codec.Event) and e.account == account]


async def _fcalls(ledger: Ledger) -> int:
    stats: dict[str, Any] = await ledger.redis.info("commandstats")
    return int(stats["cmdstat_fcall"]["calls"])


async def test_holds_expired_in_their_hundreds_are_released_fifty_a_call_before_the_call_runs(
    ledger: Ledger, clock: ManualClock, keyspace: Keyspace
) -> None:
    """One call releasing them all would hold Redis for every other till (tens of ms at 1,000
    holds): each round trip releases at most 50, and the till's call runs once none is left."""
    holds = await _account_with_holds(ledger, clock, "many-holds", 120)
    clock.advance(5_000)
    before = await _fcalls(ledger)
    hold = await ledger.authorize(
        "many-holds", points=7, ttl_ms=5_000, pos=TILL, request_id="after", fingerprint=fingerprint("after")
    )
    assert await _fcalls(ledger) - before == 3  # 50, 50, then 20 and the hold
    assert (hold.available, hold.held) == (993, 7)
    events = await _events(ledger, keyspace, "many-holds")
    assert [e.type for e in events[-121:]] == ["HOLD_EXPIRED"] * 120 + ["HOLD_AUTHORIZED"]
    # Each once; by expiry (here all alike, so in the order Redis keeps them), by id in a call.
    released = [e.ref or 0 for e in events[-121:-1]]
    assert sorted(released) == holds
    pages = [released[:50], released[50:100], released[100:]]
    assert pages == [sorted(page) for page in pages]
    assert [e.available for e in events[-121:-1]] == list(range(881, 1001))  # each gives its point back
    assert await ledger.redis.zcard(keyspace.account("many-holds").open_holds) == 1
    # Only the call itself has an idempotency record: a retry of it is answered as it was.
    again = await ledger.authorize(
        "many-holds", points=7, ttl_ms=5_000, pos=TILL, request_id="after", fingerprint=fingerprint("after")
    )
    assert again == hold


async def test_a_sweep_releases_one_call_s_worth_of_an_account_s_holds_per_tick(
    ledger: Ledger, clock: ManualClock, keyspace: Keyspace
) -> None:
    await _account_with_holds(ledger, clock, "swept-in-pages", 120)
    clock.advance(5_000)
    open_holds = keyspace.account("swept-in-pages").open_holds
    left = []
    for _ in range(3):
        assert await ledger.sweep_expired_holds(16) == 1  # the one account, one call
        left.append(await ledger.redis.zcard(open_holds))
    assert left == [70, 20, 0]
    assert await ledger.sweep_expired_holds(16) == 0
    balance = await ledger.balance("swept-in-pages")
    assert (balance.available, balance.held) == (1_000, 0)
    assert len([e for e in await _events(ledger, keyspace, "swept-in-pages") if e.type == "HOLD_EXPIRED"]) == 120


async def test_a_server_stopped_between_two_calls_of_a_release_leaves_the_rest_to_the_next_call(
    ledger: Ledger, clock: ManualClock, keyspace: Keyspace, ledger_settings: LedgerSettings
) -> None:
    """Each call's release is one atomic function call, so a server killed between two of them
    leaves Redis with some holds released and the rest due: a restarted server's call (a new
    Ledger, nothing carried over) goes on from there and does its own work once."""
    holds = await _account_with_holds(ledger, clock, "cut-short", 120)
    clock.advance(5_000)
    await ledger.sweep_expired_holds(16)  # one call: 50 released, then the server is gone
    restarted = Ledger(ledger.redis, keyspace, clock, ledger_settings)
    hold = await restarted.authorize(
        "cut-short", points=3, ttl_ms=5_000, pos=TILL, request_id="after", fingerprint=fingerprint("after")
    )
    assert (hold.available, hold.held) == (997, 3)
    events = await _events(restarted, keyspace, "cut-short")
    assert sorted(e.ref or 0 for e in events if e.type == "HOLD_EXPIRED") == holds
    assert [e.type for e in events[-71:]] == ["HOLD_EXPIRED"] * 70 + ["HOLD_AUTHORIZED"]
