"""The group directory's way to PostgreSQL and back: the write-behind copies each change (in the
batch's transaction, once, newest wins), rehydrate restores Redis's directory from the copy, and
reconcile names every entry where the two differ."""

from __future__ import annotations

import asyncio
import io
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis

from pointauth.server.clock import ManualClock
from pointauth.server.config import LedgerSettings, PostgresSettings, RedisSettings, Settings
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.domain.group import Company, Store, Terminal
from pointauth.server.domain.settlement import PointValue
from pointauth.server.journal.events import EntryId, StreamEntry
from pointauth.server.journal.pg import connection
from pointauth.server.journal.writer import JournalWriter
from pointauth.server.ledger import Keyspace, Ledger, codec
from pointauth.server.ledger.directory import DirectoryStore, Registered
from pointauth.server.ops import reconcile, reconcile_command, rehydrate
from pointauth.server.ops.directory import DirectoryDifference
from tests.conftest import START_MS
from tests.journal.support import DAY_MS, TILL, fingerprint, running_worker

ENTRIES = (
    Company("acme", "Acme Retail", PointValue(50, 100)),
    Store("store-7", "acme", "kanto", "Acme Ikebukuro"),
    Terminal("store-7", "till-3", "Till 3"),
    Terminal("store-7", "till-4"),
)


async def _register(store: DirectoryStore, *entries: Company | Store | Terminal) -> None:
    for entry in entries:
        assert isinstance(await store.register(entry), Registered)


async def _tables(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    queries = {
        "companies": "SELECT company_id, display_name, point_value_yen, point_value_points, version, updated_at"
        " FROM companies ORDER BY 1",
        "stores": "SELECT store_id, company_id, region_id, display_name, version, updated_at FROM stores ORDER BY 1",
        "terminals": "SELECT store_id, terminal_id, display_name, version, updated_at FROM terminals ORDER BY 1, 2",
    }
    columns = {"companies": 6, "stores": 6, "terminals": 5}
    async with connection(dsn) as conn:
        return {
            table: [tuple(r[i] for i in range(columns[table])) for r in await conn.fetch(query)]
            for table, query in queries.items()
        }


async def _applied(worker: Any, changes: int) -> None:
    for _ in range(300):
        if worker.directory_changes_applied >= changes:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the worker copied {worker.directory_changes_applied} of {changes} changes")


def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


async def test_the_worker_copies_each_change_with_its_version_beside_the_events(
    stack: EmbeddedStack, redis: Redis, keyspace: Keyspace, ledger: Ledger, clock: ManualClock, dsn: str
) -> None:
    directory = DirectoryStore(redis, keyspace, clock)
    await _register(directory, *ENTRIES)
    clock.advance(60_000)
    await _register(directory, Store("store-7", "acme", "kansai", "Acme Namba"))  # version 5
    # An account in shard 0, whose events share the stream with the directory's changes.
    account = next(f"member-{n}" for n in range(1000) if keyspace.shard_of(f"member-{n}") == 0)
    await ledger.create_account(account, "4000000000000777", "open", fingerprint("open"))
    await ledger.earn(
        account,
        points=10,
        expire_ms=START_MS + DAY_MS,
        kind="R",
        pos=TILL,
        request_id="e",
        fingerprint=fingerprint("e"),
    )
    async with running_worker(stack.redis.url, dsn, keyspace) as worker:
        await _applied(worker, 5)
        for _ in range(300):
            if worker.applied_total == 2:
                break
            await asyncio.sleep(0.02)
        assert (worker.applied_total, worker.directory_changes_applied) == (2, 5)

    assert await _tables(dsn) == {
        "companies": [("acme", "Acme Retail", 50, 100, 1, _at(START_MS))],
        "stores": [("store-7", "acme", "kansai", "Acme Namba", 5, _at(START_MS + 60_000))],
        "terminals": [
            ("store-7", "till-3", "Till 3", 3, _at(START_MS)),
            ("store-7", "till-4", "", 4, _at(START_MS)),
        ],
    }
    async with connection(dsn) as conn:
        position = await conn.fetchrow(
            "SELECT applied_ms, applied_seq, applied_events FROM stream_positions WHERE stream = $1",
            keyspace.events(0),
        )
    last: Any = await redis.xrevrange(keyspace.events(0), count=1)
    # The directory's changes move the applied position, and count as no events.
    assert position is not None
    assert (EntryId(position["applied_ms"], position["applied_seq"]), position["applied_events"]) == (
        EntryId.parse(last[0][0]), 2,
    )  # fmt: skip
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).ok


