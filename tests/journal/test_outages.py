"""The worker rides out crashes of either store, again and again: PostgreSQL and redis-server
are killed with SIGKILL under steady till traffic and restarted on the same port. The worker
task stays alive throughout, names the store that failed, and afterwards the journal holds
every acknowledged event exactly once."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError

from pointauth.server.clock import ManualClock
from pointauth.server.devstack.stack import EmbeddedStack, PostgresServer
from pointauth.server.journal import WriteBehindWorker
from pointauth.server.journal.outage import failed_store
from pointauth.server.journal.pg import connection
from pointauth.server.ledger import Keyspace, Ledger
from pointauth.server.ops import reconcile
from tests.journal.support import (
    Traffic,
    assert_acknowledged_journaled,
    assert_balances_match,
    assert_journal_complete,
    wait_until_applied,
    worker_task,
)

ACCOUNTS = [f"member-{i}" for i in range(10)]
POSTGRES_DOWN = "PostgreSQL unavailable"
REDIS_DOWN = "Redis unavailable"


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie no longer does: it holds no shared memory)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # exited meanwhile
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def kill_postgres(server: PostgresServer) -> None:
    """SIGKILL to the postmaster, as a crash (`server.kill` is pg_ctl's orderly immediate stop).

    Its orphaned backends exit once they notice, and PostgreSQL refuses to start again while any
    of them still holds the old shared memory: the restart waits for them.
    """
    assert server.proc is not None
    postmaster = int((server.data_dir / "pgdata" / "postmaster.pid").read_text().split()[0])
    orphans = _children(postmaster)
    os.kill(postmaster, signal.SIGKILL)
    server.proc.wait(10)  # as root, the runuser that started it, which exits with it
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in orphans):
        assert time.monotonic() < deadline, f"PostgreSQL processes {orphans} outlived their postmaster"
        time.sleep(0.02)


async def _until(condition: Callable[[], bool], what: str, worker: asyncio.Task[None], within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        if worker.done():
            raise AssertionError(f"the worker stopped while waiting until {what}") from worker.exception()
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.01)


async def _tills(traffic: Traffic, stop: asyncio.Event, tills: int = 4) -> None:
    """Steady traffic until `stop`; each till retries through Redis outages with the same request id."""

    async def till(n: int) -> None:
        rng = random.Random(n)
        while not stop.is_set():
            await traffic.one(rng)

    await asyncio.gather(*(till(n) for n in range(tills)))


class _Outages:
    """Crashes a store under load and restarts it; records what the worker logged meanwhile."""

    def __init__(self, worker: WriteBehindWorker, task: asyncio.Task[None], caplog: pytest.LogCaptureFixture) -> None:
        self.worker, self.task, self.caplog = worker, task, caplog
        self.reported: dict[str, list[str]] = {"PostgreSQL": [], "Redis": []}

    async def _applying(self, when: str) -> None:
        """Until the worker has applied a few more events (from now on)."""
        start = self.worker.applied_total
        await _until(lambda: self.worker.applied_total >= start + 20, f"the worker applies events {when}", self.task)

    def _outages_logged(self, since: int) -> list[str]:
        messages = (r.getMessage() for r in self.caplog.records[since:])
        return [m for m in messages if POSTGRES_DOWN in m or REDIS_DOWN in m]

    async def crash(self, store: str, kill: Callable[[], None], start: Callable[[], object]) -> None:
        await self._applying(f"before {store} is killed")
        since = len(self.caplog.records)
        await asyncio.to_thread(kill)
        # Restarted only once the worker has met the dead store twice: on the connection it had,
        # then trying a new one.
        await _until(lambda: len(self._outages_logged(since)) >= 2, f"the worker meets {store} down", self.task)
        start()  # from this thread: a store is tied to the thread that starts it (stack.py)
        await self._applying(f"after {store} is back")
        self.reported[store] += self._outages_logged(since)


async def test_worker_survives_repeated_crashes_of_postgres_and_redis(
    stack: EmbeddedStack,
    redis: Redis,
    ledger: Ledger,
    clock: ManualClock,
    keyspace: Keyspace,
    dsn: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="pointauth.server.journal")
    traffic = Traffic(ledger, clock, ACCOUNTS, retry_connection_errors=True)
    await traffic.open_accounts()
    stop = asyncio.Event()
    async with worker_task(stack.redis.url, dsn, keyspace) as (worker, task):
        load = asyncio.create_task(_tills(traffic, stop))
        try:
            outages = _Outages(worker, task, caplog)
            for store in ["PostgreSQL", "PostgreSQL", "Redis", "PostgreSQL", "Redis"]:
                if store == "PostgreSQL":
                    await outages.crash(store, lambda: kill_postgres(stack.postgres), stack.postgres.start)
                else:
                    await outages.crash(store, stack.redis.kill, stack.redis.start)
        finally:
            stop.set()
            await load
        # The test's own client: its pooled connections died with Redis and it has no retry (the
        # server's client, connect(), replaces them; the tills' traffic used to, on this pool).
        await redis.connection_pool.disconnect()
        await wait_until_applied(redis, dsn, keyspace, ACCOUNTS, within_s=60)
        assert not task.done()

    # Every outage was reported, and under the name of the store that failed.
    assert outages.reported["PostgreSQL"]
    assert [m for m in outages.reported["PostgreSQL"] if not m.startswith(f"write-behind: {POSTGRES_DOWN} (")] == []
    assert outages.reported["Redis"]
    assert [m for m in outages.reported["Redis"] if not m.startswith(f"write-behind: {REDIS_DOWN} (")] == []
    await assert_journal_complete(redis, dsn, keyspace, ACCOUNTS)
    await assert_acknowledged_journaled(traffic, dsn)
    await assert_balances_match(ledger, dsn, ACCOUNTS)
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).differences == []


class _LingeringProxy:
    """A TCP relay to PostgreSQL that, when the server closes a connection, keeps the client's
    side open for a moment: the client has read the server's last message but not yet the end of
    the connection. A real server's FATAL goodbye opens the same window, only narrower."""

    LINGER_S = 2.0

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.upstream_ports: set[int] = set()  # our side of each connection to PostgreSQL
        self._relays: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> _LingeringProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port: int = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for relay in self._relays:
            relay.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)
        await self._server.wait_closed()

    def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        relay = asyncio.create_task(self._relay(client_r, client_w))
        self._relays.add(relay)
        relay.add_done_callback(self._relays.discard)

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.upstream_ports.add(server_w.get_extra_info("sockname")[1])
        upstream = asyncio.create_task(_pump(client_r, server_w))
        try:
            await _pump(server_r, client_w)
            # The server is gone; the client learns it once it closes, or when we stop waiting.
            await asyncio.wait({upstream}, timeout=self.LINGER_S)
        finally:
            upstream.cancel()
            for writer in (client_w, server_w):
                writer.close()
            await asyncio.gather(upstream, client_w.wait_closed(), server_w.wait_closed(), return_exceptions=True)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass


