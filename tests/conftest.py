"""Fixtures: a real redis-server and a real PostgreSQL for the session, started from this
machine's binaries on free loopback ports; a ledger and an in-process gRPC server per test."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from pointauth.server.clock import ManualClock
from pointauth.server.config import LedgerSettings
from pointauth.server.ledger import Keyspace, Ledger
from pointauth.server.stack import EmbeddedStack

# A fixed, recent instant: tests move the clock instead of sleeping.
START_MS = 1_795_000_000_000


@pytest.fixture(scope="session")
def stack() -> Iterator[EmbeddedStack]:
    data_dir = Path(tempfile.mkdtemp(prefix="pointauth-test-"))
    data_dir.chmod(0o755)
    try:
        with EmbeddedStack(data_dir) as running:
            yield running
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
async def redis(stack: EmbeddedStack) -> AsyncIterator[Redis]:
    client = Redis.from_url(stack.redis.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START_MS)


@pytest.fixture
def ledger_settings() -> LedgerSettings:
    return LedgerSettings(shards=16)


@pytest.fixture
def ledger(redis: Redis, clock: ManualClock, ledger_settings: LedgerSettings) -> Ledger:
    return Ledger(redis, Keyspace(ledger_settings.shards), clock, ledger_settings)
