"""Settlement between group companies, as operators use it: a small group's November and December,
driven through the gRPC API against real Redis and PostgreSQL with the write-behind running, and
the statements checked against figures computed by hand (in the comments).

The group: east (1 yen per point), west (1 yen per point) and cafe (50 yen per 100 points).
Members: m1 (an east member), m2 (west), m3 (cafe; merged into m1 in November).
"""

from __future__ import annotations

import asyncio
import csv
import getpass
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import msgspec
import pytest
from redis.asyncio import Redis

from pointauth.client import PointauthError, PointsClient
from pointauth.server.app import PointauthServer
from pointauth.server.clock import ManualClock
from pointauth.server.config import Settings
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.journal.pg import connection
from pointauth.server.journal.status import stream_backlogs
from pointauth.server.ledger import Keyspace, LedgerRefusal
from pointauth.server.ledger.codec import AUDIT_FIELD, AuditRecord
from pointauth.server.ops.settle import settle_command
from pointauth.server.services.settlement import SettlementService
from pointauth.v1 import common_pb2
from pointauth.v1 import settlement_service_pb2 as spb
from tests.conftest import DAY_MS, START_MS, at
from tests.journal.support import running_worker, wait_until_applied

# START_MS is 2026-11-18 20:06:40 in Tokyo; December 3 is 15 days later.
DECEMBER_3 = START_MS + 15 * DAY_MS
JANUARY_2 = START_MS + 45 * DAY_MS
ACCOUNTS = ["m1", "m2", "m3"]
CARD = {"m1": "CARD-M1", "m2": "CARD-M2", "m3": "CARD-M3"}


def pos(company: str, store: str) -> common_pb2.PointOfSale:
    return common_pb2.PointOfSale(
        company_id=company, store_id=store, terminal_id="till-1", channel=common_pb2.CHANNEL_STORE
    )


EAST, WEST_1, WEST_2, CAFE = pos("east", "e1"), pos("west", "w1"), pos("west", "w2"), pos("cafe", "c1")


@dataclass
class Group:
    client: PointsClient
    server: PointauthServer
    settings: Settings
    clock: ManualClock
    redis: Redis
    dsn: str
    keyspace: Keyspace

    async def applied(self) -> None:
        await wait_until_applied(self.redis, self.dsn, self.keyspace, ACCOUNTS)
        await drained(self.redis, self.keyspace)


async def drained(redis: Redis, keyspace: Keyspace) -> None:
    """Until the write-behind applied every stream entry: events, and the audit trail's records
    (each Settle call is one), which closing waits for like any other entry."""
    streams = [keyspace.events(shard) for shard in range(keyspace.shards)]
    for _ in range(500):
        if not any(s.backlog for s in await stream_backlogs(redis, streams)):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the write-behind did not apply every stream entry")


@pytest.fixture
async def group(
    stack: EmbeddedStack, settings: Settings, clock: ManualClock, redis: Redis, dsn: str, keyspace: Keyspace
) -> AsyncIterator[Group]:
    from msgspec.structs import replace

    settings = replace(settings, postgres=replace(settings.postgres, dsn=dsn))
    async with (
        PointauthServer(settings, clock, sweeper=False) as server,
        PointsClient(f"127.0.0.1:{server.port}", plaintext=True) as client,
        running_worker(stack.redis.url, dsn, keyspace),
    ):
        await client.register_company("east", display_name="East Mart")
        await client.register_company("west", display_name="West Drug", point_value=(1, 1))
        await client.register_company("cafe", display_name="Cafe Chain", point_value=(50, 100))
        for p in (EAST, WEST_1, WEST_2, CAFE):
            await client.register_store(p.store_id, company_id=p.company_id, region_id="kanto")
            await client.register_terminal(p.store_id, "till-1")
        for account in ACCOUNTS:
            await client.create_account(account, CARD[account])
        yield Group(client, server, settings, clock, redis, dsn, keyspace)


