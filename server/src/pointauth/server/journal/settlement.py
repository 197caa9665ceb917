"""Settlement's PostgreSQL side: a period's point flows summed into a statement, its tie-out
against the journal, and closed statements stored and read back (migration 0007).

A period reads the one or two point_flows partitions (UTC months) its bounds fall in, and the
journal's the same way; nothing else of either table.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import msgspec

from pointauth.server.domain.settlement import (
    DEFAULT_POINT_VALUE,
    MOVES_NO_POINTS,
    TIE_OUTS,
    UNCLASSIFIED,
    USE_FLOWS,
    Adjustment,
    Flow,
    IssuerLine,
    PairLine,
    Payment,
    Period,
    PointValue,
    Statement,
    payments,
)
from pointauth.server.journal.pg import Connection, Record


async def point_values(conn: Connection) -> dict[str, PointValue]:
    rows = await conn.fetch("SELECT company_id, point_value_yen, point_value_points FROM companies")
    return {r["company_id"]: PointValue(r["point_value_yen"], r["point_value_points"]) for r in rows}


async def compute(conn: Connection, period: Period) -> Statement:
    """The period's statement as the journal has it now (run in a REPEATABLE READ transaction for
    one snapshot: the flows and the journal totals they are checked against)."""
    starts, ends = period.starts, period.ends
    values = await point_values(conn)
    issuers: dict[str, IssuerLine] = {}
    pairs: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    stores: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    flows = 0
    rows = await conn.fetch(
        "SELECT flow, issuer_id, company_id, store_id, sum(points)::bigint AS points, count(*) AS n FROM point_flows"
        " WHERE event_time >= $1 AND event_time < $2 GROUP BY flow, issuer_id, company_id, store_id",
        starts,
        ends,
    )
    for r in rows:
        flow, issuer, points = Flow(r["flow"]), r["issuer_id"], r["points"]
        flows += r["n"]
        line = issuers.setdefault(issuer, IssuerLine(issuer, values.get(issuer, DEFAULT_POINT_VALUE)))
        line.totals[flow] += points
        if flow in USE_FLOWS:
            column = USE_FLOWS.index(flow)
            company, store = r["company_id"] or "", r["store_id"] or ""
            pairs[(issuer, company)][column] += points
            stores[(issuer, company, store)][column] += points
    pair_lines = [PairLine(i, c, used, back) for (i, c), (used, back) in sorted(pairs.items())]
    adjustments = [
        _adjustment(r, Period.of(r["ref_time"], period.zone).name)
        for r in await conn.fetch(
            "SELECT account_id, seq, flow, issuer_id, company_id, store_id, points, ref_account, ref_seq, ref_time"
            " FROM point_flows WHERE event_time >= $1 AND event_time < $2 AND ref_time < $1"
            " ORDER BY account_id, seq, flow, issuer_id",
            starts,
            ends,
        )
    ]
    by_type = await conn.fetch(
        "SELECT type, sum(points)::bigint AS points, count(*) AS n FROM journal"
        " WHERE event_time >= $1 AND event_time < $2 GROUP BY type",
        starts,
        ends,
    )
    journal = {r["type"]: r["points"] for r in by_type}
    known = {t for check in TIE_OUTS for t in check.event_types} | set(MOVES_NO_POINTS)
    unclassified = sum(r["n"] for r in by_type if r["type"] not in known)
    tie_out = {
        check.name: (
            sum(line.totals[f] for line in issuers.values() for f in check.flows),
            sum(journal.get(t, 0) for t in check.event_types),
        )
        for check in TIE_OUTS
    }
    tie_out[UNCLASSIFIED] = (0, unclassified)
    return Statement(
        period=period,
        issuers=[issuers[i] for i in sorted(issuers)],
        pairs=pair_lines,
        stores=[PairLine(i, c, used, back, store_id=s) for (i, c, s), (used, back) in sorted(stores.items())],
        payments=payments(pair_lines, values),
        adjustments=adjustments,
        tie_out=tie_out,
        flows=flows,
    )


def _adjustment(r: Record, ref_period: str) -> Adjustment:
    """A point_flows row of a refund (or a settlement_adjustments row) as an adjustment."""
    return Adjustment(
        r["account_id"], r["seq"], Flow(r["flow"]), r["issuer_id"], r["company_id"] or "", r["store_id"] or "",
        r["points"], r["ref_account"], r["ref_seq"], ref_period,
    )  # fmt: skip


async def dead_letters_between(conn: Connection, starts_ms: int, ends_ms: int) -> int:
    """Dead letters whose entry (its id is Redis's time in ms) was written in [starts_ms, ends_ms):
    those of an earlier period are that period's concern."""
    count: int = await conn.fetchval(
        "SELECT count(*) FROM dead_letters WHERE split_part(entry_id, '-', 1)::bigint >= $1"
        " AND split_part(entry_id, '-', 1)::bigint < $2",
        starts_ms,
        ends_ms,
    )
    return count


async def store(conn: Connection, statement: Statement) -> None:
    """Writes a closed statement (in the caller's transaction). A period closed already is a
    unique violation: the caller reads the stored one instead."""
    p = statement.period
    await conn.execute(
        "INSERT INTO settlement_statements (period, time_zone, starts_at, ends_at, closed_at, closed_by, flows,"
        " tie_out) VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb)",
        p.name, p.zone, p.starts, p.ends, statement.closed_at, statement.closed_by, statement.flows,
        msgspec.json.encode(statement.tie_out).decode(),
    )  # fmt: skip
    await conn.executemany(
        "INSERT INTO settlement_issuers (period, issuer_id, point_value_yen, point_value_points, issued,"
        " issue_refunded, used, use_refunded, expired, forfeited, merged_out, merged_in)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        [(p.name, i.issuer_id, i.value.yen, i.value.points, *(i.totals[f] for f in Flow)) for i in statement.issuers],
    )
    await conn.copy_records_to_table(
        "settlement_pairs",
        records=[(p.name, x.issuer_id, x.company_id, x.used, x.use_refunded) for x in statement.pairs],
        columns=["period", "issuer_id", "company_id", "used", "use_refunded"],
    )
    await conn.copy_records_to_table(
        "settlement_stores",
        records=[(p.name, x.issuer_id, x.company_id, x.store_id, x.used, x.use_refunded) for x in statement.stores],
        columns=["period", "issuer_id", "company_id", "store_id", "used", "use_refunded"],
    )
    await conn.executemany(
        "INSERT INTO settlement_payments (period, payer_id, payee_id, yen) VALUES ($1, $2, $3, $4)",
        [(p.name, x.payer_id, x.payee_id, x.yen) for x in statement.payments],
    )
    await conn.copy_records_to_table(
        "settlement_adjustments",
        records=[
            (
                p.name,
                a.account_id,
                a.seq,
                a.flow.value,
                a.issuer_id,
                a.company_id,
                a.store_id,
                a.points,
                a.ref_account,
                a.ref_seq,
                a.ref_period,
            )
            for a in statement.adjustments
        ],
        columns=list(_ADJUSTMENT_COLUMNS),
    )


_ADJUSTMENT_COLUMNS = (
    "period", "account_id", "seq", "flow", "issuer_id", "company_id", "store_id", "points", "ref_account", "ref_seq",
    "ref_period",
)  # fmt: skip


async def load(conn: Connection, period: Period) -> Statement | None:
    """A closed statement as stored; None if the period has not been closed."""
    head = await conn.fetchrow(
        "SELECT time_zone, closed_at, closed_by, flows, tie_out::text AS tie_out FROM settlement_statements"
        " WHERE period = $1",
        period.name,
    )
    if head is None:
        return None
    stored_period = Period(period.name, head["time_zone"])
    issuers = []
    for r in await conn.fetch("SELECT * FROM settlement_issuers WHERE period = $1 ORDER BY issuer_id", period.name):
        line = IssuerLine(r["issuer_id"], PointValue(r["point_value_yen"], r["point_value_points"]))
        for f in Flow:
            line.totals[f] = r[f.value.lower()]
        issuers.append(line)
    pairs = [
        PairLine(r["issuer_id"], r["company_id"], r["used"], r["use_refunded"])
        for r in await conn.fetch(
            "SELECT * FROM settlement_pairs WHERE period = $1 ORDER BY issuer_id, company_id", period.name
        )
    ]
    stores = [
        PairLine(r["issuer_id"], r["company_id"], r["used"], r["use_refunded"], store_id=r["store_id"])
        for r in await conn.fetch(
            "SELECT * FROM settlement_stores WHERE period = $1 ORDER BY issuer_id, company_id, store_id", period.name
        )
    ]
    paid = [
        Payment(r["payer_id"], r["payee_id"], r["yen"])
        for r in await conn.fetch(
            "SELECT * FROM settlement_payments WHERE period = $1 ORDER BY payer_id, payee_id", period.name
        )
    ]
    adjustments = [
        _adjustment(r, r["ref_period"])
        for r in await conn.fetch(
            "SELECT * FROM settlement_adjustments WHERE period = $1 ORDER BY account_id, seq, flow, issuer_id",
            period.name,
        )
    ]
    # In TIE_OUTS' order, as computed (jsonb keeps its keys in an order of its own).
    checked = msgspec.json.decode(head["tie_out"], type=dict[str, tuple[int, int]])
    tie_out = {name: checked[name] for name in (*(check.name for check in TIE_OUTS), UNCLASSIFIED) if name in checked}
    return Statement(
        period=stored_period,
        issuers=issuers,
        pairs=pairs,
        stores=stores,
        payments=paid,
        adjustments=adjustments,
        tie_out=tie_out,
        flows=head["flows"],
        closed_at=head["closed_at"],
        closed_by=head["closed_by"],
    )


async def closed_periods(conn: Connection, company_id: str = "") -> Sequence[Statement]:
    """The closed statements' headers (no lines), newest first; with a company, those in which
    it has an issuer or pair line."""
    rows = await conn.fetch(
        "SELECT period, time_zone, closed_at, closed_by, flows FROM settlement_statements s"
        " WHERE $1 = '' OR EXISTS (SELECT 1 FROM settlement_issuers i WHERE i.period = s.period AND i.issuer_id = $1)"
        " OR EXISTS (SELECT 1 FROM settlement_pairs p WHERE p.period = s.period AND p.company_id = $1)"
        " ORDER BY period DESC",
        company_id,
    )
    return [
        Statement(
            period=Period(r["period"], r["time_zone"]),
            issuers=[],
            pairs=[],
            stores=[],
            payments=[],
            adjustments=[],
            tie_out={},
            flows=r["flows"],
            closed_at=r["closed_at"],
            closed_by=r["closed_by"],
        )
        for r in rows
    ]
