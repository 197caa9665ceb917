"""Fixtures for the write-behind: a fresh PostgreSQL schema per test (migrated), a worker
running in this process, and a guard that leaves the session's Redis and PostgreSQL running
whatever a test did to them."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from pointauth.server.ledger import Keyspace, Ledger
from pointauth.server.stack import EmbeddedStack
from pointauth.server.writebehind import WorkerConfig, WriteBehindWorker, migrate
from pointauth.server.writebehind.pg import connection


@pytest.fixture(autouse=True)
def stack_guard(stack: EmbeddedStack) -> Iterator[None]:
    """Tests here kill and stop the servers: start them again if a test failed midway."""
    yield
    if stack.redis.proc is None or stack.redis.proc.poll() is not None:
        stack.redis.start()
    if stack.postgres.proc is None or stack.postgres.proc.poll() is not None:
        stack.postgres.start()


@pytest.fixture
async def dsn(stack: EmbeddedStack) -> AsyncIterator[str]:
    """A migrated schema of its own (asyncpg passes unknown DSN parameters as settings)."""
    schema = f"wb_{uuid.uuid4().hex[:12]}"
    async with connection(stack.postgres.dsn) as conn:
        await conn.execute(f"CREATE SCHEMA {schema}")
    scoped = f"{stack.postgres.dsn}?search_path={schema}"
    await migrate(scoped)
    yield scoped
    with contextlib.suppress(Exception):  # the server may be down if the test failed
        async with connection(stack.postgres.dsn) as conn:
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def keyspace(ledger: Ledger) -> Keyspace:
    return ledger.keyspace


FAST = WorkerConfig(
    consumer="test-worker",
    batch_size=200,
    poll_ms=10,
    claim_idle_ms=500,
    housekeeping_s=0.2,
    trim_s=0.2,
    backoff_initial_s=0.05,
    backoff_max_s=0.5,
)


@contextlib.asynccontextmanager
async def running_worker(
    redis_url: str, dsn: str, keyspace: Keyspace, config: WorkerConfig = FAST
) -> AsyncIterator[WriteBehindWorker]:
    """A worker in this process, on its own Redis client; stopped (and its errors raised) at exit."""
    async with worker_task(redis_url, dsn, keyspace, config) as (worker, _):
        yield worker


@contextlib.asynccontextmanager
async def worker_task(
    redis_url: str, dsn: str, keyspace: Keyspace, config: WorkerConfig = FAST
) -> AsyncIterator[tuple[WriteBehindWorker, asyncio.Task[None]]]:
    """`running_worker`, with the task running it: a test can see whether the worker is still alive."""
    redis = Redis.from_url(redis_url)
    worker = WriteBehindWorker(redis, dsn, keyspace, config)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield worker, task
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, 30)
        finally:
            await redis.aclose()