async def november(g: Group) -> dict[str, str]:
    """The November story; returns the transaction ids later steps refund."""
    c, clock = g.client, g.clock
    in_60_days, in_50_days, in_3_days = (
        at(START_MS + 60 * DAY_MS),
        at(START_MS + 50 * DAY_MS),
        at(START_MS + 3 * DAY_MS),
    )
    await c.grant_points(CARD["m1"], 1000, in_60_days, EAST)  # east issues 1,000
    earn = await c.earn_points(CARD["m1"], WEST_2, 50_000, at(clock.now_ms()))  # west issues 500 (1 per 100 yen)
    assert earn.earned_points == 500
    await c.grant_points(CARD["m2"], 800, in_60_days, WEST_1)  # west issues 800
    await c.grant_points(CARD["m3"], 300, in_3_days, CAFE)  # cafe issues 300, to expire
    await c.grant_points(CARD["m3"], 200, in_50_days, CAFE)  # cafe issues 200, to be merged
    clock.advance(60_000)
    # m1 spends east's lot first (it expires first): 600 used at cafe.
    await c.redeem_points(CARD["m1"], CAFE, 600)
    # A hold of 700 at west takes east's last 400 and 300 of west's; the capture of 650 uses
    # east 400 and west 250.
    hold = await c.authorize_hold(CARD["m1"], WEST_1, 700)
    capture = await c.capture_hold(hold.hold_id, 650)
    redemption = await c.redeem_points(CARD["m2"], EAST, 300)  # west's points used at east
    clock.advance(60_000)
    # A refund of 300 of the capture gives back in reverse: west 250, then east 50.
    await c.refund_transaction(capture.transaction_id, 300)
    await c.refund_transaction(earn.transaction_id, 100)  # west takes back 100 of its 500
    clock.set(START_MS + 4 * DAY_MS)
    await c.get_balance(CARD["m3"])  # cafe's 300 expire (November 22)
    clock.set(START_MS + 5 * DAY_MS)
    await c.merge_accounts("m3", "m1", operator_id="ops-1", reason="same person")  # cafe's 200 move
    return {"redemption": redemption.transaction_id}


def issuer(s: spb.Statement, issuer_id: str) -> dict[str, int]:
    line = next(i for i in s.issuers if i.issuer_id == issuer_id)
    return {flow: points for flow, points in line.points.items() if points} | {"outstanding": line.outstanding_change}


def pairs(lines: object) -> set[tuple[str, str, str, int, int, int]]:
    return {(p.issuer_id, p.company_id, p.store_id, p.used, p.use_refunded, p.net) for p in lines}  # type: ignore[attr-defined]


def payments(s: spb.Statement) -> set[tuple[str, str, int]]:
    return {(p.payer_id, p.payee_id, p.yen) for p in s.payments}


def refusal(exc: PointauthError) -> tuple[grpc.StatusCode, str]:
    return exc.code, exc.reason


