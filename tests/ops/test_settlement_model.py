"""Statements always tie out (hypothesis): random sequences of earns, redemptions, holds with
partial captures and voids, partial refunds, expiries, merges and closings across three issuing
companies, journaled by the write-behind. After each sequence, every period's statement ties out
to the journal, and what the statements say each issuer's points did, summed over every period,
equals the points of that issuer members hold now (in lots and on hold), as PostgreSQL has them.

The state accumulates across examples (each opens accounts of its own; time only moves on), so
later examples check statements of many sequences at once."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from pointauth.server.clock import ManualClock
from pointauth.server.config import LedgerSettings
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.domain.earning import LotKindCode
from pointauth.server.domain.settlement import Flow, Period
from pointauth.server.journal import settlement
from pointauth.server.journal.pg import connection
from pointauth.server.ledger import Keyspace, Ledger, LedgerRefusal, OpResult, PointOfSaleRef
from pointauth.server.ledger.codec import AllocEntry
from tests.conftest import DAY_MS, START_MS
from tests.journal.support import running_worker, wait_until_applied

COMPANIES = ("east", "west", "cafe")
ZONE = "Asia/Tokyo"
# Journal partitions exist for the months migrate made ahead: time stays within three months.
LAST_MS = START_MS + 80 * DAY_MS

operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("earn"), st.integers(0, 2), st.integers(1, 500), st.sampled_from(COMPANIES), st.integers(1, 40)
        ),
        st.tuples(st.just("redeem"), st.integers(0, 2), st.integers(1, 400), st.sampled_from(COMPANIES)),
        st.tuples(
            st.just("hold"), st.integers(0, 2), st.integers(1, 400), st.sampled_from(COMPANIES), st.integers(0, 2)
        ),
        st.tuples(st.just("refund"), st.integers(0, 50), st.integers(0, 100)),
        st.tuples(st.just("days"), st.integers(1, 6)),
        st.tuples(st.just("merge"), st.integers(0, 2), st.integers(0, 2)),
        st.tuples(st.just("close"), st.integers(0, 2)),
    ),
    min_size=10,
    max_size=40,
)


@pytest.fixture
async def journaled(stack: EmbeddedStack, redis: Redis, dsn: str, keyspace: Keyspace) -> AsyncIterator[str]:
    async with running_worker(stack.redis.url, dsn, keyspace):
        yield dsn


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
async def test_statements_tie_out_and_account_for_every_issuers_points(
    ops: list[tuple[Any, ...]], redis: Redis, keyspace: Keyspace, journaled: str
) -> None:
    dsn = journaled
    # One clock and counter for all examples: read back from Redis, where the last example left them.
    now = int(await redis.get("test:clock") or START_MS)
    example = int(await redis.incr("test:example"))
    clock = ManualClock(now)
    ledger = Ledger(redis, keyspace, clock, LedgerSettings(shards=keyspace.shards))
    ids = itertools.count(1)

    def rid() -> dict[str, Any]:
        n = next(ids)
        return {"request_id": f"x{example}-{n}", "fingerprint": f"{example:016d}{n:016d}"}

    accounts = [f"x{example}-{i}" for i in range(3)]
    for i, account in enumerate(accounts):
        await ledger.create_account(account, f"CARD-X{example}-{i}", **rid())
    refundable: list[tuple[str, int]] = []

    async def attempt(call: Any) -> OpResult | None:
        try:
            result: OpResult = await call
        except LedgerRefusal:
            return None
        return result

    for op in ops:
        kind = op[0]
        if kind == "earn":
            _, i, points, issuer, days = op
            pos = PointOfSaleRef(issuer, f"{issuer}-1", "t", 1)
            kind_code: LotKindCode = "L" if days < 10 else "R"
            done = await attempt(
                ledger.earn(
                    accounts[i],
                    points=points,
                    expire_ms=clock.now_ms() + days * DAY_MS,
                    kind=kind_code,
                    pos=pos,
                    grant=days % 2 == 0,
                    **rid(),
                )
            )
            if done:
                refundable.append((accounts[i], done.tx))
        elif kind == "redeem":
            _, i, points, company = op
            done = await attempt(
                ledger.redeem(accounts[i], points=points, pos=PointOfSaleRef(company, f"{company}-2", "t", 1), **rid())
            )
            if done:
                refundable.append((accounts[i], done.tx))
        elif kind == "hold":
            _, i, points, company, how = op
            pos = PointOfSaleRef(company, f"{company}-3", "t", 1)
            hold = await attempt(ledger.authorize(accounts[i], points=points, ttl_ms=DAY_MS, pos=pos, **rid()))
            if hold and how == 0:
                await attempt(ledger.void(accounts[i], hold.tx, **rid()))
            elif hold and how == 1:
                captured = await attempt(ledger.capture(accounts[i], hold.tx, points=max(points // 2, 1), **rid()))
                if captured:
                    refundable.append((accounts[i], captured.tx))
            # how == 2: left open (it may expire when the days move on)
        elif kind == "refund" and refundable:
            _, pick, points = op
            account, seq = refundable[pick % len(refundable)]
            await attempt(
                ledger.refund_following(account, seq, points=points or None, pos=None, **rid())
            )  # fmt: skip
        elif kind == "days" and clock.now_ms() + op[1] * DAY_MS < LAST_MS:
            clock.advance(op[1] * DAY_MS)
            for account in accounts:
                await attempt(ledger.balance(account))  # expires what is due
        elif kind == "merge" and op[1] != op[2]:
            await attempt(ledger.merge(accounts[op[1]], accounts[op[2]], actor="desk", why="model", **rid()))
        elif kind == "close":
            await attempt(ledger.close(accounts[op[1]], **rid()))
    await redis.set("test:clock", clock.now_ms())

    every = [a.decode() if isinstance(a, bytes) else a for a in await redis.smembers("test:accounts")] + accounts
    await redis.sadd("test:accounts", *accounts)
    await wait_until_applied(redis, dsn, keyspace, every)

    async with connection(dsn) as conn:
        months = await conn.fetch(
            "SELECT DISTINCT to_char(event_time AT TIME ZONE $1, 'YYYY-MM') AS period FROM point_flows", ZONE
        )
        outstanding: dict[str, int] = defaultdict(int)
        for row in months:
            statement = await settlement.compute(conn, Period.parse(row["period"], ZONE))
            assert statement.ties_out, statement.mismatches()
            for line in statement.issuers:
                outstanding[line.issuer_id] += line.outstanding_change
            # Every point used is one issuer's, and is in exactly one pair of it.
            for line in statement.issuers:
                pairs = [p for p in statement.pairs if p.issuer_id == line.issuer_id]
                assert sum(p.used for p in pairs) == line.totals[Flow.USED]
                assert sum(p.use_refunded for p in pairs) == line.totals[Flow.USE_REFUNDED]
        held: dict[str, int] = defaultdict(int)
        for r in await conn.fetch("SELECT issuer_id, sum(points)::bigint AS points FROM lots GROUP BY issuer_id"):
            held[r["issuer_id"]] += r["points"]
        for r in await conn.fetch(
            "SELECT alloc::text AS alloc FROM transactions WHERE type = 'HOLD' AND state = 'HELD'"
        ):
            for entry in msgspec.json.decode(r["alloc"], type=list[AllocEntry]):
                held[entry.issuer_id] += entry.points
    assert {k: v for k, v in outstanding.items() if v} == {k: v for k, v in held.items() if v}