async def test_worker_survives_a_fatal_message_on_its_idle_connection(
    stack: EmbeddedStack,
    redis: Redis,
    ledger: Ledger,
    clock: ManualClock,
    keyspace: Keyspace,
    dsn: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """PostgreSQL ends a session with a FATAL message (here pg_terminate_backend; also when its
    postmaster dies). The worker, between batches, uses the connection before it sees it close."""
    caplog.set_level(logging.WARNING, logger="pointauth.server.journal")
    traffic = Traffic(ledger, clock, ACCOUNTS[:4])
    await traffic.open_accounts()
    async with _LingeringProxy(stack.postgres.port) as proxy:
        proxied = dsn.replace(f":{stack.postgres.port}/", f":{proxy.port}/")
        async with worker_task(stack.redis.url, proxied, keyspace) as (_, task):
            await wait_until_applied(redis, dsn, keyspace, ACCOUNTS[:4])
            async with connection(dsn) as conn:
                ended = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE client_port = ANY($1::int[])"
                    " AND pg_terminate_backend(pid)",
                    sorted(proxy.upstream_ports),
                )
            assert ended == 1
            await _until(lambda: any(POSTGRES_DOWN in r.getMessage() for r in caplog.records), "it fails", task)
            await traffic.run(100)
            await wait_until_applied(redis, dsn, keyspace, ACCOUNTS[:4])
            assert not task.done()
    messages = [r.getMessage() for r in caplog.records if POSTGRES_DOWN in r.getMessage()]
    assert messages[0].startswith(f"write-behind: {POSTGRES_DOWN} (InternalClientError: "), messages
    await assert_journal_complete(redis, dsn, keyspace, ACCOUNTS[:4])


@pytest.mark.parametrize(
    ("error", "store"),
    [
        (ConnectionRefusedError(111, "Connect call failed"), "PostgreSQL"),
        (asyncpg.exceptions.InternalClientError("cannot switch to state 15; another operation (2) is in progress"),
         "PostgreSQL"),
        (asyncpg.exceptions.CannotConnectNowError("the database system is starting up"), "PostgreSQL"),
        (asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
         "PostgreSQL"),
        (asyncpg.exceptions.InterfaceError("connection is closed"), "PostgreSQL"),
        (RedisConnectionError("Connection closed by server."), "Redis"),
        (BusyLoadingError("Redis is loading the dataset in memory"), "Redis"),
        (asyncpg.exceptions.UndefinedTableError('relation "journal" does not exist'), None),
        (asyncpg.exceptions._base.DataError("invalid input for query argument $1"), None),
        (ValueError("a bug"), None),
    ],
)  # fmt: skip
def test_outages_are_told_apart_from_bugs_and_by_store(error: BaseException, store: str | None) -> None:
    assert failed_store(error) == store
