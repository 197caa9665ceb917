"""No round trip of the background work holds Redis for long: Redis runs a pipeline's commands
back to back, so a till's call that arrives meanwhile waits for all of them. Every pipeline the
write-behind worker sends (its reads, acknowledgements, scans, trims and claims) and the servers'
merge recovery pass is kept short, on the production layout of 1,024 shards, and each still does
its work."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from pointauth.server.config import LedgerSettings
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.journal import WorkerConfig, WriteBehindWorker
from pointauth.server.journal.status import COUNT_PAGE, GROUP, stream_backlogs
from pointauth.server.ledger import Keyspace, Ledger
from pointauth.server.ledger.pipeline import KEYS_PER_ROUND_TRIP
from tests.journal.support import TILL, assert_journal_complete, fingerprint, wait_until_applied

ACCOUNTS = [f"member-{i}" for i in range(300)]
CONFIG = WorkerConfig(
    consumer="test-worker",
    batch_size=1000,  # a batch needs several read round trips
    poll_ms=10,
    claim_idle_ms=500,
    housekeeping_s=0.2,
    trim_s=0.2,
)
# Commands of the worker that name one stream (their first argument), sent for many streams at once.
PER_STREAM = {"XLEN", "XINFO", "XPENDING", "XRANGE", "XTRIM", "XAUTOCLAIM"}


@pytest.fixture
def ledger_settings() -> LedgerSettings:
    return LedgerSettings(shards=1024)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def record_round_trips(monkeypatch: pytest.MonkeyPatch, client: Redis) -> list[list[tuple[Any, ...]]]:
    """Every round trip `client` makes from now on, as the commands it carried: a pipeline's
    commands together, a command sent alone on its own."""
    trips: list[list[tuple[Any, ...]]] = []
    execute_pipeline: Any = Pipeline.execute
    execute_command: Any = Redis.execute_command

    async def pipeline(self: Pipeline, raise_on_error: bool = True) -> list[Any]:
        if self.connection_pool is client.connection_pool:
            trips.append([args for args, _ in self.command_stack])
        replies: list[Any] = await execute_pipeline(self, raise_on_error)
        return replies

    async def command(self: Redis, *args: Any, **options: Any) -> Any:
        if self.connection_pool is client.connection_pool:
            trips.append([args])
        return await execute_command(self, *args, **options)

    monkeypatch.setattr(Pipeline, "execute", pipeline)
    monkeypatch.setattr(Redis, "execute_command", command)  # Pipeline's own queues instead
    return trips


def _read_count(args: Sequence[Any]) -> int:
    words = [_text(a).upper() for a in args]
    return int(words[words.index("COUNT") + 1])


async def test_every_round_trip_of_the_worker_is_short(
    monkeypatch: pytest.MonkeyPatch, stack: EmbeddedStack, redis: Redis, ledger: Ledger, keyspace: Keyspace, dsn: str
) -> None:
    for account in ACCOUNTS:
        await ledger.create_account(account, f"card-{account}", f"open-{account}", fingerprint(f"open-{account}"))
        rid = f"earn-{account}"
        await ledger.earn(
            account, points=100, expire_ms=10**13, kind="R", pos=TILL, request_id=rid, fingerprint=fingerprint(rid)
        )
    client = Redis.from_url(stack.redis.url)
    trips = record_round_trips(monkeypatch, client)
    worker = WriteBehindWorker(client, dsn, keyspace, CONFIG)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await wait_until_applied(redis, dsn, keyspace, ACCOUNTS)
        await asyncio.sleep(1.0)  # idle: scans, trims and claims go on
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await client.aclose()
    assert await assert_journal_complete(redis, dsn, keyspace, ACCOUNTS) == 2 * len(ACCOUNTS)

    kinds: Counter[str] = Counter()
    scanned: set[str] = set()
    for trip in trips:
        names = {_text(args[0]).split()[0].upper() for args in trip}
        kinds.update(names)
        if names == {"EVALSHA"} and _text(trip[0][3]) == keyspace.worker_leases():
            assert len(trip) == 1  # the lease's renewal (journal/lease.py): one key
            kinds["LEASE"] += 1
        elif "EVALSHA" in names:
            # The scan: one call of scan_chunk streams per round trip.
            assert len(trip) == 1, f"{len(trip)} scan calls in one round trip"
            numkeys = int(trip[0][2])
            assert numkeys <= CONFIG.scan_chunk
            scanned.update(_text(k) for k in trip[0][3 : 3 + numkeys])
        elif names == {"XREADGROUP"}:
            assert sum(_read_count(args) for args in trip) <= CONFIG.entries_per_round_trip
        elif names == {"XACK"}:
            assert sum(len(args) - 3 for args in trip) <= CONFIG.entries_per_round_trip
        elif names & PER_STREAM:
            assert names <= PER_STREAM, names
            streams = {_text(args[1]) for args in trip}
            assert len(streams) <= KEYS_PER_ROUND_TRIP, f"{sorted(names)} for {len(streams)} streams at once"
    # Each kind of round trip was seen, and a batch needed several reads: the bounds were tested.
    assert {"EVALSHA", "LEASE", "XREADGROUP", "XACK", "XAUTOCLAIM", "XTRIM", "XINFO"} <= set(kinds)
    assert kinds["XREADGROUP"] >= 2 * len(ACCOUNTS) // CONFIG.entries_per_round_trip
    assert scanned == {keyspace.events(shard) for shard in range(keyspace.shards)}


async def test_the_merge_recovery_pass_reads_the_shards_in_short_round_trips(
    monkeypatch: pytest.MonkeyPatch, redis: Redis, ledger: Ledger, keyspace: Keyspace
) -> None:
    for account in ("source", "target"):
        await ledger.create_account(account, f"card-{account}", f"open-{account}", fingerprint(f"open-{account}"))
    # A merge's first step alone, as a process killed right after it leaves it.
    await ledger._call(
        "merge_out", "source", {"target": "target", "merge": "m-1", "rid": "m-1", "actor": "a", "why": "w"}
    )
    trips = record_round_trips(monkeypatch, redis)
    assert await ledger.finish_merges() == 1
    assert await redis.zcard(keyspace.account("source").merges) == 0
    reads = [trip for trip in trips if _text(trip[0][0]).upper() == "ZRANGEBYSCORE"]
    assert max(len(trip) for trip in reads) <= KEYS_PER_ROUND_TRIP
    read = sorted(_text(args[1]) for trip in reads for args in trip)
    assert read == sorted(keyspace.merges(shard) for shard in range(keyspace.shards))


async def test_a_backlog_redis_cannot_count_is_counted_a_page_at_a_time(
    monkeypatch: pytest.MonkeyPatch, redis: Redis, keyspace: Keyspace
) -> None:
    stream = keyspace.events(1)
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(1_000):
            pipe.xadd(stream, {"e": str(n)})
        ids = await pipe.execute()
    await redis.xgroup_create(stream, GROUP, id="0")
    await redis.xreadgroup(GROUP, "worker", {stream: ">"}, count=100)
    # Moved by hand without ENTRIESREAD, as an operator rewinding it would: Redis no longer
    # knows how many entries the group has not been given.
    await redis.xgroup_setid(stream, GROUP, id=ids[99])
    assert (await redis.xinfo_groups(stream))[0]["lag"] is None
    trips = record_round_trips(monkeypatch, redis)
    [backlog] = await stream_backlogs(redis, [stream])
    assert (backlog.undelivered, backlog.pending, backlog.length) == (900, 100, 1_000)
    ranges = [args for trip in trips for args in trip if _text(args[0]).upper() == "XRANGE"]
    assert max(_read_count(args) for args in ranges) == COUNT_PAGE
    assert len(ranges) == 1 + 900 // COUNT_PAGE + 1  # the first entry, full pages, the last short one
