"""Reconcile proves the journal itself: every account's events 1..last_seq, once each, adding up
to the points Redis holds. It names the seqs missing and the sums that differ."""

from __future__ import annotations

import asyncio
import io

from redis.asyncio import Redis

from pointauth.server.clock import ManualClock
from pointauth.server.config import LedgerSettings, PostgresSettings, RedisSettings, Settings
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.journal.pg import connection
from pointauth.server.journal.writer import JOURNAL_COLUMNS
from pointauth.server.ledger import Keyspace, Ledger
from pointauth.server.ops import reconcile, reconcile_command
from tests.journal.support import TILL, Traffic, fingerprint, running_worker, wait_until_applied

ACCOUNTS = [f"member-{i}" for i in range(4)]
DAY_MS = 86_400_000


async def _every_event_type_journaled(
    stack: EmbeddedStack, redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace, dsn: str
) -> None:
    """Traffic whose journal holds all ten event types, applied by the worker."""
    traffic = Traffic(ledger, clock, ACCOUNTS)
    await traffic.open_accounts()  # seq 1 ACCOUNT_OPENED, seq 2 EARN of 500 points
    await traffic.run(300)
    assert traffic.open_holds()  # to expire below
    for n, account in enumerate(ACCOUNTS):
        rid = f"grant-{n}"
        await ledger.earn(
            account, points=40, expire_ms=clock.now_ms() + DAY_MS, kind="L", pos=TILL, request_id=rid,
            fingerprint=fingerprint(rid), grant=True,
        )  # fmt: skip
    clock.advance(2 * DAY_MS)
    for account in ACCOUNTS:
        await ledger.balance(account)  # expires the open holds, then the granted lots
    async with running_worker(stack.redis.url, dsn, keyspace):
        await wait_until_applied(redis, dsn, keyspace, ACCOUNTS)
    async with connection(dsn) as conn:
        types = {r["type"] for r in await conn.fetch("SELECT DISTINCT type FROM journal")}
    assert types == {
        "ACCOUNT_OPENED", "EARN", "GRANT", "HOLD_AUTHORIZED", "HOLD_CAPTURED", "HOLD_VOIDED", "HOLD_EXPIRED",
        "REDEEMED", "REFUNDED", "LOTS_EXPIRED",
    }  # fmt: skip


def _settings(stack: EmbeddedStack, dsn: str, keyspace: Keyspace) -> Settings:
    return Settings(
        redis=RedisSettings(url=stack.redis.url),
        postgres=PostgresSettings(dsn=dsn),
        ledger=LedgerSettings(shards=keyspace.shards),
    )


async def _reconcile_cli(settings: Settings) -> tuple[int, str]:
    out = io.StringIO()
    code = await asyncio.to_thread(reconcile_command, settings, 0.0, out)
    return code, out.getvalue()


async def test_reconcile_names_the_journal_rows_missing(
    stack: EmbeddedStack, redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace, dsn: str
) -> None:
    await _every_event_type_journaled(stack, redis, ledger, clock, keyspace, dsn)
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).differences == []
    code, listing = await _reconcile_cli(_settings(stack, dsn, keyspace))
    assert (code, listing.endswith("Redis and PostgreSQL agree\n")) == (0, True), listing

    async with connection(dsn) as conn:
        await conn.execute(
            "DELETE FROM journal WHERE (account_id, seq) IN (SELECT * FROM unnest($1::text[], $2::bigint[]))",
            ["member-1", "member-2", "member-3", "member-3", "member-3"],
            [1, 2, 3, 4, 6],
        )
        # And a row twice (the primary key lets it in with another event time).
        columns = ", ".join(c for c in JOURNAL_COLUMNS if c != "event_time")
        await conn.execute(
            f"INSERT INTO journal ({columns}, event_time) SELECT {columns}, event_time + interval '1 ms'"
            " FROM journal WHERE account_id = 'member-0' AND seq = 5"
        )
    report = await reconcile(redis, dsn, keyspace, settle_seconds=0)
    said = [str(d) for d in report.differences]
    assert [str(d) for d in report.differences if d.what.startswith("journal seqs")] == [
        "member-0: journal has seq 5 more than once",
        "member-1: journal is missing seq 1",
        "member-2: journal is missing seq 2",
        "member-3: journal is missing seq 3-4, 6",
    ]
    assert {d.account_id for d in report.differences} == set(ACCOUNTS)
    # Seq 1 opened the account, moving no points; seq 2 earned 500.
    m2 = await ledger.balance("member-2")
    assert [s for s in said if s.startswith(("member-1:", "member-2:"))] == [
        "member-1: journal is missing seq 1",
        "member-2: journal is missing seq 2",
        f"member-2: journal sums to {m2.available + m2.held - 500} points, Redis holds {m2.available + m2.held}",
        f"member-2: journal's lot effects sum to {m2.available - 500} points, Redis's lots hold {m2.available}",
    ]

    code, listing = await _reconcile_cli(_settings(stack, dsn, keyspace))
    assert code == 1
    assert "member-3: journal is missing seq 3-4, 6\n" in listing
    assert "DIFFER for 4 accounts" in listing


async def test_reconcile_names_the_journal_sums_that_differ_from_redis(
    stack: EmbeddedStack, redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace, dsn: str
) -> None:
    await _every_event_type_journaled(stack, redis, ledger, clock, keyspace, dsn)
    async with connection(dsn) as conn:
        hold = await conn.fetchrow(
            "SELECT account_id, seq FROM journal WHERE type = 'HOLD_AUTHORIZED'"
            " AND account_id IN ('member-1', 'member-2') ORDER BY account_id, seq LIMIT 1"
        )
        assert hold is not None
        # An earn's points, a hold's points, a lot effect: each no longer what Redis holds.
        await conn.execute("UPDATE journal SET points = points + 7 WHERE account_id = 'member-0' AND seq = 2")
        await conn.execute(
            "UPDATE journal SET points = points + 3 WHERE account_id = $1 AND seq = $2", hold["account_id"], hold["seq"]
        )
        await conn.execute(
            "UPDATE journal SET lots = jsonb_set(lots, '{0,1}', to_jsonb((lots -> 0 ->> 1)::bigint - 1))"
            " WHERE account_id = 'member-3' AND seq = 2"
        )
    balances = {a: await ledger.balance(a) for a in ACCOUNTS}
    other = hold["account_id"]

    report = await reconcile(redis, dsn, keyspace, settle_seconds=0)
    m0, h, m3 = balances["member-0"], balances[other], balances["member-3"]
    assert sorted(str(d) for d in report.differences) == sorted(
        [
            f"member-0: journal sums to {m0.available + m0.held + 7} points, Redis holds {m0.available + m0.held}",
            f"{other}: journal's holds sum to {h.held + 3} points, Redis holds {h.held} on hold",
            f"member-3: journal's lot effects sum to {m3.available - 1} points, Redis's lots hold {m3.available}",
        ]
    )
    code, listing = await _reconcile_cli(_settings(stack, dsn, keyspace))
    assert code == 1
    assert "DIFFER for 3 accounts" in listing
