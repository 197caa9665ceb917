"""Fixtures: a real redis-server and a real PostgreSQL for the session, started from this
machine's binaries on free loopback ports (and started again if a test stopped them); a ledger
and an in-process gRPC server per test; a migrated PostgreSQL schema of its own per test."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from redis.asyncio import Redis

from pointauth.client import Channel, PointOfSale, PointsClient
from pointauth.server.app import PointauthServer
from pointauth.server.clock import ManualClock
from pointauth.server.config import (
    AuthSettings,
    LedgerSettings,
    PostgresSettings,
    RedisSettings,
    ServerSettings,
    Settings,
    TLSSettings,
)
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.domain.group import Company, Entry, Refusal, Store, Terminal
from pointauth.server.journal import migrate
from pointauth.server.journal.pg import connection
from pointauth.server.ledger import Keyspace, Ledger
from pointauth.server.ledger.directory import DirectoryStore

# A fixed, recent instant: tests move the clock instead of sleeping.
START_MS = 1_795_000_000_000
MIGRATED_AFTER_DAYS = 200


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
def keyspace(ledger_settings: LedgerSettings) -> Keyspace:
    """The tests' key names (16 shards), shared by the ledger, the server's settings and helpers."""
    return Keyspace(ledger_settings.shards)


@pytest.fixture
def ledger(redis: Redis, clock: ManualClock, keyspace: Keyspace, ledger_settings: LedgerSettings) -> Ledger:
    return Ledger(redis, keyspace, clock, ledger_settings)


@pytest.fixture
def settings(stack: EmbeddedStack, ledger_settings: LedgerSettings) -> Settings:
    """Plaintext and no auth: these tests are about what calls do, and their one client acts as
    till and operator at once, which no credential may. Access control is tested over TLS and
    mTLS in tests/api/test_access.py, with a server of its own (`secured_settings`)."""
    return Settings(
        server=ServerSettings(port=0, grace_seconds=2.0),
        redis=RedisSettings(url=stack.redis.url),
        postgres=PostgresSettings(dsn=stack.postgres.dsn),
        ledger=ledger_settings,
        tls=TLSSettings(plaintext=True),
        auth=AuthSettings(enabled=False),
    )


# The group directory of the tests' points of sale (STORE, and the partner's kiosk of
# tests/api/test_points_api.py): servers refuse points of sale it lacks.
GROUP: tuple[Entry, ...] = (
    Company("acme", "Acme Retail"),
    Company("partner", "Partner Foods"),
    Store("store-1", "acme", "kanto", "Acme Shinjuku"),
    Store("store-9", "partner", "kansai", "Partner Umeda"),
    Terminal("store-1", "till-1", "Till 1"),
    Terminal("store-9", "kiosk-1", "Kiosk 1"),
)


async def register(redis: Redis, keyspace: Keyspace, clock: ManualClock, entries: tuple[Entry, ...]) -> None:
    """Registers entries as GroupService does (a server started later loads them)."""
    store = DirectoryStore(redis, keyspace, clock)
    for entry in entries:
        registered = await store.register(entry)
        assert not isinstance(registered, Refusal), registered


@pytest.fixture
async def group(redis: Redis, keyspace: Keyspace, clock: ManualClock) -> tuple[Entry, ...]:
    """GROUP, registered before any server starts."""
    await register(redis, keyspace, clock, GROUP)
    return GROUP


@pytest.fixture
async def server(
    settings: Settings, clock: ManualClock, redis: Redis, group: tuple[Entry, ...]
) -> AsyncIterator[PointauthServer]:
    # No background sweeper: tests resolve expiry explicitly, so nothing races the assertions.
    async with PointauthServer(settings, clock, sweeper=False) as running:
        yield running


@pytest.fixture
async def client(server: PointauthServer) -> AsyncIterator[PointsClient]:
    async with PointsClient(f"127.0.0.1:{server.port}", plaintext=True) as connected:
        yield connected


STORE = PointOfSale(company_id="acme", store_id="store-1", terminal_id="till-1", channel=Channel.CHANNEL_STORE)
CARD = "4000000000000001"


@pytest.fixture
async def member(client: PointsClient, clock: ManualClock) -> str:
    """A member with card CARD and 1,000 regular points expiring in 30 days; returns the card."""
    await client.create_account("member-1", CARD)
    await client.grant_points(CARD, 1000, at(clock.now_ms() + 30 * DAY_MS), STORE)
    return CARD


DAY_MS = 86_400_000


def at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


@pytest.fixture(autouse=True)
def stack_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    """Some tests kill and stop the servers: start them again if a test failed midway. Tests
    that use neither (the pure unit tests) start nothing."""
    if "stack" not in request.fixturenames:
        yield
        return
    stack: EmbeddedStack = request.getfixturevalue("stack")
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
    # Partitions made as on a day months after the tests' clock (START_MS): a test whose rows
    # would land only in partitions made for today's real date fails now, not once the calendar
    # has moved on (the worker makes its events' months itself).
    await migrate(scoped, today=at(START_MS + MIGRATED_AFTER_DAYS * DAY_MS))
    yield scoped
    with contextlib.suppress(Exception):  # the server may be down if the test failed
        async with connection(stack.postgres.dsn) as conn:
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")
