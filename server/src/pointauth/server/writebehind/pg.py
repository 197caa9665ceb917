"""PostgreSQL access for the write-behind: connections, and which errors are worth a retry.

asyncpg ships no type information, so it is imported here only and the rest of the package
sees the small typed surface below.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

import asyncpg


class Record(Protocol):
    def __getitem__(self, key: int | str) -> Any: ...


class Transaction(Protocol):
    async def __aenter__(self) -> Any: ...
    async def __aexit__(self, *exc: object) -> Any: ...


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
    def transaction(self) -> Transaction: ...
    async def close(self) -> None: ...
    def is_closed(self) -> bool: ...


PostgresError: type[Exception] = asyncpg.PostgresError

# Errors after which the same work can simply be tried again on a new connection: the server
# is down, restarting or shutting down, or the transaction lost a race.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.InsufficientResourcesError,
)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT_ERRORS)


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