async def test_a_small_group_settles_november_and_december_as_computed_by_hand(group: Group) -> None:
    g, c = group, group.client
    ids = await november(g)
    await g.applied()

    # Closing November while it runs is refused; computing it is not.
    with pytest.raises(PointauthError) as refused:
        await c.settle("2026-11", close=True)
    assert refusal(refused.value) == (grpc.StatusCode.FAILED_PRECONDITION, "PERIOD_NOT_ENDED")
    preview = await c.settle("2026-11", include_stores=True)
    assert not preview.HasField("close_time")

    g.clock.set(DECEMBER_3)
    await g.applied()
    nov = await c.settle("2026-11", close=True, include_stores=True)
    assert nov.HasField("close_time")
    assert nov.closed_by.startswith("rpc:")
    assert (nov.period, nov.time_zone) == ("2026-11", "Asia/Tokyo")
    assert nov.start_time.ToJsonString() == "2026-10-31T15:00:00Z"
    assert nov.end_time.ToJsonString() == "2026-11-30T15:00:00Z"
    # east: issued 1,000; used 600 at cafe and 400 at west; 50 given back -> outstanding +50.
    assert issuer(nov, "east") == {"ISSUED": 1000, "USED": 1000, "USE_REFUNDED": 50, "outstanding": 50}
    # west: issued 500 + 800, 100 taken back; used 250 at west and 300 at east, 250 given back.
    assert issuer(nov, "west") == {
        "ISSUED": 1300, "ISSUE_REFUNDED": 100, "USED": 550, "USE_REFUNDED": 250, "outstanding": 900,
    }  # fmt: skip
    # cafe: issued 300 + 200; 300 expired; 200 left m3 and arrived on m1.
    assert issuer(nov, "cafe") == {
        "ISSUED": 500, "EXPIRED": 300, "MERGED_OUT": 200, "MERGED_IN": 200, "outstanding": 200,
    }  # fmt: skip
    assert pairs(nov.pairs) == {
        ("east", "cafe", "", 600, 0, 600),
        ("east", "west", "", 400, 50, 350),
        ("west", "west", "", 250, 250, 0),
        ("west", "east", "", 300, 0, 300),
    }
    assert pairs(nov.stores) == {
        ("east", "cafe", "c1", 600, 0, 600),
        ("east", "west", "w1", 400, 50, 350),
        ("west", "west", "w1", 250, 250, 0),
        ("west", "east", "e1", 300, 0, 300),
    }
    # east owes west 350 yen, west owes east 300: east pays west 50. east pays cafe 600.
    assert payments(nov) == {("east", "west", 50), ("east", "cafe", 600)}
    assert {(t.name, t.flow_points, t.journal_points) for t in nov.tie_out} == {
        ("issued", 2800, 2800), ("used", 1550, 1550), ("refunded", 400, 400), ("expired", 300, 300),
        ("forfeited", 0, 0), ("merged_out", 200, 200), ("merged_in", 200, 200), ("unclassified_events", 0, 0),
    }  # fmt: skip
    assert nov.flows == 15
    assert not nov.adjustments

    # December: a late refund of 200 of m2's November redemption (west's points used at east),
    # and 151 of cafe's points (merged into m1, expiring first) used at east.
    await c.refund_transaction(ids["redemption"], 200)
    late_use = await c.redeem_points(CARD["m1"], EAST, 151)
    assert [(lot.issuer_id, lot.delta_points) for lot in late_use.lot_effects] == [("cafe", -151)]
    await g.applied()

    # November, closed, gives the same numbers whatever happened since.
    again = await c.settle("2026-11", close=True, include_stores=True)
    assert again == nov
    assert await c.get_statement("2026-11", include_stores=True) == nov

    dec = await c.settle("2026-12")
    assert not dec.HasField("close_time")
    assert issuer(dec, "west") == {"USE_REFUNDED": 200, "outstanding": 200}
    assert issuer(dec, "cafe") == {"USED": 151, "outstanding": -151}
    assert pairs(dec.pairs) == {("west", "east", "", 0, 200, -200), ("cafe", "east", "", 151, 0, 151)}
    # west's debt to east is -200 yen: east pays west 200. cafe owes east 151 x 50/100 = 75.5
    # yen, rounded half up: 76.
    assert payments(dec) == {("east", "west", 200), ("cafe", "east", 76)}
    [adjustment] = dec.adjustments
    assert (
        adjustment.adjusts_transaction_id, adjustment.adjusts_period, adjustment.flow, adjustment.issuer_id,
        adjustment.company_id, adjustment.store_id, adjustment.points,
    ) == (ids["redemption"], "2026-11", spb.FLOW_USE_REFUNDED, "west", "east", "e1", 200)  # fmt: skip
    assert adjustment.transaction_id.startswith("m2.")

    # Per company: cafe sees its own lines only.
    cafe = await c.settle("2026-11", company_id="cafe")
    assert [i.issuer_id for i in cafe.issuers] == ["cafe"]
    assert pairs(cafe.pairs) == {("east", "cafe", "", 600, 0, 600)}
    assert payments(cafe) == {("east", "cafe", 600)}

    # Listing and CSV.
    g.clock.set(JANUARY_2)
    await g.applied()  # the audit trail's records of the calls above, from before December's end
    await c.settle("2026-12", close=True)
    assert [s.period for s in await c.list_statements()] == ["2026-12", "2026-11"]
    assert [s.period for s in await c.list_statements("cafe")] == ["2026-12", "2026-11"]
    rows = list(csv.DictReader(io.StringIO(await c.export_statement("2026-12"))))
    assert [(r["section"], r["payer_id"], r["payee_id"], r["yen"]) for r in rows if r["section"] == "payment"] == [
        ("payment", "cafe", "east", "76"),
        ("payment", "east", "west", "200"),
    ]
    [adjusted] = [r for r in rows if r["section"] == "adjustment"]
    assert (adjusted["adjusts_transaction_id"], adjusted["adjusts_period"], adjusted["points"]) == (
        ids["redemption"], "2026-11", "200",
    )  # fmt: skip
    assert {r["issuer_id"]: r["point_value"] for r in rows if r["section"] == "issuer"} == {
        "cafe": "50 yen per 100 points", "west": "1 yen per point",
    }  # fmt: skip

    # A closed statement can't be changed or added to, even by the tables' owner (the role these
    # tests and the dev stack use), short of disabling the triggers (README: production roles).
    async with connection(g.dsn) as conn:
        for sql in (
            "UPDATE settlement_payments SET yen = 0",
            "DELETE FROM settlement_statements WHERE period = '2026-11'",
            "UPDATE settlement_issuers SET issued = 1 WHERE issuer_id = 'east'",
            "TRUNCATE settlement_adjustments",
            "INSERT INTO settlement_payments (period, payer_id, payee_id, yen) VALUES ('2026-11', 'cafe', 'east', 1)",
        ):
            with pytest.raises(Exception, match="immutable"):
                await conn.execute(sql)
    assert await c.get_statement("2026-11", include_stores=True) == nov


