"""Commands issued in one event-loop tick go to Redis as one pipeline, on few connections.

Under load many calls are in flight in one server process; sending each on its own connection
costs a system call, a pool checkout and a reply-parse wake-up per call. Batching the commands
of a tick costs those once per batch instead, and Redis runs them back to back.

- Back-pressure: at most `max_batches` batches are in flight; while they are, new commands wait
  and join the next batch, so batches grow with load instead of connections.
- A command that waited longer than `queue_wait_s` to be sent is failed with `QueueTimeout`
  (the API sends it as SERVER_OVERLOADED) and never sent: a call is never sent after its caller
  gave up on it.
- Each command gets its own reply: one command's error (a refusal, a missing function) does not
  touch the others. A broken connection fails the whole batch with the connection's error, which
  the API maps to UNAVAILABLE; the batch is sent once more on a fresh connection first, which is
  safe because every mutation carries a request_id (a second run replays).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pointauth.server.ledger.connection import BACKEND_ERRORS, PoolExhausted

KEYS_PER_ROUND_TRIP = 64
"""Keys whose commands go to Redis in one pipelined round trip wherever a command is sent for
every shard: the write-behind's group state, trims and claims, the merge recovery pass. Redis
runs the commands of a pipeline back to back, and a till's call that arrives meanwhile waits for
all of them: one round for all 1,024 shards held Redis for 1-8 ms at a time (the worker's XTRIMs
about 8 ms), a round of 64 for a few hundred microseconds, between which Redis serves the tills."""


async def in_rounds(
    redis: Redis,
    keys: Sequence[str],
    add: Callable[[Pipeline, str], object],
    *,
    per_round: int = KEYS_PER_ROUND_TRIP,
    raise_on_error: bool = True,
) -> list[Any]:
    """The replies of the commands `add` queues for each key, in the order of `keys`, sent
    `per_round` keys per pipelined round trip (see KEYS_PER_ROUND_TRIP)."""
    replies: list[Any] = []
    for first in range(0, len(keys), per_round):
        async with redis.pipeline(transaction=False) as pipe:
            for key in keys[first : first + per_round]:
                add(pipe, key)
            replies.extend(await pipe.execute(raise_on_error=raise_on_error))
    return replies


class QueueTimeout(PoolExhausted):
    """The command waited for a batch longer than the limit: the process is overloaded."""


class TickPipeline:
    def __init__(
        self,
        redis: Redis,
        *,
        max_batches: int = 4,
        max_batch: int = 512,
        queue_wait_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.max_batches = max_batches
        self.max_batch = max_batch
        self.queue_wait_s = queue_wait_s
        self._clock = clock
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[Any], float]] = []
        self._scheduled = False
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle: list[AbstractConnection] = []  # connections of batches not in flight
        self.batches_sent = 0
        """Batches sent so far (for tests and metrics)."""

    async def execute(self, *args: Any) -> Any:
        """Sends one command with the others of this tick; its reply as Redis sent it (none of
        redis-py's per-command conversions: PING answers b"PONG"), or its error raised."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((args, future, self._clock()))
        self._schedule()
        return await future

    def _schedule(self) -> None:
        if not self._scheduled and self._pending and self._in_flight < self.max_batches:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        stale_before = self._clock() - self.queue_wait_s
        taken, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
        batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        for args, future, queued in taken:
            if future.done():  # the caller was cancelled while it waited
                continue
            if queued < stale_before:
                future.set_exception(QueueTimeout(f"not sent within {self.queue_wait_s} s"))
                continue
            batch.append((args, future))
        if not batch:
            self._schedule()
            return
        self._in_flight += 1
        task = asyncio.create_task(self._send(batch))
        self._tasks.add(task)  # a reference, so the task is not collected while it runs
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        try:
            replies = await self._round_trip([args for args, _ in batch])
            self.batches_sent += 1
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        finally:
            self._in_flight -= 1
            self._schedule()
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _round_trip(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The replies to `commands`, sent as one write on a connection of this pipeline's own;
        a reply that is an error is returned, not raised. A connection that breaks (or a Redis
        still loading) is dropped and the batch sent once more on a fresh one.

        Not redis-py's Pipeline on a pooled connection: per batch, its pool checkout and
        release, command stack and a timeout per reply cost more than the batch's FCALLs take
        to send (README, Performance). Each batch in flight has a connection to itself, taken
        from the client's pool once and kept (at most `max_batches` of them; the client's
        aclose() closes them with the rest)."""
        pool = self.redis.connection_pool
        connection = self._idle.pop() if self._idle else await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            try:
                return await self._exchange(connection, commands)
            except BACKEND_ERRORS:
                await connection.disconnect(nowait=True)
                return await self._exchange(connection, commands)  # once more, connected afresh
        except BaseException:
            # Failed or cancelled midway, replies may be left unread on it: never reuse it as is.
            await connection.disconnect(nowait=True)
            raise
        finally:
            self._idle.append(connection)

    @staticmethod
    async def _exchange(connection: AbstractConnection, commands: list[tuple[Any, ...]]) -> list[Any]:
        await connection.connect()  # type: ignore[no-untyped-call]
        await connection.send_packed_command(connection.pack_commands(commands), check_health=False)
        replies: list[Any] = []
        try:
            # One deadline for the batch's replies, not a timeout context per reply.
            async with asyncio.timeout(connection.socket_timeout):
                for _ in commands:
                    try:
                        replies.append(await connection.read_response(timeout=math.inf))
                    except ResponseError as error:  # this command's, not the batch's
                        replies.append(error)
        except TimeoutError as exc:
            raise RedisTimeoutError(f"no reply from Redis within {connection.socket_timeout} s") from exc
        return replies
