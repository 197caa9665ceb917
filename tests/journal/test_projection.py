"""The PostgreSQL projections copy what the events carry: every transaction record PostgreSQL
builds equals, field for field, the one the ledger script stored in Redis, and an event that does
not carry what the script derived (one from an older script) is never projected."""

from __future__ import annotations

import msgspec
from redis.asyncio import Redis

from pointauth.server.clock import ManualClock
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.journal.pg import connection
from pointauth.server.journal.writer import record_from_row
from pointauth.server.ledger import Keyspace, Ledger, codec
from pointauth.server.ops import reconcile
from tests.journal.support import Traffic, every_kind, fingerprint, running_worker, wait_until_applied

ACCOUNTS = [f"member-{i}" for i in range(6)]


async def _records(redis: Redis, dsn: str, keyspace: Keyspace, account: str) -> tuple[dict[int, object], ...]:
    """(Redis's records, PostgreSQL's records) of the account, by seq."""
    raw: dict[bytes, bytes] = await redis.hgetall(keyspace.account(account).transactions)  # type: ignore[assignment]
    async with connection(dsn) as conn:
        rows = await conn.fetch("SELECT * FROM transactions WHERE account_id = $1", account)
    return (
        {int(seq): codec.decode_record(packed) for seq, packed in raw.items()},
        {r["seq"]: record_from_row(r) for r in rows},
    )


async def test_every_projected_record_is_the_one_redis_stores(
    stack: EmbeddedStack, redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace, dsn: str
) -> None:
    await every_kind(ledger, clock, "every-kind")
    traffic = Traffic(ledger, clock, ACCOUNTS)
    await traffic.open_accounts()
    await traffic.run(400)
    async with running_worker(stack.redis.url, dsn, keyspace):
        await wait_until_applied(redis, dsn, keyspace, ["every-kind", *ACCOUNTS])
    for account in ["every-kind", *ACCOUNTS]:
        in_redis, in_postgres = await _records(redis, dsn, keyspace, account)
        assert in_postgres == in_redis, account
    every, _ = await _records(redis, dsn, keyspace, "every-kind")
    assert sorted(every) == [2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 15]  # every record every_kind made
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).differences == []


async def test_an_event_without_what_the_script_derived_is_dead_lettered(
    stack: EmbeddedStack, redis: Redis, ledger: Ledger, keyspace: Keyspace, dsn: str
) -> None:
    await ledger.create_account("carol", "card-carol", "open-carol", fingerprint("open-carol"))
    # An EARN as a script before events carried their balance wrote it.
    older = msgspec.msgpack.encode(
        {"type": "EARN", "seq": 2, "account": "carol", "time": 1, "pts": 5, "lots": [[2, 5, 10**13, "R", "acme"]]}
    )
    stream = keyspace.account("carol").events
    await redis.xadd(stream, {"e": older})
    async with running_worker(stack.redis.url, dsn, keyspace):
        await wait_until_applied(redis, dsn, keyspace, ["carol"])
    async with connection(dsn) as conn:
        dead = await conn.fetch("SELECT stream, reason, payload FROM dead_letters")
        lots = await conn.fetchval("SELECT count(*) FROM lots WHERE account_id = 'carol'")
    assert [(r["stream"], r["payload"]) for r in dead] == [(stream, older)]
    assert dead[0]["reason"].endswith("Object missing required field `available`")
    assert lots == 0