async def test_closing_waits_for_the_write_behind_and_refuses_with_a_reason(
    stack: EmbeddedStack, settings: Settings, clock: ManualClock, redis: Redis, dsn: str, keyspace: Keyspace
) -> None:
    from msgspec.structs import replace

    settings = replace(settings, postgres=replace(settings.postgres, dsn=dsn))
    async with (
        PointauthServer(settings, clock, sweeper=False) as server,
        PointsClient(f"127.0.0.1:{server.port}", plaintext=True) as c,
    ):
        await c.register_company("east")
        await c.register_store("e1", company_id="east", region_id="kanto")
        await c.register_terminal("e1", "till-1")
        await c.create_account("m1", CARD["m1"])
        await c.grant_points(CARD["m1"], 100, at(START_MS + 60 * DAY_MS), EAST)
        clock.set(DECEMBER_3)

        # No worker ran: November's events are not in PostgreSQL.
        with pytest.raises(PointauthError) as behind:
            await c.settle("2026-11", close=True)
        assert refusal(behind.value) == (grpc.StatusCode.UNAVAILABLE, "JOURNAL_BEHIND")
        # The company, store and terminal registered, ACCOUNT_OPENED and GRANT, and the audit
        # trail's records of those five operator actions.
        assert behind.value.metadata["unapplied"] == "10"
        for bad in ("2026-13", "26-11", "2026-1", ""):
            with pytest.raises(PointauthError) as invalid:
                await c.settle(bad)
            assert refusal(invalid.value) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        with pytest.raises(PointauthError) as missing:
            await c.get_statement("2026-11")
        assert refusal(missing.value) == (grpc.StatusCode.NOT_FOUND, "STATEMENT_NOT_FOUND")
        async with connection(dsn) as conn:
            assert await conn.fetchval("SELECT count(*) FROM settlement_statements") == 0

        async with running_worker(stack.redis.url, dsn, keyspace):
            await wait_until_applied(redis, dsn, keyspace, ["m1"])
            await drained(redis, keyspace)
            # Closed at once by three callers: one statement, which all three get.
            closes = await asyncio.gather(*(c.settle("2026-10", close=True) for _ in range(3)))
            assert closes[0] == closes[1] == closes[2]
            assert closes[0].flows == 0
            # The CLI says the same, and closes once the journal has everything.
            await drained(redis, keyspace)
            out = io.StringIO()
            code = await asyncio.to_thread(settle_command, settings, "2026-11", close=True, clock=clock, out=out)
        assert code == 0
        text = out.getvalue()
        assert "Settlement 2026-11 (Asia/Tokyo: 2026-11-01T00:00:00+09:00 to 2026-12-01T00:00:00+09:00)" in text
        assert "tie-out to the journal: every total equal" in text
        assert (await c.get_statement("2026-11")).closed_by == f"cli:{getpass.getuser()}"
        # Closing from the command line is in the audit trail, as an RPC's would be.
        entries: Any = await redis.xrange(keyspace.events(0))
        audits = [msgspec.msgpack.decode(f[AUDIT_FIELD], type=AuditRecord) for _, f in entries if AUDIT_FIELD in f]
        assert [(a.method, a.code, json.loads(a.request)) for a in audits if a.method.startswith("cli:")] == [
            ("cli:settle", "OK", {"period": "2026-11", "close": True})
        ]
        async with connection(dsn) as conn:
            assert await conn.fetchval("SELECT array_agg(period ORDER BY period) FROM settlement_statements") == [
                "2026-10", "2026-11",
            ]  # fmt: skip

        # Dead letters written before a period's end block its closing.
        async with connection(dsn) as conn:
            await conn.execute(
                "INSERT INTO dead_letters (stream, entry_id, deliveries, reason) VALUES ('s', $1, 5, 'test')",
                f"{START_MS + 20 * DAY_MS}-0",
            )
        clock.set(JANUARY_2)
        async with running_worker(stack.redis.url, dsn, keyspace):
            await drained(redis, keyspace)  # the audit trail's record of the CLI's close
            with pytest.raises(PointauthError) as dead:
                await c.settle("2026-12", close=True)
            assert refusal(dead.value) == (grpc.StatusCode.FAILED_PRECONDITION, "JOURNAL_HAS_DEAD_LETTERS")
            assert dead.value.metadata["dead_letters"] == "1"
            await drained(redis, keyspace)
            err = io.StringIO()
            code = await asyncio.to_thread(settle_command, settings, "2026-12", close=True, clock=clock, out=err)
        assert code == 1


