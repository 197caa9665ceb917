"""Redis time per ledger call as an account grows (`python -m loadtest.account_size`).

Issue #13 item 5: a call's Redis work must not grow with the account. This builds, on an
embedded stack, accounts with 1, 100 and 1,000 lots (distinct expiries, so no two can merge)
and one with 1,000 open holds, then measures each call's time inside Redis: `INFO
commandstats`'s usec for FCALL, after a CONFIG RESETSTAT, so that neither the network nor the
client counts. AuthorizeHold is followed by a VoidHold (not measured) to keep the account's
shape; GetBalance changes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import uuid
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from pointauth.server.clock import ManualClock
from pointauth.server.config import LedgerSettings
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.ledger import Keyspace, Ledger, PointOfSaleRef

POS = PointOfSaleRef("acme", "store-1", "till-1", 1)
NOW_MS = 1_795_000_000_000
DAY_MS = 86_400_000
HOUR_MS = 3_600_000


def _rid() -> str:
    return str(uuid.uuid4())


async def _fcall_usec(redis: Redis) -> tuple[int, int]:
    """(calls, usec) of FCALL since the last CONFIG RESETSTAT."""
    stats: dict[str, Any] = await redis.info("commandstats")
    entry = stats.get("cmdstat_fcall", {"calls": 0, "usec": 0})
    return int(entry["calls"]), int(entry["usec"])


async def _build(ledger: Ledger, account: str, lots: int, holds: int) -> None:
    await ledger.create_account(account, f"card-{account}", _rid(), "0" * 32)
    for i in range(lots):
        # A day apart: every lot its own expiry, so none merges with another.
        await ledger.earn(account, points=1_000_000, expire_ms=NOW_MS + (i + 30) * DAY_MS, kind="R", pos=POS,
                          request_id=_rid(), fingerprint="g" * 32, grant=True)  # fmt: skip
    for _ in range(holds):
        await ledger.authorize(account, points=1, ttl_ms=7 * 24 * HOUR_MS, pos=POS, request_id=_rid(),
                               fingerprint="h" * 32)  # fmt: skip


async def _authorize_usec(redis: Redis, ledger: Ledger, account: str, calls: int) -> float:
    total = 0
    for _ in range(calls):
        await redis.config_resetstat()
        hold = await ledger.authorize(account, points=1, ttl_ms=15 * 60_000, pos=POS, request_id=_rid(),
                                      fingerprint="h" * 32)  # fmt: skip
        n, usec = await _fcall_usec(redis)
        assert n == 1, n
        total += usec
        await ledger.void(account, hold.tx, request_id=_rid(), fingerprint="v" * 32)
    return total / calls


async def _balance_usec(redis: Redis, ledger: Ledger, account: str, calls: int) -> float:
    await redis.config_resetstat()
    for _ in range(calls):
        await ledger.balance(account)
    n, usec = await _fcall_usec(redis)
    assert n == calls, n
    return usec / calls


SHAPES = [("1 lot", 1, 0), ("100 lots", 100, 0), ("1,000 lots", 1_000, 0), ("1,000 open holds", 1, 1_000)]


async def measure(redis_url: str, calls: int) -> list[tuple[str, float, float]]:
    redis = Redis.from_url(redis_url)
    try:
        await redis.flushall()
        ledger = Ledger(redis, Keyspace(16), ManualClock(NOW_MS), LedgerSettings(shards=16))
        rows = []
        for i, (name, lots, holds) in enumerate(SHAPES):
            account = f"size-{i}"
            await _build(ledger, account, lots, holds)
            # One call first: loads the library and resolves nothing else's lazy costs.
            await ledger.balance(account)
            rows.append(
                (
                    name,
                    await _authorize_usec(redis, ledger, account, calls),
                    await _balance_usec(redis, ledger, account, calls),
                )
            )
        return rows
    finally:
        await redis.aclose()


def table(rows: list[tuple[str, float, float]]) -> str:
    base_auth, base_balance = rows[0][1], rows[0][2]
    lines = [f"{'account':<18} {'AuthorizeHold µs':>17} {'× 1 lot':>8} {'GetBalance µs':>14} {'× 1 lot':>8}"]
    for name, auth, balance in rows:
        lines.append(
            f"{name:<18} {auth:>17,.1f} {auth / base_auth:>8.2f} {balance:>14,.1f} {balance / base_balance:>8.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=200, help="measured calls per account and RPC")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pointauth-account-size-") as tmp, EmbeddedStack(Path(tmp)) as stack:
        rows = asyncio.run(measure(stack.redis.url, args.calls))
    print("Redis time per FCALL (INFO commandstats usec_per_call, after CONFIG RESETSTAT)")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
