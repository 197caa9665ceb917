"""`pointauth settle`: a period's statement between group companies, printed or as CSV; with
--close, stored for good (services/settlement.py says when a period may be closed)."""

from __future__ import annotations

import asyncio
import getpass
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from redis.asyncio import Redis

from pointauth.server.clock import Clock, SystemClock
from pointauth.server.config import Settings
from pointauth.server.domain.settlement import Flow, Statement
from pointauth.server.ledger import Keyspace, LedgerRefusal
from pointauth.server.services.audit import Auditor
from pointauth.server.services.settlement import SettlementService, statement_csv


def render(s: Statement, *, stores: bool) -> str:
    p = s.period
    state = (
        f"closed {s.closed_at.isoformat()} by {s.closed_by}"
        if s.closed_at
        else "NOT CLOSED: computed now, may still change"
    )
    lines = [
        f"Settlement {p.name} ({p.zone}: {p.starts.isoformat()} to {p.ends.isoformat()}), {state}",
        f"{s.flows} point flows; tie-out to the journal: "
        + ("every total equal" if s.ties_out else "MISMATCH: " + "; ".join(s.mismatches())),
        "",
        "Per issuer (points):",
        f"  {'issuer':<16}{'value':>20}" + "".join(f"{f.value.lower():>15}" for f in Flow) + f"{'outstanding':>13}",
    ]
    for i in s.issuers:
        lines.append(
            f"  {i.issuer_id:<16}{i.value!s:>20}"
            + "".join(f"{i.totals[f]:>15,}" for f in Flow)
            + f"{i.outstanding_change:>+13,}"
        )
    lines += ["", "Points used, by issuer (pays) and using company (is paid):"]
    lines += [f"  {'issuer':<16}{'company':<16}{'store':<16}{'used':>12}{'refunded':>12}{'net':>12}"]
    for x in s.pairs + (s.stores if stores else []):
        lines.append(
            f"  {x.issuer_id:<16}{x.company_id:<16}{x.store_id or '(all)':<16}"
            f"{x.used:>12,}{x.use_refunded:>12,}{x.net:>12,}"
        )
    lines += ["", "Payments (netted per pair, yen rounded half up once):"]
    lines += [f"  {x.payer_id} pays {x.payee_id}: {x.yen:,} yen" for x in s.payments] or ["  none"]
    if s.adjustments:
        lines += ["", "Refunds adjusting earlier periods:"]
        lines += [
            f"  {a.transaction_id} adjusts {a.adjusts_transaction_id} ({a.ref_period}): {a.flow.value} {a.points:,}"
            f" points of {a.issuer_id} at {a.company_id}/{a.store_id}"
            for a in s.adjustments
        ]
    return "\n".join(lines) + "\n"


async def _settle(
    settings: Settings, period_name: str, *, close: bool, listing: bool, company: str, clock: Clock
) -> Statement | Sequence[Statement]:
    redis = Redis.from_url(settings.redis.url)
    service = SettlementService(
        settings.postgres.dsn, redis, Keyspace(settings.ledger.shards), clock, settings.earn.timezone
    )
    try:
        if listing:
            return await service.statements(company)
        period = service.period(period_name)
        if not close:
            return await service.settle(period, close=False, actor=f"cli:{getpass.getuser()}")
        # Closing is an operator action: the audit trail has it, refused or not.
        auditor, request = Auditor(redis, service.keyspace, clock), json.dumps({"period": period.name, "close": True})
        try:
            statement = await service.settle(period, close=True, actor=f"cli:{getpass.getuser()}")
        except LedgerRefusal as refusal:
            await auditor.command("settle", request, refusal.result.code, refusal.result.reason)
            raise
        await auditor.command("settle", request)
        return statement
    finally:
        await redis.aclose()


def settle_command(
    settings: Settings,
    period: str,
    *,
    close: bool = False,
    listing: bool = False,
    company: str = "",
    stores: bool = False,
    csv_path: str | None = None,
    clock: Clock | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Exit 0; 1 when refused (the reason on stderr); 2 for a period that is not YYYY-MM."""
    try:
        found = asyncio.run(
            _settle(settings, period, close=close, listing=listing, company=company, clock=clock or SystemClock())
        )
    except ValueError as exc:
        print(f"pointauth settle: {exc}", file=sys.stderr)
        return 2
    except LedgerRefusal as refusal:
        print(f"pointauth settle: refused ({refusal.result.reason}): {refusal.result.message}", file=sys.stderr)
        return 1
    if not isinstance(found, Statement):
        for s in found:
            closed = s.closed_at.isoformat() if s.closed_at else ""
            print(f"{s.period.name}  closed {closed} by {s.closed_by}  ({s.flows:,} flows)", file=out)
        return 0
    statement = found.for_company(company) if company else found
    if csv_path is None:
        out.write(render(statement, stores=stores))
    elif csv_path == "-":
        out.write(statement_csv(statement))
    else:
        Path(csv_path).write_text(statement_csv(statement))
        print(f"wrote {csv_path}", file=out)
    return 0