async def test_a_redelivered_or_late_change_never_undoes_a_newer_one(keyspace: Keyspace, dsn: str) -> None:
    stream = keyspace.events(0)

    def delivered(n: int, change: codec.DirectoryChange) -> tuple[StreamEntry, codec.DirectoryChange]:
        fields = {codec.DIRECTORY_FIELD: codec.encode_directory_change(change)}
        return StreamEntry(stream, 0, EntryId(START_MS, n), fields), change

    company = codec.DirectoryChange(1, START_MS, codec.CompanyEntry("acme", "Acme"))
    old = codec.DirectoryChange(2, START_MS, codec.StoreEntry("store-1", "acme", "kanto", "old name"))
    new = codec.DirectoryChange(3, START_MS + 1000, codec.StoreEntry("store-1", "acme", "kanto", "new name"))
    writer = JournalWriter(keyspace)
    async with connection(dsn) as conn:
        await writer.prepare(conn)
        # One batch holding both changes of the store (an upsert may touch a row once), then the
        # whole batch again, then the old change alone (a claimed entry, late).
        await writer.apply(conn, [], directory=[delivered(1, company), delivered(2, old), delivered(3, new)])
        await writer.apply(conn, [], directory=[delivered(1, company), delivered(2, old), delivered(3, new)])
        await writer.apply(conn, [], directory=[delivered(2, old)])
    assert await _tables(dsn) == {
        "companies": [("acme", "Acme", 1, 1, 1, _at(START_MS))],
        "stores": [("store-1", "acme", "kanto", "new name", 3, _at(START_MS + 1000))],
        "terminals": [],
    }


async def test_rehydrate_restores_the_directory_and_new_changes_go_on_above_its_version(
    stack: EmbeddedStack, redis: Redis, keyspace: Keyspace, clock: ManualClock, dsn: str
) -> None:
    directory = DirectoryStore(redis, keyspace, clock)
    await _register(directory, *ENTRIES)
    async with running_worker(stack.redis.url, dsn, keyspace) as worker:
        await _applied(worker, 4)
    before = await directory.read()
    assert before.version == 4

    await redis.flushall()
    assert (await directory.read()).version == 0
    report = await rehydrate(redis, dsn, keyspace, now_ms=START_MS, transaction_retention_ms=DAY_MS)
    assert report.directory_entries == 4
    after = await directory.read()
    assert (after.version, set(after.companies), set(after.stores), set(after.terminals)) == (
        4, set(before.companies), set(before.stores), set(before.terminals),
    )  # fmt: skip
    changed = await directory.register(Terminal("store-7", "till-5"))
    assert isinstance(changed, Registered)
    assert changed.version == 5


async def test_reconcile_names_each_directory_entry_that_differs(
    stack: EmbeddedStack, redis: Redis, keyspace: Keyspace, clock: ManualClock, dsn: str
) -> None:
    directory = DirectoryStore(redis, keyspace, clock)
    await _register(directory, *ENTRIES)
    async with running_worker(stack.redis.url, dsn, keyspace) as worker:
        await _applied(worker, 4)
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).directory == []

    keys = keyspace.directory()
    # Redis loses a terminal and has another store name; PostgreSQL has a company Redis lacks.
    await redis.hdel(keys.terminals, codec.terminal_field("store-7", "till-4"))
    await redis.hset(
        keys.stores, "store-7", codec.encode_directory_entry(codec.StoreEntry("store-7", "acme", "kanto", "renamed"))
    )
    async with connection(dsn) as conn:
        await conn.execute("INSERT INTO companies VALUES ('ghost', 'Ghost Co', 9, now())")
        await conn.execute("UPDATE companies SET point_value_yen = 1 WHERE company_id = 'acme'")

    report = await reconcile(redis, dsn, keyspace, settle_seconds=0)
    assert report.directory == [
        DirectoryDifference(
            "company acme", "name 'Acme Retail', 50 yen per 100 points", "name 'Acme Retail', 1 yen per 100 points"
        ),
        DirectoryDifference("company ghost", "missing", "name 'Ghost Co', 1 yen per point"),
        DirectoryDifference(
            "store store-7",
            "company acme, region kanto, name 'renamed'",
            "company acme, region kanto, name 'Acme Ikebukuro'",
        ),
        DirectoryDifference("terminal store-7/till-4", "missing", "name ''"),
    ]
    assert not report.ok

    settings = Settings(
        redis=RedisSettings(url=stack.redis.url), postgres=PostgresSettings(dsn=dsn), ledger=LedgerSettings(shards=16)
    )
    out = io.StringIO()
    assert await asyncio.to_thread(reconcile_command, settings, 0.0, out) == 1
    lines = out.getvalue().splitlines()
    assert lines[:4] == [
        "group directory: company acme: Redis name 'Acme Retail', 50 yen per 100 points, "
        "PostgreSQL name 'Acme Retail', 1 yen per 100 points",
        "group directory: company ghost: Redis missing, PostgreSQL name 'Ghost Co', 1 yen per point",
        "group directory: store store-7: Redis company acme, region kanto, name 'renamed', "
        "PostgreSQL company acme, region kanto, name 'Acme Ikebukuro'",
        "group directory: terminal store-7/till-4: Redis missing, PostgreSQL name ''",
    ]
    assert lines[4].endswith("Redis and PostgreSQL DIFFER for 4 group directory entries")


async def test_reconcile_waits_for_changes_on_their_way(
    stack: EmbeddedStack, redis: Redis, keyspace: Keyspace, clock: ManualClock, dsn: str
) -> None:
    directory = DirectoryStore(redis, keyspace, clock)
    await _register(directory, *ENTRIES)
    assert len((await reconcile(redis, dsn, keyspace, settle_seconds=0)).directory) == 4  # not copied yet
    async with running_worker(stack.redis.url, dsn, keyspace):
        report = await reconcile(redis, dsn, keyspace, settle_seconds=10)
    assert (report.directory, report.ok) == ([], True)
