"""A month of journal for a large group, then `pointauth settle` on it, timed.

    uv run python -m loadtest.settlement_month --accounts 10000000 --events 20000000 --data-dir /tmp/pa-month

Settlement reads PostgreSQL only (the point_flows and journal partitions of its period), so the
month is written there directly, as the write-behind would write it: each synthetic event goes
through the writer's own row functions (journal_row, point_flows, flow_row) and COPY, without
Redis or the ledger script. The events: earns and grants across the group's stores, redemptions
and captures spending lots of one or two issuers (a capture after its hold), refunds of both
(some of them of the previous month's transactions: late refunds), and expiries. The month is
the one before the current one, so it has ended and can be closed.

It prints the generation time, the rows written, the time `settle` takes to compute the month,
to close it and to read it back, and which partitions PostgreSQL's plan reads.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pointauth.server.clock import to_ms
from pointauth.server.config import LedgerSettings, PostgresSettings, RedisSettings, Settings
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.domain.settlement import Period
from pointauth.server.journal.events import EntryId, StreamEntry
from pointauth.server.journal.flows import FLOW_COLUMNS, point_flows
from pointauth.server.journal.migrate import create_partitions, migrate
from pointauth.server.journal.pg import Connection, connection
from pointauth.server.journal.writer import JOURNAL_COLUMNS, Delivered, flow_row, journal_row
from pointauth.server.ledger.codec import AllocEntry, Event, LotEntry, PointOfSaleRef, TransactionRecord
from pointauth.server.ops.settle import settle_command

ZONE = "Asia/Tokyo"
BATCH = 50_000


def previous_month(now: datetime) -> Period:
    return Period.of(Period.of(now, ZONE).starts - timedelta(days=1), ZONE)


class Month:
    """Synthetic events of one month, per account in sequence, across `companies` companies with
    `stores` stores in all."""

    def __init__(self, period: Period, accounts: int, events: int, companies: int, stores: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.start_ms, self.end_ms = to_ms(period.starts), to_ms(period.ends)
        self.accounts, self.events = accounts, events
        self.companies = [f"co-{c:02d}" for c in range(companies)]
        self.stores = [(self.companies[s % companies], f"st-{s:05d}") for s in range(stores)]

    def _pos(self) -> PointOfSaleRef:
        company, store = self.rng.choice(self.stores)
        return PointOfSaleRef(company, store, "t1", 1)

    def _lot(self, points: int, issuer: str) -> LotEntry:
        return LotEntry(self.rng.randrange(1, 60), points, self.end_ms + 300 * 86_400_000, "R", issuer)

    def __iter__(self) -> Iterator[tuple[Event, TransactionRecord | None]]:
        """(event, the transaction a refund refunds) in account order, each account's in time order."""
        rng, per_account = self.rng, self.events / self.accounts
        span = self.end_ms - self.start_ms
        produced = 0
        for a in range(self.accounts):
            if produced >= self.events:
                return
            n = int(per_account) + (1 if rng.random() < per_account % 1 else 0)
            account = f"m{a:08d}"
            times = sorted(self.start_ms + rng.randrange(span) for _ in range(n))
            seq = 1000
            for t in times:
                seq += 1
                produced += 1
                yield from self._event(account, seq, t)
                if produced >= self.events:
                    return

    def _event(self, account: str, seq: int, t: int) -> Iterator[tuple[Event, TransactionRecord | None]]:
        rng, pos = self.rng, self._pos()

        def ev(type_: str, pts: int, lots: list[LotEntry], **more: Any) -> Event:
            return Event(
                type=type_, seq=seq, account=account, time=t, pts=pts, lots=lots, available=500, held=0, **more
            )  # fmt: skip

        at = {"pos": pos, "rid": f"r{seq}"}
        roll = rng.random()
        if roll < 0.45:
            pts = rng.randrange(1, 300)
            yield ev("EARN", pts, [self._lot(pts, pos.company_id)], amount=pts * 100, ptime=t, **at), None
        elif roll < 0.55:
            pts = rng.randrange(10, 500)
            yield ev("GRANT", pts, [self._lot(pts, pos.company_id)], **at), None
        elif roll < 0.70:
            spent = self._spend()
            yield ev("REDEEMED", -sum(x.points for x in spent), spent, alloc=self._alloc(spent), **at), None
        elif roll < 0.88:
            spent = self._spend()
            used = -sum(x.points for x in spent)
            yield (
                ev("HOLD_CAPTURED", used, [], spent=spent, ref=seq - 1, released=0, alloc=self._alloc(spent), **at),
                None,
            )
        elif roll < 0.97:
            # A refund of a use (or, one in three, of an earn); one in five of the previous month.
            before = rng.randrange(1, 40 * 86_400_000) if rng.random() < 0.2 else rng.randrange(1, 3_600_000)
            original = TransactionRecord(
                type="CAPTURE" if rng.random() < 0.66 else "EARN", time=t - before, pos=self._pos(), pts=0,
                refunded=0, available=0, held=0, lots=[],
            )  # fmt: skip
            pts = rng.randrange(1, 200)
            lots = [self._lot(-pts if original.type == "EARN" else pts, rng.choice(self.companies))]
            yield ev("REFUNDED", pts, lots, ref=seq - 5, refunded=pts, **at), original
        else:
            pts = rng.randrange(1, 100)
            yield ev("LOTS_EXPIRED", pts, [self._lot(-pts, rng.choice(self.companies))]), None

    def _spend(self) -> list[LotEntry]:
        issuers = self.rng.sample(self.companies, k=self.rng.choice((1, 1, 2)))
        return [self._lot(-self.rng.randrange(1, 300), issuer) for issuer in issuers]

    @staticmethod
    def _alloc(spent: list[LotEntry]) -> list[AllocEntry]:
        return [AllocEntry(x.lot_id, -x.points, x.expire_ms, x.kind, x.issuer_id) for x in spent]


