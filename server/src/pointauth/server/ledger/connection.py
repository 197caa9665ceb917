"""The server's Redis client: a bounded pool that queues bursts, and the errors a caller can act on.

A burst of calls larger than the pool waits for a connection (up to `pool_wait_seconds`)
instead of failing; past that wait it is `PoolExhausted`, which the API sends as
RESOURCE_EXHAUSTED. Redis being down, restarting or loading is `BACKEND_ERRORS`, sent as
UNAVAILABLE. Dead connections left in the pool by a Redis restart are dropped and replaced
before use, and a command whose connection breaks is retried once on a fresh connection: every
mutation carries a request_id, so a retry after an unknown outcome replays, never doubles.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.connection import HiredisRespSerializer
from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError

from pointauth.server.config import RedisSettings

# What a retry can fix: Redis unreachable, restarting, still loading its data, or too slow.
BACKEND_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, BusyLoadingError, OSError)


class PoolExhausted(Exception):
    """Every pooled connection stayed busy for the whole wait: the process is overloaded."""


class _Pool(BlockingConnectionPool):
    async def get_connection(self, *args: Any, **options: Any) -> Any:
        try:
            return await super().get_connection(*args, **options)  # type: ignore[no-untyped-call]
        except ConnectionError as exc:
            # redis-py signals a wait that ran out as a ConnectionError caused by the timeout.
            if isinstance(exc.__cause__, asyncio.TimeoutError):
                raise PoolExhausted(f"no Redis connection free within {self.timeout} s") from exc
            raise


# redis-py's asyncio connections pack each command in Python (about 10 us for a ledger FCALL of
# 15 arguments); its sync client packs with hiredis, in C, when hiredis is installed (4 us, the
# same bytes). The hot path packs every call it sends, so ours use the hiredis packer too.
_PACKER = HiredisRespSerializer()


class _HiredisPacking(AbstractConnection):
    def pack_command(self, *args: Any) -> list[bytes]:
        packed: list[bytes] = _PACKER.pack(*args)
        return packed


class _Connection(_HiredisPacking, Connection):
    pass


class _SSLConnection(_HiredisPacking, SSLConnection):
    pass


class _UnixConnection(_HiredisPacking, UnixDomainSocketConnection):
    pass


_HIREDIS_PACKING: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: _Connection,
    SSLConnection: _SSLConnection,
    UnixDomainSocketConnection: _UnixConnection,
}


def connect(settings: RedisSettings) -> Redis:
    pool = _Pool.from_url(
        settings.url,
        max_connections=settings.max_connections,
        timeout=settings.pool_wait_seconds,
        socket_timeout=settings.command_timeout_seconds,
        socket_connect_timeout=settings.command_timeout_seconds,
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[ConnectionError],
    )
    # The class from_url chose for the URL's scheme (redis, rediss, unix), packing with hiredis.
    pool.connection_class = _HIREDIS_PACKING[pool.connection_class]
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes its connections