async def test_a_period_that_does_not_tie_out_is_not_closed(redis: Redis, dsn: str, keyspace: Keyspace) -> None:
    """An event of a type settlement does not know (a newer ledger's) would leave its points out
    of every line: the tie-out says so, and closing is refused, storing nothing."""
    async with connection(dsn) as conn:
        # Written directly, not by the worker (which makes its events' partitions): the month's
        # partition is made here, so the test does not depend on today's date.
        await conn.execute("SELECT journal_create_partitions($1, 1)", at(START_MS))
        await conn.execute(
            "INSERT INTO journal (event_id, account_id, seq, type, points, lots, event_time, stream, entry_id)"
            " VALUES ('m9.1', 'm9', 1, 'POINTS_TELEPORTED', 40, '[]', $1, 's', '1-0')",
            at(START_MS),
        )
    service = SettlementService(dsn, redis, keyspace, ManualClock(DECEMBER_3), "Asia/Tokyo")
    preview = await service.settle(service.period("2026-11"), close=False, actor="test")
    assert preview.mismatches() == ["unclassified_events: flows 0, journal 1"]
    with pytest.raises(LedgerRefusal) as refused:
        await service.settle(service.period("2026-11"), close=True, actor="test")
    result = refused.value.result
    assert (result.code, result.reason) == ("FAILED_PRECONDITION", "STATEMENT_DOES_NOT_TIE_OUT")
    assert result.meta["mismatches"] == "unclassified_events: flows 0, journal 1"
    async with connection(dsn) as conn:
        assert await conn.fetchval("SELECT count(*) FROM settlement_statements") == 0