async def write_month(dsn: str, month: Month) -> tuple[int, int]:
    """COPYs the month's journal rows and point flows, BATCH events at a time; returns the counts."""
    entry = EntryId(0, 0)
    journal, flows = 0, 0
    async with connection(dsn) as conn:
        batch_j: list[tuple[object, ...]] = []
        batch_f: list[tuple[object, ...]] = []

        async def flush(conn: Connection) -> None:
            await conn.copy_records_to_table("journal", records=batch_j, columns=JOURNAL_COLUMNS)
            await conn.copy_records_to_table("point_flows", records=batch_f, columns=FLOW_COLUMNS)
            batch_j.clear()
            batch_f.clear()

        for event, original in month:
            entry = entry.next()
            batch_j.append(journal_row(Delivered(StreamEntry("gen", 0, entry, {}), event)))
            rows = [flow_row(f) for f in point_flows(event, original)]
            batch_f.extend(rows)
            journal += 1
            flows += len(rows)
            if len(batch_j) >= BATCH:
                await flush(conn)
        await flush(conn)
        await conn.execute("ANALYZE journal")
        await conn.execute("ANALYZE point_flows")
    return journal, flows


async def plan(dsn: str, period: Period) -> str:
    async with connection(dsn) as conn:
        rows = await conn.fetch(
            "EXPLAIN SELECT flow, issuer_id, company_id, store_id, sum(points) FROM point_flows"
            " WHERE event_time >= $1 AND event_time < $2 GROUP BY 1, 2, 3, 4",
            period.starts,
            period.ends,
        )
    return "\n".join(f"    {r[0]}" for r in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.settlement_month", description=__doc__.split("\n\n")[0])
    p.add_argument("--accounts", type=int, default=100_000)
    p.add_argument("--events", type=int, default=200_000, help="events in the month, across all accounts")
    p.add_argument("--companies", type=int, default=8)
    p.add_argument("--stores", type=int, default=2_500)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--data-dir", type=Path, help="keep the stack's data here (default: a temporary directory)")
    args = p.parse_args(argv)

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="pointauth-month-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o755)
    try:
        with EmbeddedStack(data_dir) as stack:
            settings = Settings(
                redis=RedisSettings(url=stack.redis.url),
                postgres=PostgresSettings(dsn=stack.postgres.dsn),
                ledger=LedgerSettings(shards=1024),
            )
            period = previous_month(datetime.now(UTC))
            month = Month(period, args.accounts, args.events, args.companies, args.stores, args.seed)

            async def prepare() -> tuple[int, int]:
                await migrate(stack.postgres.dsn)
                async with connection(stack.postgres.dsn) as conn:
                    await create_partitions(conn, period.starts, 2)
                return await write_month(stack.postgres.dsn, month)

            began = time.perf_counter()
            journal, flows = asyncio.run(prepare())
            print(f"month {period.name}: {journal:,} events, {flows:,} point flows of {args.accounts:,} accounts,"
                  f" {len(month.companies)} companies, {len(month.stores):,} stores, written in"
                  f" {time.perf_counter() - began:,.0f} s")  # fmt: skip
            print("plan of the flows' sum (the partitions it reads):")
            print(asyncio.run(plan(stack.postgres.dsn, period)))
            for what, close in (("compute", False), ("close", True), ("read closed", True)):
                began = time.perf_counter()
                with open("/dev/null", "w") as sink:
                    code = settle_command(settings, period.name, close=close, out=sink)
                print(f"settle {what}: {time.perf_counter() - began:,.1f} s (exit {code})")
    finally:
        if args.data_dir is None:
            shutil.rmtree(data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
