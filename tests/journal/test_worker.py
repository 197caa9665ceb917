"""The journal: every acknowledged movement lands in PostgreSQL once, with its till, request and
lot effects, and the PostgreSQL balances equal the ledger's."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from redis.asyncio import Redis

from pointauth.server.clock import ManualClock
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.journal import migrate, worker_status
from pointauth.server.journal.flows import FLOW_COLUMNS
from pointauth.server.journal.migrate import available_migrations
from pointauth.server.journal.pg import connection
from pointauth.server.journal.projection import AccountState, Projector
from pointauth.server.journal.writer import (
    JOURNAL_COLUMNS,
    TRANSACTION_COLUMNS,
    JournalWriter,
    flow_row,
    journal_row,
    record_row,
)
from pointauth.server.ledger import Keyspace, Ledger
from pointauth.server.ops import reconcile
from tests.journal.support import (
    DAY_MS,
    TILL,
    Traffic,
    assert_acknowledged_journaled,
    assert_balances_match,
    assert_journal_complete,
    deliveries,
    fingerprint,
    redis_seqs,
    running_worker,
    wait_until_applied,
)

ACCOUNTS = [f"member-{i}" for i in range(12)]


async def test_migrate_is_versioned_and_creates_partitions_ahead(dsn: str) -> None:
    assert await migrate(dsn) == []  # already applied by the fixture: nothing to do twice
    async with connection(dsn) as conn:
        versions = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")]
        partitions = await conn.fetchval(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'journal'::regclass"
            " AND inhrelid::regclass::text LIKE 'journal_%'"
        )
    assert versions == [version for version, _ in available_migrations()]
    assert versions[:2] == ["0001_initial", "0002_members_cards"]
    assert partitions >= 4  # this month and three ahead


async def test_every_movement_is_journaled_once_with_its_details(
    stack: EmbeddedStack, redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace, dsn: str
) -> None:
    rid = "till-3-0001"
    await ledger.create_account("alice", "card-alice", "open-alice", fingerprint("open-alice"))
    await ledger.earn(
        "alice", points=300, expire_ms=clock.now_ms() + 30 * DAY_MS, kind="R", pos=TILL,
        request_id=rid, fingerprint=fingerprint(rid), purchase_amount=30_000, purchase_ms=clock.now_ms(),
    )  # fmt: skip
    hold = await ledger.authorize("alice", points=100, ttl_ms=60_000, pos=TILL, request_id="h1", fingerprint="f" * 32)
    await ledger.capture("alice", hold.tx, points=60, request_id="c1", fingerprint="f" * 32)
    redeemed = await ledger.redeem("alice", points=50, pos=TILL, request_id="r1", fingerprint="f" * 32)
    await ledger.refund("alice", redeemed.tx, points=20, pos=None, request_id="rf1", fingerprint="f" * 32)

    async with running_worker(stack.redis.url, dsn, keyspace):
        await wait_until_applied(redis, dsn, keyspace, ["alice"])

    async with connection(dsn) as conn:
        rows = await conn.fetch(
            "SELECT event_id, type, points, lots, store_id, terminal_id, request_id, ref_seq FROM journal"
            " WHERE account_id = 'alice' ORDER BY seq"
        )
        lots = await conn.fetch("SELECT lot_id, points FROM lots WHERE account_id = 'alice'")
        card = await conn.fetchval("SELECT account_id FROM cards WHERE card_number = 'card-alice'")
    assert [(r["event_id"], r["type"], r["points"]) for r in rows] == [
        ("alice.1", "ACCOUNT_OPENED", 0),
        ("alice.2", "EARN", 300),
        ("alice.3", "HOLD_AUTHORIZED", 100),
        ("alice.4", "HOLD_CAPTURED", 60),
        ("alice.5", "REDEEMED", 50),
        ("alice.6", "REFUNDED", 20),
    ]
    assert rows[1]["request_id"] == rid
    assert (rows[1]["store_id"], rows[1]["terminal_id"]) == ("store-7", "till-3")
    assert rows[1]["lots"] == f'[[2, 300, {clock.now_ms() + 30 * DAY_MS}, "R", "acme"]]'
    assert rows[3]["ref_seq"] == 3
    assert [(r["lot_id"], r["points"]) for r in lots] == [(2, 300 - 60 - 50 + 20)]
    assert card == "alice"
    await assert_balances_match(ledger, dsn, ["alice"])


async def test_mixed_traffic_journal_complete_and_reconciled(
    stack: EmbeddedStack, redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace, dsn: str
) -> None:
    traffic = Traffic(ledger, clock, ACCOUNTS)
    await traffic.open_accounts()
    async with running_worker(stack.redis.url, dsn, keyspace) as worker:
        started = time.monotonic()
        await traffic.run(1200)
        await wait_until_applied(redis, dsn, keyspace, ACCOUNTS)
        elapsed = time.monotonic() - started
    events = await assert_journal_complete(redis, dsn, keyspace, ACCOUNTS)
    assert worker.applied_total == events
    await assert_acknowledged_journaled(traffic, dsn)
    await assert_balances_match(ledger, dsn, ACCOUNTS)
    report = await reconcile(redis, dsn, keyspace, settle_seconds=0)
    assert report.differences == []
    assert report.accounts == len(ACCOUNTS)
    print(f"{events} events applied in {elapsed:.2f} s alongside the traffic")


async def test_redelivered_entries_are_not_journaled_twice(
    stack: EmbeddedStack, redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace, dsn: str
) -> None:
    traffic = Traffic(ledger, clock, ACCOUNTS[:4])
    await traffic.open_accounts()
    await traffic.run(200)
    async with running_worker(stack.redis.url, dsn, keyspace):
        await wait_until_applied(redis, dsn, keyspace, ACCOUNTS[:4])
    # Rewind the group: every entry still in the streams is delivered again.
    for shard in range(keyspace.shards):
        if await redis.exists(keyspace.events(shard)):
            await redis.xgroup_setid(keyspace.events(shard), "pointauth-writebehind", "0")
    before = await assert_journal_complete(redis, dsn, keyspace, ACCOUNTS[:4])
    async with running_worker(stack.redis.url, dsn, keyspace):
        await traffic.run(40)
        await wait_until_applied(redis, dsn, keyspace, ACCOUNTS[:4])
    after = await assert_journal_complete(redis, dsn, keyspace, ACCOUNTS[:4])
    assert after > before
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).differences == []


async def test_undecodable_entry_is_dead_lettered_not_lost(
    stack: EmbeddedStack, redis: Redis, ledger: Ledger, keyspace: Keyspace, dsn: str
) -> None:
    await ledger.create_account("bob", "card-bob", "open-bob", fingerprint("open-bob"))
    stream = keyspace.account("bob").events
    await redis.xadd(stream, {"e": b"\xc1 not msgpack"})
    await ledger.earn("bob", points=5, expire_ms=10**13, kind="R", pos=TILL, request_id="e1", fingerprint="f" * 32)
    async with running_worker(stack.redis.url, dsn, keyspace):
        await wait_until_applied(redis, dsn, keyspace, ["bob"])
    async with connection(dsn) as conn:
        dead = await conn.fetch("SELECT stream, reason, payload FROM dead_letters")
    assert [(r["stream"], r["payload"]) for r in dead] == [(stream, b"\xc1 not msgpack")]
    assert await redis.xpending(stream, "pointauth-writebehind") == {
        "pending": 0, "min": None, "max": None, "consumers": [],
    }  # fmt: skip


async def test_status_shows_lag_and_throughput(
    stack: EmbeddedStack, redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace, dsn: str
) -> None:
    traffic = Traffic(ledger, clock, ACCOUNTS[:6])
    await traffic.open_accounts()
    await traffic.run(300)
    waiting = await worker_status(redis, dsn, keyspace)
    # No worker yet: every entry waits (events, and markers of remembered refusals), and the
    # oldest one's age is the lag.
    streams = {keyspace.account(account).events for account in ACCOUNTS[:6]}
    entries = sum([await redis.xlen(stream) for stream in streams])
    assert entries >= sum((await redis_seqs(redis, keyspace, ACCOUNTS[:6])).values())
    assert waiting.backlog == entries
    assert waiting.lag_ms > 0
    async with running_worker(stack.redis.url, dsn, keyspace):
        await wait_until_applied(redis, dsn, keyspace, ACCOUNTS[:6])
        await traffic.run(200)
        await wait_until_applied(redis, dsn, keyspace, ACCOUNTS[:6])
        await asyncio.sleep(1.5)  # a heartbeat after the last batch
        status = await worker_status(redis, dsn, keyspace)
    assert status.backlog == 0
    assert status.lag_ms == 0
    assert status.applied_events == await assert_journal_complete(redis, dsn, keyspace, ACCOUNTS[:6])
    assert [w.consumer for w in status.workers] == ["test-worker"]
    assert status.workers[0].applied_total == status.applied_events
    assert status.workers[0].cpu_class == "normal"  # a worker in the test's own thread: not idle
    assert "write-behind lag: 0 ms" in status.render()
    assert f", {keyspace.shards} shards, CPU class normal, last seen " in status.render()


@pytest.mark.parametrize("there_already", [None, "journal", "point_flows", "transactions"])
async def test_a_row_already_in_postgres_is_kept_and_its_batch_applies(
    redis: Redis,
    ledger: Ledger,
    clock: ManualClock,
    keyspace: Keyspace,
    dsn: str,
    there_already: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The writer COPYs an event's rows straight into their tables. A row there already (restored
    by hand: past its account's last_seq) fails that COPY; the batch is then written again, once,
    keeping the row, rather than stopping the write-behind."""
    await ledger.create_account("alice", "card-alice", "open-alice", fingerprint("open-alice"))
    await ledger.earn(
        "alice", points=300, expire_ms=clock.now_ms() + 30 * DAY_MS, kind="R", pos=TILL,
        request_id="e1", fingerprint=fingerprint("e1"), purchase_amount=30_000, purchase_ms=clock.now_ms(),
    )  # fmt: skip
    hold = await ledger.authorize("alice", points=100, ttl_ms=60_000, pos=TILL, request_id="h1", fingerprint="f" * 32)
    await ledger.capture("alice", hold.tx, points=60, request_id="c1", fingerprint="f" * 32)
    batch = await deliveries(redis, keyspace, "alice")
    # The earn's rows (seq 2), worked out as the writer does.
    projector, state = Projector({}), AccountState("alice")
    for d in batch:
        projector.apply(state, d.event)
    assert projector.flows[0].seq == 2
    rows = {
        "journal": (JOURNAL_COLUMNS, journal_row(batch[1])),
        "point_flows": (FLOW_COLUMNS, flow_row(projector.flows[0])),
        "transactions": (TRANSACTION_COLUMNS, record_row(("alice", 2), projector.records[("alice", 2)])),
    }
    writer = JournalWriter(keyspace)
    async with connection(dsn) as conn:
        await conn.execute("SELECT journal_create_partitions(to_timestamp($1::bigint / 1000.0), 1)", clock.now_ms())
        await writer.prepare(conn)
        assert len((await writer.apply(conn, batch[:1])).applied) == 1  # the opening: alice's row
        if there_already:
            columns, row = rows[there_already]
            await conn.copy_records_to_table(there_already, records=[row], columns=columns)
        with caplog.at_level(logging.WARNING, logger="pointauth.server.journal.writer"):
            outcome = await writer.apply(conn, batch[1:])
        journal = await conn.fetch("SELECT seq, type FROM journal WHERE account_id = 'alice' ORDER BY seq")
        flows = await conn.fetch("SELECT seq, flow, points FROM point_flows WHERE account_id = 'alice' ORDER BY seq")
        records = await conn.fetch(
            "SELECT seq, type, state, captured FROM transactions WHERE account_id = 'alice' ORDER BY seq"
        )
        last_seq = await conn.fetchval("SELECT last_seq FROM accounts WHERE account_id = 'alice'")
    assert len(outcome.applied) == 3
    assert [(r["seq"], r["type"]) for r in journal] == [
        (1, "ACCOUNT_OPENED"), (2, "EARN"), (3, "HOLD_AUTHORIZED"), (4, "HOLD_CAPTURED"),
    ]  # fmt: skip
    assert [(r["seq"], r["flow"], r["points"]) for r in flows] == [(2, "ISSUED", 300), (4, "USED", 60)]
    assert [(r["seq"], r["type"], r["state"], r["captured"]) for r in records] == [
        (2, "EARN", None, 0), (3, "HOLD", "CAPTURED", 60), (4, "CAPTURE", None, 0),
    ]  # fmt: skip
    assert last_seq == 4
    warned = [r.getMessage() for r in caplog.records if "there already" in r.getMessage()]
    assert len(warned) == (1 if there_already else 0)
    await assert_balances_match(ledger, dsn, ["alice"])
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).differences == []
