"""Which store an error says is unavailable. The worker waits out such errors, for as long as
they last; anything else is a bug, and stops it.

Decided here and nowhere else, so that every path through the worker treats an outage alike
and its log names the store that failed.
"""

from __future__ import annotations

from typing import Literal

from redis.exceptions import (
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pointauth.server.journal.pg import is_transient

Store = Literal["PostgreSQL", "Redis"]

REDIS_OUTAGES: tuple[type[BaseException], ...] = (
    # Refused, reset or closed; also BusyLoadingError (still loading its AOF after a restart).
    RedisConnectionError,
    RedisTimeoutError,
    # A replica, until a failover promotes it; a cluster resharding or without a master.
    ReadOnlyError,
    TryAgainError,
    ClusterDownError,
    # maxmemory reached with noeviction: writes resume once an operator makes room.
    OutOfMemoryError,
)


def failed_store(exc: BaseException) -> Store | None:
    """The store `exc` says is unavailable, or None when `exc` is no outage."""
    if isinstance(exc, REDIS_OUTAGES):
        return "Redis"
    # After Redis's: redis-py wraps every socket error it meets, so a bare OSError is asyncpg's.
    if is_transient(exc):
        return "PostgreSQL"
    return None
