"""Crashes and outages with real processes: a worker killed mid-batch, PostgreSQL stopped during
traffic, redis-server killed during traffic. Afterwards the journal is complete, nothing is
doubled, and reconcile passes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from redis.asyncio import Redis

from pointauth.server.clock import ManualClock
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.ledger import Keyspace, Ledger
from pointauth.server.ops import reconcile
from tests.journal.support import (
    Traffic,
    assert_acknowledged_journaled,
    assert_balances_match,
    assert_journal_complete,
    running_worker,
    wait_until_applied,
)

ACCOUNTS = [f"member-{i}" for i in range(10)]
GROUP = "pointauth-writebehind"


@contextmanager
def worker_process(stack: EmbeddedStack, dsn: str, consumer: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`pointauth worker` as its own process (small batches), configured as operators do."""
    command = [sys.executable, "-m", "pointauth.server.cli", "worker", "--consumer", consumer]
    env = {
        **os.environ,
        "POINTAUTH__REDIS__URL": stack.redis.url,
        "POINTAUTH__POSTGRES__DSN": dsn,
        "POINTAUTH__LEDGER__SHARDS": "16",
        "POINTAUTH__WRITEBEHIND__BATCH_SIZE": "40",
        "POINTAUTH__WRITEBEHIND__CLAIM_IDLE_MS": "500",
        "POINTAUTH__WRITEBEHIND__LEASE_MS": "1000",
    }
    with log.open("ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


def _text(log: Path) -> str:
    return log.read_text()  # a small file, read while waiting anyway


async def pending_entries(redis: Redis, keyspace: Keyspace) -> int:
    """Entries delivered to a worker and not yet acknowledged, over every shard stream."""
    async with redis.pipeline(transaction=False) as pipe:
        for shard in range(keyspace.shards):
            pipe.xpending(keyspace.events(shard), GROUP)
        replies = await pipe.execute(raise_on_error=False)
    return sum(int(r["pending"]) for r in replies if isinstance(r, dict))


async def test_worker_killed_mid_batch_resumes_without_loss_or_duplicates(
    stack: EmbeddedStack,
    redis: Redis,
    ledger: Ledger,
    clock: ManualClock,
    keyspace: Keyspace,
    dsn: str,
    tmp_path: Path,
) -> None:
    traffic = Traffic(ledger, clock, ACCOUNTS)
    await traffic.open_accounts()
    load = asyncio.create_task(traffic.run(1600, tills=4))
    try:
        await _kill_and_restart_workers(stack, redis, keyspace, dsn, tmp_path / "worker.log", load)
    finally:
        load.cancel()
    await assert_journal_complete(redis, dsn, keyspace, ACCOUNTS)
    await assert_acknowledged_journaled(traffic, dsn)
    await assert_balances_match(ledger, dsn, ACCOUNTS)
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).differences == []
    assert (tmp_path / "worker.log").read_text().count("write-behind worker w2:") == 2


async def _kill_and_restart_workers(
    stack: EmbeddedStack, redis: Redis, keyspace: Keyspace, dsn: str, log: Path, load: asyncio.Task[None]
) -> None:
    with worker_process(stack, dsn, "w1", log) as first:
        # Kill it while it holds delivered, unacknowledged entries: in the middle of a batch.
        deadline = time.monotonic() + 20
        while await pending_entries(redis, keyspace) == 0:
            assert time.monotonic() < deadline, _text(log)
            await asyncio.sleep(0.002)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
    assert await pending_entries(redis, keyspace) > 0  # left behind by the dead worker
    # A new consumer name: the dead one's entries come back only through XAUTOCLAIM.
    with worker_process(stack, dsn, "w2", log) as second:
        deadline = time.monotonic() + 20
        while "claimed" not in _text(log):
            assert time.monotonic() < deadline, _text(log)
            await asyncio.sleep(0.01)
        os.kill(second.pid, signal.SIGKILL)  # and once more, restarted under the same name
        second.wait(10)
    with worker_process(stack, dsn, "w2", log) as third:
        await load
        await wait_until_applied(redis, dsn, keyspace, ACCOUNTS, within_s=60)
        assert await pending_entries(redis, keyspace) == 0
        # As operators run it, the worker works in the idle CPU class (journal/priority.py).
        if hasattr(os, "SCHED_IDLE"):
            assert os.sched_getscheduler(third.pid) == os.SCHED_IDLE


async def test_postgres_outage_during_traffic_drains_on_recovery(
    stack: EmbeddedStack, redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace, dsn: str
) -> None:
    traffic = Traffic(ledger, clock, ACCOUNTS)
    await traffic.open_accounts()
    async with running_worker(stack.redis.url, dsn, keyspace):
        await traffic.run(300)
        stack.postgres.stop()
        try:
            # Tills keep being answered from Redis while PostgreSQL is down.
            before = len(traffic.acknowledged)
            await traffic.run(600)
            assert len(traffic.acknowledged) > before + 300
        finally:
            stack.postgres.start()
        await traffic.run(200)
        await wait_until_applied(redis, dsn, keyspace, ACCOUNTS, within_s=60)
    await assert_journal_complete(redis, dsn, keyspace, ACCOUNTS)
    await assert_acknowledged_journaled(traffic, dsn)
    await assert_balances_match(ledger, dsn, ACCOUNTS)
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).differences == []


async def test_redis_killed_during_traffic_keeps_every_acknowledged_operation(
    stack: EmbeddedStack, redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace, dsn: str
) -> None:
    traffic = Traffic(ledger, clock, ACCOUNTS, retry_connection_errors=True)
    await traffic.open_accounts()
    async with running_worker(stack.redis.url, dsn, keyspace):
        load = asyncio.create_task(traffic.run(1200, tills=4))
        try:
            await asyncio.sleep(0.5)
            acknowledged_before_crash = set(traffic.acknowledged)
            stack.redis.kill()  # SIGKILL; AOF with fsync on every write
            try:
                await asyncio.sleep(0.5)
            finally:
                stack.redis.start()
            await load  # the tills retry what was in flight, with the same request ids
        finally:
            load.cancel()
        # Pooled connections that sat idle through the kill still point at the dead server, and
        # the next command on one fails once; the tills retried theirs, this check would not.
        await redis.connection_pool.disconnect()
        await wait_until_applied(redis, dsn, keyspace, ACCOUNTS, within_s=60)
    assert len(acknowledged_before_crash) > 50
    await assert_journal_complete(redis, dsn, keyspace, ACCOUNTS)
    await assert_acknowledged_journaled(traffic, dsn)
    await assert_balances_match(ledger, dsn, ACCOUNTS)
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).differences == []
