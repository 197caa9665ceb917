"""The hold sweeper's work per tick is bounded: a burst of expiries is spread over ticks."""

from __future__ import annotations

import pytest

from pointauth.server.clock import ManualClock
from pointauth.server.config import LedgerSettings
from pointauth.server.ledger import Keyspace, Ledger, PointOfSaleRef
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
