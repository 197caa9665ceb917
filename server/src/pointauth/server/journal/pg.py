"""PostgreSQL access for the write-behind: connections, and which errors are worth a retry.

asyncpg ships no type information, so it is imported here only and the rest of the package
sees the small typed surface below.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

import asyncpg


class Record(Protocol):
    def __getitem__(self, key: int | str) -> Any: ...


class Transaction(Protocol):
    async def __aenter__(self) -> Any: ...
    async def __aexit__(self, *exc: object) -> Any: ...


class Cursor(Protocol):
    async def fetch(self, n: int) -> list[Record]: ...


class Connection(Protocol):
    """The part of asyncpg.Connection the write-behind uses."""

    async def execute(self, query: str, *args: Any) -> str: ...
    async def executemany(self, command: str, args: Sequence[Sequence[Any]]) -> None: ...
    async def fetch(self, query: str, *args: Any) -> list[Record]: ...
    async def fetchrow(self, query: str, *args: Any) -> Record | None: ...
    async def fetchval(self, query: str, *args: Any) -> Any: ...
    async def copy_records_to_table(
        self, table_name: str, *, records: Sequence[tuple[Any, ...]], columns: Sequence[str]
    ) -> str: ...
    async def copy_to_table(self, table_name: str, *, source: Any, columns: Sequence[str], format: str) -> str: ...
    def transaction(self, *, isolation: str | None = None, readonly: bool = False) -> Transaction: ...
    def cursor(self, query: str, *args: Any) -> Awaitable[Cursor]: ...
    async def close(self) -> None: ...
    def terminate(self) -> None: ...
    def is_closed(self) -> bool: ...


PostgresError: type[Exception] = asyncpg.PostgresError
UniqueViolation: type[Exception] = asyncpg.UniqueViolationError

# Errors after which the same work succeeds on a new connection once the server is back: it is
# down, restarting, recovering or shutting down, the connection broke, or the transaction lost a
# race. The connection that raised one is to be thrown away, whatever state it was left in.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    # Refused, reset or timed out (TimeoutError is an OSError). Only asyncpg lets these through
    # unwrapped; redis-py raises its own ConnectionError / TimeoutError instead.
    OSError,
    # Using a connection that is closed or broken.
    asyncpg.InterfaceError,
    # A server ending a session (its postmaster killed, a shutdown, pg_terminate_backend) sends
    # a FATAL message first. On an idle connection asyncpg does not expect one: it waits, in an
    # error state, for a ReadyForQuery that never comes, and until it notices the socket close,
    # every statement fails with "cannot switch to state 15; another operation (2) is in progress".
    asyncpg.exceptions.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.FatalPostgresError,
    # Admin or crash shutdown, "the database system is starting up", idle session timeout.
    asyncpg.exceptions.OperatorInterventionError,
    # A standby still read-only, until a failover promotes it.
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.TransactionRollbackError,
    # Disk full, out of memory, too many connections; and I/O errors.
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.PostgresSystemError,
)
# InterfaceErrors that are mistakes in what we send: retrying would fail the same way forever.
# (asyncpg.exceptions.DataError is another class: PostgreSQL's SQLSTATE class 22.)
_CLIENT_MISTAKES: tuple[type[BaseException], ...] = (
    asyncpg.exceptions._base.DataError,
    asyncpg.exceptions.ClientConfigurationError,
    asyncpg.exceptions._base.UnsupportedClientFeatureError,
    asyncpg.exceptions._base.UnsupportedServerFeatureError,
)


def is_transient(exc: BaseException) -> bool:
    """Whether `exc`, raised by asyncpg, is PostgreSQL being unavailable (not a bug)."""
    return isinstance(exc, TRANSIENT_ERRORS) and not isinstance(exc, _CLIENT_MISTAKES)


async def connect(dsn: str, connect_timeout: float = 10.0) -> Connection:
    conn: Connection = await asyncpg.connect(dsn, timeout=connect_timeout)
    return conn


@asynccontextmanager
async def connection(dsn: str) -> AsyncIterator[Connection]:
    conn = await connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()
