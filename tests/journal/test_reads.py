"""What the worker asks of Redis while it drains a backlog, seen through Redis's own SLOWLOG
(every command logged, with its arguments): reads name only streams that have entries and ask
for no more than they hold, and the idempotency records reach PostgreSQL from the stream entries
with the expiry their keys have. How long the commands take is for the write-behind benchmark
(`loadtest/writebehind_bench.py` prints the SLOWLOG over 1 ms): on two shared cores a command's
wall time includes preemption, so a test cannot judge it."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from redis.asyncio import Redis

from pointauth.server.clock import ManualClock
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.journal.pg import connection
from pointauth.server.ledger import Keyspace, Ledger, LedgerRefusal
from tests.journal.support import DAY_MS, FAST, TILL, assert_journal_complete, fingerprint, redis_seqs, running_worker

SHARDS_WITH_ENTRIES = {3, 7, 11}  # of the tests' 16
EVENTS = 20_000


async def write_backlog(ledger: Ledger, clock: ManualClock, accounts: list[str]) -> set[str]:
    """EVENTS events (openings, earns) and a few refusals over `accounts`; returns the request ids."""
    rids: set[str] = set()
    for account in accounts:
        rid = f"open-{account}"
        await ledger.create_account(account, f"card-{account}", rid, fingerprint(rid))
        rids.add(rid)
    per_till = (EVENTS - len(accounts)) // 20

    async def till(n: int) -> None:
        for i in range(per_till):
            account = accounts[(n + i) % len(accounts)]
            rid = f"t{n}-{i}"
            rids.add(rid)
            if i % 100 == 99:  # a refusal: its note carries the record
                try:
                    await ledger.redeem(account, points=10**9, pos=TILL, request_id=rid, fingerprint=fingerprint(rid))
                except LedgerRefusal:
                    continue
            exp = clock.now_ms() + 30 * DAY_MS
            await ledger.earn(
                account, points=5, expire_ms=exp, kind="R", pos=TILL, request_id=rid, fingerprint=fingerprint(rid)
            )

    await asyncio.gather(*(till(n) for n in range(20)))
    return rids


async def applied_events(dsn: str) -> int:
    async with connection(dsn) as conn:
        return int(await conn.fetchval("SELECT coalesce(sum(applied_events), 0) FROM stream_positions"))


def _args(entry: dict[str, Any]) -> list[bytes]:
    command = entry["command"]
    return list(command.split() if isinstance(command, bytes) else command.encode().split())


async def test_a_drain_reads_only_streams_with_entries(
    stack: EmbeddedStack, redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace, dsn: str
) -> None:
    # 200 accounts on three of the 16 shards: the other 13 streams stay empty.
    accounts = [a for a in (f"m-{i}" for i in range(2000)) if keyspace.shard_of(a) in SHARDS_WITH_ENTRIES][:200]
    rids = await write_backlog(ledger, clock, accounts)
    streams = {keyspace.events(shard) for shard in SHARDS_WITH_ENTRIES}
    entries = sum([await redis.xlen(stream) for stream in streams])
    events = sum((await redis_seqs(redis, keyspace, accounts)).values())
    assert events >= EVENTS - 500

    await redis.config_set("slowlog-log-slower-than", 0)
    await redis.config_set("slowlog-max-len", 1_000_000)
    await redis.slowlog_reset()
    try:
        async with running_worker(stack.redis.url, dsn, keyspace, dataclasses.replace(FAST, batch_size=1000)):
            # Waits on PostgreSQL alone: only the worker's commands are in the SLOWLOG.
            for _ in range(1200):
                if await applied_events(dsn) >= events:
                    break
                await asyncio.sleep(0.1)
        log: list[dict[str, Any]] = await redis.slowlog_get(1_000_000)
    finally:
        await redis.config_set("slowlog-log-slower-than", 10_000)
        await redis.config_set("slowlog-max-len", 128)

    reads = [_args(e) for e in log if _args(e)[0].upper() == b"XREADGROUP"]
    assert reads
    named: list[bytes] = []
    asked = 0
    for args in reads:
        keys = args[args.index(b"STREAMS") + 1 :]
        assert len(keys) == 2, args  # one stream, one id
        named.append(keys[0])
        asked += int(args[args.index(b"COUNT") + 1])
    assert {name.decode() for name in named} <= streams
    # Each read asked for no more than its stream held: together exactly the entries there were,
    # so no read came back empty or short.
    assert asked == entries

    async with connection(dsn) as conn:
        rows = await conn.fetch(
            "SELECT account_id, request_id, (extract(epoch FROM expires_at) * 1000)::bigint AS ms"
            " FROM idempotency_records"
        )
    await assert_journal_complete(redis, dsn, keyspace, accounts)
    assert {r["request_id"] for r in rows} == rids
    async with redis.pipeline(transaction=False) as pipe:
        for r in rows:
            pipe.pexpiretime(keyspace.idempotency(r["account_id"], r["request_id"]))
        expiry: list[int] = await pipe.execute()
    assert [r["ms"] for r in rows] == expiry
