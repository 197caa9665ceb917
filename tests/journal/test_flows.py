"""An event's point flows, copied from its lot effects per lot issuer (journal/flows.py)."""

from __future__ import annotations

import uuid

import pytest

from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.journal.flows import point_flows
from pointauth.server.journal.migrate import available_migrations
from pointauth.server.journal.pg import Connection, connection
from pointauth.server.ledger.codec import Event, LotEntry, PointOfSaleRef, TransactionRecord

T = 1_795_000_000_000
AT_WEST = PointOfSaleRef("west", "w1", "t", 1)
AT_EAST = PointOfSaleRef("east", "e1", "t", 1)


def lot(lot_id: int, points: int, issuer: str) -> LotEntry:
    return LotEntry(lot_id, points, T + 10**9, "R", issuer)


def event(type_: str, lots: list[LotEntry], **more: object) -> Event:
    return Event(type=type_, seq=7, account="m1", time=T, pts=0, lots=lots, available=0, held=0, **more)  # type: ignore[arg-type]


def flows(e: Event, original: TransactionRecord | None = None) -> list[tuple[object, ...]]:
    return [
        (f.flow, f.issuer_id, f.company_id, f.store_id, f.points, f.ref_seq, f.ref_time_ms)
        for f in point_flows(e, original)
    ]


def record(type_: str, pos: PointOfSaleRef, time: int) -> TransactionRecord:
    return TransactionRecord(type=type_, time=time, pos=pos, pts=0, refunded=0, available=0, held=0, lots=[])  # type: ignore[arg-type]


@pytest.mark.parametrize(("type_", "flow"), [("EARN", "ISSUED"), ("GRANT", "ISSUED"), ("VISIT", "ISSUED")])
def test_points_added_by_an_earn_are_issued_by_each_lots_issuer(type_: str, flow: str) -> None:
    e = event(type_, [lot(1, 30, "west"), lot(2, 20, "west")], pos=AT_WEST)
    assert flows(e) == [(flow, "west", "west", "w1", 50, None, None)]


def test_a_redemption_uses_points_of_every_issuer_whose_lot_it_took_from() -> None:
    e = event("REDEEMED", [lot(1, -30, "east"), lot(2, -20, "west"), lot(3, -5, "east")], pos=AT_WEST)
    assert flows(e) == [("USED", "east", "west", "w1", 35, None, None), ("USED", "west", "west", "w1", 20, None, None)]


def test_a_capture_uses_what_it_spent_not_what_it_released() -> None:
    e = event("HOLD_CAPTURED", [lot(2, 50, "west")], spent=[lot(1, -40, "east")], pos=AT_WEST, ref=3)
    assert flows(e) == [("USED", "east", "west", "w1", 40, None, None)]


def test_a_refund_adjusts_the_pair_and_period_of_the_transaction_it_refunds() -> None:
    use = record("CAPTURE", AT_WEST, T - 5)
    # Refunded at another store: the pair corrected is the capture's (east's points used at west).
    back = event("REFUNDED", [lot(1, 40, "east")], ref=4, pos=AT_EAST)
    assert flows(back, use) == [("USE_REFUNDED", "east", "west", "w1", 40, 4, T - 5)]
    earned = record("GRANT", AT_WEST, T - 9)
    taken = event("REFUNDED", [lot(2, -15, "west")], ref=2)
    assert flows(taken, earned) == [("ISSUE_REFUNDED", "west", "west", "w1", 15, 2, T - 9)]
    # A refund of a merged account's transaction names that account's.
    assert point_flows(event("REFUNDED", [lot(1, 5, "east")], ref=4, racct="m3"), use)[0].ref_account == "m3"
    with pytest.raises(ValueError, match="original"):
        point_flows(back, None)
    # What no flow maps, or a lot effect of the wrong sign, stops the event (held back by the
    # write-behind as diverged) rather than being counted as something it is not.
    with pytest.raises(ValueError, match="of a HOLD, which no flow maps"):
        point_flows(back, record("HOLD", AT_WEST, T - 5))
    with pytest.raises(ValueError, match="a USED flow with a lot effect of 5"):
        point_flows(event("REDEEMED", [lot(1, -10, "east"), lot(2, 5, "east")], pos=AT_WEST), None)


@pytest.mark.parametrize(
    ("type_", "flow"),
    [
        ("LOTS_EXPIRED", "EXPIRED"),
        ("ACCOUNT_CLOSED", "FORFEITED"),
        ("MERGED_OUT", "MERGED_OUT"),
        ("MERGED_IN", "MERGED_IN"),
    ],
)
def test_breakage_and_merges_are_flows_of_each_lots_issuer(type_: str, flow: str) -> None:
    sign = 1 if type_ == "MERGED_IN" else -1
    e = event(type_, [lot(1, sign * 7, "cafe"), lot(2, sign * 3, "east")])
    assert flows(e) == [(flow, "cafe", None, None, 7, None, None), (flow, "east", None, None, 3, None, None)]


@pytest.mark.parametrize("type_", ["HOLD_AUTHORIZED", "HOLD_VOIDED", "HOLD_EXPIRED", "CARD_LINKED", "COUPON_USED"])
def test_holds_and_member_changes_are_no_flows(type_: str) -> None:
    # A hold's points stay the member's until a capture spends them.
    assert point_flows(event(type_, [lot(1, -10, "east")]), None) == []


async def test_migration_0007_gives_every_journal_month_its_point_flows_partition(stack: EmbeddedStack) -> None:
    """A journal that existed before settlement gets a point_flows partition for each of its
    months, and later months get both tables' partitions."""
    schema = f"m7_{uuid.uuid4().hex[:12]}"
    before = [sql for v, sql in available_migrations() if v < "0007"]
    this = dict(available_migrations())["0007_settlement"]
    async with connection(stack.postgres.dsn) as conn:
        await conn.execute(f"CREATE SCHEMA {schema}")
        try:
            await conn.execute(f"SET search_path = {schema}")
            for sql in before:
                await conn.execute(sql)
            await conn.execute("SELECT journal_create_partitions('2026-09-15T00:00:00Z', 2)")
            await conn.execute(this)
            assert await _partitions(conn, schema) == {
                "journal": ["journal_2026_09", "journal_2026_10"],
                "point_flows": ["point_flows_2026_09", "point_flows_2026_10"],
            }
            assert await conn.fetchval("SELECT journal_create_partitions('2026-10-15T00:00:00Z', 2)") == 2
            assert await _partitions(conn, schema) == {
                "journal": ["journal_2026_09", "journal_2026_10", "journal_2026_11"],
                "point_flows": ["point_flows_2026_09", "point_flows_2026_10", "point_flows_2026_11"],
            }
        finally:
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")


async def _partitions(conn: Connection, schema: str) -> dict[str, list[str]]:
    rows = await conn.fetch(
        "SELECT p.relname AS parent, c.relname AS child FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " JOIN pg_class p ON p.oid = i.inhparent WHERE p.relnamespace = $1::regnamespace AND p.relkind = 'p'"
        " ORDER BY 1, 2",
        schema,
    )
    out: dict[str, list[str]] = {}
    for r in rows:
        out.setdefault(r["parent"], []).append(r["child"])
    return out
