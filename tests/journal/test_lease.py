"""At most one live write-behind worker applies a shard (journal/lease.py): a second worker for the
same shards waits until the first stops or its lease lapses, and a worker whose lease was taken
stops applying until it has it again."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import pytest
from redis.asyncio import Redis

from pointauth.server.clock import ManualClock
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.journal.lease import ShardLease
from pointauth.server.ledger import Keyspace, Ledger
from tests.journal.support import (
    DAY_MS,
    FAST,
    TILL,
    assert_journal_complete,
    fingerprint,
    running_worker,
    wait_until_applied,
    worker_task,
)

WORKER_LOG = "pointauth.server.journal.worker"


async def earn_on(ledger: Ledger, clock: ManualClock, accounts: list[str], earns: int, tag: str) -> None:
    async def one(account: str) -> None:
        for n in range(earns):
            rid = f"{account}-{tag}-{n}"
            await ledger.earn(
                account, points=10, expire_ms=clock.now_ms() + 30 * DAY_MS, kind="R", pos=TILL,
                request_id=rid, fingerprint=fingerprint(rid),
            )  # fmt: skip

    await asyncio.gather(*(one(account) for account in accounts))


async def open_accounts(ledger: Ledger, accounts: list[str]) -> None:
    for account in accounts:
        await ledger.create_account(account, f"card-{account}", f"open-{account}", fingerprint(f"open-{account}"))


def messages(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == WORKER_LOG and needle in r.getMessage()]


async def test_a_second_worker_for_the_same_shards_waits_and_takes_over_when_the_first_stops(
    stack: EmbeddedStack,
    redis: Redis,
    ledger: Ledger,
    clock: ManualClock,
    keyspace: Keyspace,
    dsn: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The user check that found it: two workers on one stack, and a burst. Without the lease they
    split the accounts' events and held each other's back as gaps, for minutes."""
    accounts = [f"member-{i}" for i in range(6)]
    await open_accounts(ledger, accounts)
    caplog.set_level(logging.INFO, logger=WORKER_LOG)
    second = dataclasses.replace(FAST, consumer="second-worker")
    async with running_worker(stack.redis.url, dsn, keyspace):
        await holder_is(redis, keyspace, "test-worker")  # the first worker started first
        async with worker_task(stack.redis.url, dsn, keyspace, second) as (standby, _):
            await earn_on(ledger, clock, accounts, earns=40, tag="a")
            await wait_until_applied(redis, dsn, keyspace, accounts)
            assert standby.applied_total == 0  # it never read a stream
            waiting = messages(caplog, "applies some of these shards")
            assert waiting == [
                "write-behind: worker test-worker (lease 1/0) applies some of these shards (lease 1/0 wanted); "
                "waiting until it stops, or for 15.0 s after its last renewal if it died"
            ]
            await asyncio.sleep(0)
        # The standby stopped while waiting: it took nothing, and the first kept its lease.
        holder = await ShardLease(redis, keyspace, 0, 1, "someone-else", 1000).take()
        assert holder is not None
        assert (holder.consumer, holder.lease) == ("test-worker", "1/0")
        assert 14_000 < holder.remaining_ms <= 15_000  # renewed each housekeeping (0.2 s here)
    # The first stopped and gave its lease back: the next worker starts at once.
    async with running_worker(stack.redis.url, dsn, keyspace, second) as taker:
        await earn_on(ledger, clock, accounts, earns=40, tag="b")
        await wait_until_applied(redis, dsn, keyspace, accounts)
        assert taker.applied_total == 6 * 40
    assert messages(caplog, "holding back") == []
    assert await assert_journal_complete(redis, dsn, keyspace, accounts) == 6 * 81


async def holder_is(redis: Redis, keyspace: Keyspace, consumer: str) -> None:
    """Until lease 1/0 is `consumer`'s (a worker task takes it once it runs)."""
    for _ in range(200):
        value = await redis.hget(keyspace.worker_leases(), "1/0")
        text = value.decode() if isinstance(value, bytes) else value
        if text is not None and text.split(" ", 1)[1] == consumer:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"lease 1/0 is not {consumer}'s: {value!r}")


async def test_a_lease_lapses_without_renewal_and_other_counts_are_refused(redis: Redis, keyspace: Keyspace) -> None:
    first = ShardLease(redis, keyspace, 0, 2, "w-a", lease_ms=300)
    assert await first.take() is None
    assert await first.take() is None  # the same consumer takes its own lease back (a restart)
    # Another consumer: the same lease, and any lease of another count, overlap it.
    for index, count in [(0, 2), (0, 1), (2, 4)]:
        holder = await ShardLease(redis, keyspace, index, count, "w-b", lease_ms=300).take()
        assert holder is not None
        assert (holder.consumer, holder.lease) == ("w-a", "2/0")
        assert 0 < holder.remaining_ms <= 300
    # The other index of the same count does not overlap.
    assert await ShardLease(redis, keyspace, 1, 2, "w-c", lease_ms=300).take() is None
    await asyncio.sleep(0.4)  # no renewal: it lapses
    taker = ShardLease(redis, keyspace, 0, 2, "w-b", lease_ms=300)
    assert await taker.take() is None
    assert await first.renew() is False  # taken: the first may not renew it, nor give it back
    await first.release()
    assert await taker.renew() is True
    await taker.release()
    # Given back, and w-c's lapsed lease was cleared by the take that followed it.
    assert await redis.hkeys(keyspace.worker_leases()) == []


async def test_a_worker_whose_lease_was_taken_stops_applying_until_it_has_it_again(
    stack: EmbeddedStack,
    redis: Redis,
    ledger: Ledger,
    clock: ManualClock,
    keyspace: Keyspace,
    dsn: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    accounts = [f"member-{i}" for i in range(4)]
    await open_accounts(ledger, accounts)
    caplog.set_level(logging.INFO, logger=WORKER_LOG)
    async with running_worker(stack.redis.url, dsn, keyspace) as worker:
        await wait_until_applied(redis, dsn, keyspace, accounts)
        # As if this worker had stalled past its lease and another had taken the shards.
        await redis.hset(keyspace.worker_leases(), "1/0", "99999999999999 intruder")
        for _ in range(100):
            if messages(caplog, "lapsed and was taken"):
                break
            await asyncio.sleep(0.05)
        applied = worker.applied_total
        await earn_on(ledger, clock, accounts, earns=5, tag="while-taken")
        await asyncio.sleep(10 * FAST.poll_ms / 1000)
        assert worker.applied_total == applied  # it applies nothing while another holds the shards
        await redis.hdel(keyspace.worker_leases(), "1/0")  # the intruder stops
        await wait_until_applied(redis, dsn, keyspace, accounts)
    assert messages(caplog, "lapsed and was taken") == [
        "write-behind: lease 1/0 of worker test-worker lapsed and was taken; waiting for the shards again"
    ]
    assert messages(caplog, "now holds lease") == ["write-behind: worker test-worker now holds lease 1/0"]
    assert await assert_journal_complete(redis, dsn, keyspace, accounts) == 4 * 6
