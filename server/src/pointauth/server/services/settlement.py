"""Settling a period between group companies (domain/settlement.py), for `pointauth settle` and
SettlementService alike: compute a statement from the journal, close it (once, for good), read
closed ones back, and export them as CSV.

A period can be closed only once every event of it is in the journal: it has ended (with a
margin for the clocks of servers and Redis), the write-behind has applied every stream entry
written before that, and none of those is a dead letter. Then, as long as every server's clock is
within CLOCK_MARGIN_MS of Redis's (an event's time is its server's, an entry's id Redis's), no
event of the period can arrive later, so a closed statement is final, and computing it again
gives the same numbers. (One that does is journaled, and the write-behind logs it as an ERROR.)
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import asyncpg
from redis.asyncio import Redis

from pointauth.server.clock import Clock, to_ms, to_time
from pointauth.server.domain import reasons
from pointauth.server.domain.reasons import ErrorReason, Reason
from pointauth.server.domain.settlement import Flow, Period, Statement
from pointauth.server.journal import settlement as stored
from pointauth.server.journal.pg import Connection, connection, is_transient
from pointauth.server.journal.status import stream_backlogs
from pointauth.server.ledger import Keyspace, LedgerRefusal, OpResult

CLOCK_MARGIN_MS = 60_000
"""How long after a period's end it may be closed, and how far past the end stream entries must
be applied: an event's time is its server's clock, a stream entry's id Redis's, and they may
differ by this much."""


def _refusal(code: str, reason: Reason, message: str, **meta: str) -> LedgerRefusal:
    return LedgerRefusal(OpResult(code=code, reason=reasons.name(reason), message=message, meta=meta))


class SettlementService:
    def __init__(self, dsn: str, redis: Redis, keyspace: Keyspace, clock: Clock, zone: str) -> None:
        self.dsn = dsn
        self.redis = redis
        self.keyspace = keyspace
        self.clock = clock
        self.zone = zone

    def period(self, name: str) -> Period:
        """ValueError for a name that is not YYYY-MM."""
        return Period.parse(name, self.zone)

    async def settle(self, period: Period, *, close: bool, actor: str) -> Statement:
        """The period's statement: closed already, the stored one; else computed now, and with
        `close` stored for good (refused unless every event of the period is in the journal)."""
        async with self._journal() as conn:
            closed = await stored.load(conn, period)
            if closed is not None:
                return closed
            if close:
                await self._check_complete(conn, period)
            try:
                async with conn.transaction(isolation="repeatable_read"):
                    statement = await stored.compute(conn, period)
                    if not close:
                        return statement
                    if not statement.ties_out:
                        mismatches = "; ".join(statement.mismatches())
                        raise _refusal(
                            "FAILED_PRECONDITION", ErrorReason.STATEMENT_DOES_NOT_TIE_OUT,
                            f"the point flows of {period.name} do not tie out to the journal: {mismatches}",
                            period=period.name, mismatches=mismatches,
                        )  # fmt: skip
                    statement.closed_at = to_time(self.clock.now_ms())
                    statement.closed_by = actor
                    await stored.store(conn, statement)
                return statement
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name != "settlement_statements_pkey":
                    raise
                # Closed meanwhile by another caller: theirs is the statement.
        return await self.statement(period)

    async def statement(self, period: Period) -> Statement:
        async with self._journal() as conn:
            closed = await stored.load(conn, period)
        if closed is None:
            raise _refusal(
                "NOT_FOUND", ErrorReason.STATEMENT_NOT_FOUND, f"no statement of {period.name} has been closed",
                period=period.name,
            )  # fmt: skip
        return closed

    async def statements(self, company_id: str = "") -> Sequence[Statement]:
        async with self._journal() as conn:
            return await stored.closed_periods(conn, company_id)

    async def _check_complete(self, conn: Connection, period: Period) -> None:
        ends_ms = to_ms(period.ends)
        now_ms = self.clock.now_ms()
        if now_ms < ends_ms + CLOCK_MARGIN_MS:
            raise _refusal(
                "FAILED_PRECONDITION", ErrorReason.PERIOD_NOT_ENDED,
                f"{period.name} ends at {period.ends.isoformat()}; it can be closed from"
                f" {CLOCK_MARGIN_MS // 1000} s after that",
                period=period.name, ends_at=period.ends.isoformat(),
            )  # fmt: skip
        streams = [self.keyspace.events(shard) for shard in range(self.keyspace.shards)]
        behind = [
            s for s in await stream_backlogs(self.redis, streams)
            if s.oldest_unapplied is not None and s.oldest_unapplied.ms < ends_ms + CLOCK_MARGIN_MS
        ]  # fmt: skip
        if behind:
            unapplied = sum(s.backlog for s in behind)
            raise _refusal(
                "UNAVAILABLE", ErrorReason.JOURNAL_BEHIND,
                f"the write-behind has not applied every event of {period.name} yet ({unapplied} entries waiting"
                f" in {len(behind)} streams); retry once `pointauth status` shows it caught up",
                period=period.name, unapplied=str(unapplied), streams=str(len(behind)),
            )  # fmt: skip
        starts_ms = to_ms(period.starts)
        dead = await stored.dead_letters_between(conn, starts_ms - CLOCK_MARGIN_MS, ends_ms + CLOCK_MARGIN_MS)
        if dead:
            raise _refusal(
                "FAILED_PRECONDITION", ErrorReason.JOURNAL_HAS_DEAD_LETTERS,
                f"{dead} stream entries written before the end of {period.name} are dead letters, so the"
                " journal lacks them: resolve them (table dead_letters) first",
                period=period.name, dead_letters=str(dead),
            )  # fmt: skip

    @asynccontextmanager
    async def _journal(self) -> AsyncIterator[Connection]:
        """A connection of its own per call: statements are rare, and no till waits on them."""
        try:
            async with connection(self.dsn) as conn:
                yield conn
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if isinstance(exc, OSError) or is_transient(exc):
                raise _refusal(
                    "UNAVAILABLE", ErrorReason.BACKEND_UNAVAILABLE, "PostgreSQL is unavailable; retry later",
                    backend="PostgreSQL",
                ) from exc  # fmt: skip
            raise


CSV_COLUMNS = (
    "section", "period", "issuer_id", "company_id", "store_id", "payer_id", "payee_id", "yen", "used", "use_refunded",
    "net", "point_value", *(f.value.lower() for f in Flow), "transaction_id", "adjusts_transaction_id",
    "adjusts_period", "flow", "points",
)  # fmt: skip
"""The CSV's columns: one header for every section; the columns a section's lines lack are empty."""


def statement_csv(statement: Statement) -> str:
    """The statement as CSV (RFC 4180, header first): one row per line, its section first."""
    out = io.StringIO()
    w = csv.DictWriter(out, CSV_COLUMNS, lineterminator="\r\n")
    w.writeheader()
    p = statement.period.name
    for i in statement.issuers:
        totals = {f.value.lower(): i.totals[f] for f in Flow}
        w.writerow({"section": "issuer", "period": p, "issuer_id": i.issuer_id, "point_value": str(i.value), **totals})
    for section, lines in (("pair", statement.pairs), ("store", statement.stores)):
        for x in lines:
            w.writerow(
                {"section": section, "period": p, "issuer_id": x.issuer_id, "company_id": x.company_id,
                 "store_id": x.store_id, "used": x.used, "use_refunded": x.use_refunded, "net": x.net}
            )  # fmt: skip
    for pay in statement.payments:
        w.writerow(
            {"section": "payment", "period": p, "payer_id": pay.payer_id, "payee_id": pay.payee_id, "yen": pay.yen}
        )
    for a in statement.adjustments:
        w.writerow(
            {"section": "adjustment", "period": p, "issuer_id": a.issuer_id, "company_id": a.company_id,
             "store_id": a.store_id, "transaction_id": a.transaction_id,
             "adjusts_transaction_id": a.adjusts_transaction_id, "adjusts_period": a.ref_period,
             "flow": a.flow.value, "points": a.points}
        )  # fmt: skip
    return out.getvalue()
