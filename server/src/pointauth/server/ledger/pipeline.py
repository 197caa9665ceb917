"""Commands issued in one event-loop tick go to Redis as one pipeline, on few connections.

Under load many calls are in flight in one server process; sending each on its own connection
costs a system call, a pool checkout and a reply-parse wake-up per call. Batching the commands
of a tick costs those once per batch instead, and Redis runs them back to back.

- Back-pressure: at most `max_batches` batches are in flight; while they are, new commands wait
  and join the next batch, so batches grow with load instead of connections.
- A command that waited longer than `queue_wait_s` to be sent is failed with `QueueTimeout`
  (the API sends it as SERVER_OVERLOADED) and never sent: a call is never sent after its caller
  gave up on it.
- Each command gets its own reply, as soon as it arrives: one command's error (a refusal, a
  missing function) does not touch the others.
- A connection that breaks: the commands of its batch Redis had not answered are sent once more
  on a fresh connection, which is safe because every mutation carries a request_id (a second run
  replays). If that one breaks too, they fail with the connection's error, which the API maps to
  UNAVAILABLE. A batch not answered within the command timeout fails with a timeout error and
  its connection is dropped: a late reply must never answer the next batch's commands.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import hiredis
from redis._parsers import BaseParser
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pointauth.server.ledger.connection import PoolExhausted

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


_Command = tuple[Any, ...]


class _Batch:
    """Commands sent together, and how many of their replies have come back (in order)."""

    __slots__ = ("answered", "commands", "deadline", "futures", "resent")

    def __init__(self, commands: list[_Command], futures: list[asyncio.Future[Any]]) -> None:
        self.commands = commands
        self.futures = futures
        self.answered = 0
        self.resent = False
        self.deadline: asyncio.TimerHandle | None = None

    def fail(self, error: BaseException) -> None:
        """Fails the commands not answered yet."""
        for future in self.futures[self.answered :]:
            if future.done():
                continue
            if isinstance(error, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(error)


def _reader() -> hiredis.Reader:
    """A RESP parser whose error replies are redis-py's exceptions, as its own parser makes them."""
    return hiredis.Reader(protocolError=InvalidResponse, replyError=BaseParser.parse_error)


class _Link(asyncio.Protocol):
    """One connection of the pipeline's, carrying one batch at a time. redis-py opens it (TCP,
    TLS or unix socket, AUTH, SELECT, its connect timeout), then hands its transport to this
    protocol, which parses replies as they arrive and answers each command's future at once.

    Why not read through redis-py's connection: per batch that costs a task, a stream read and
    an await per reply, and a timeout context; on a protocol a reply costs a parse and a
    set_result. In the echo + Redis reference it was about 50 us of server CPU per call (README,
    Performance)."""

    def __init__(
        self, connection: AbstractConnection, lost: Callable[[_Link], None], answered: Callable[[_Link, _Batch], None]
    ) -> None:
        self.connection = connection
        self.batch: _Batch | None = None
        self._lost = lost
        self._answered = answered
        self._transport: asyncio.Transport | None = None
        self._stream_protocol: asyncio.BaseProtocol | None = None
        self._reader = _reader()

    @property
    def is_open(self) -> bool:
        # Closing (aborted past a deadline) is not open, though connection_lost has yet to come.
        return self._transport is not None and not self._transport.is_closing()

    async def open(self) -> None:
        # Always connected afresh, never taken as the pool left it: a pooled connection whose
        # Redis went away may have had its end of stream read already, by redis-py's stream
        # protocol, which then stops reading but does not close. Taken over so, it would never
        # answer nor report its loss (the batch would wait out its deadline). Links are opened
        # once per process, and again only after a loss.
        await self.connection.disconnect(nowait=True)
        await self.connection.connect()  # type: ignore[no-untyped-call]
        # redis-py keeps the connection's stream writer private; its transport is what we take.
        writer = self.connection._writer
        assert writer is not None
        transport = writer.transport
        self._stream_protocol = transport.get_protocol()
        self._reader = _reader()  # nothing of a lost connection's partial reply is kept
        transport.set_protocol(self)
        self._transport = transport  # type: ignore[assignment]

    def send(self, batch: _Batch) -> None:
        """Writes the commands of `batch` not answered yet; raises (writing nothing) if one of them
        cannot be packed (redis-py's DataError)."""
        assert self._transport is not None
        packed = self.connection.pack_commands(batch.commands[batch.answered :])
        self.batch = batch
        self._transport.writelines(packed)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (batch := self.batch) is not None:
            try:
                reply = self._reader.gets()
            except InvalidResponse:
                self.abort()
                return
            if reply is False:
                return
            future = batch.futures[batch.answered]
            batch.answered += 1
            if not future.done():  # its caller may have been cancelled meanwhile
                if isinstance(reply, RedisError):  # parse_error's: ResponseError, BusyLoadingError...
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
            if batch.answered == len(batch.futures):
                self.batch = None
                self._answered(self, batch)

    def eof_received(self) -> bool:
        return False  # Redis closed it: close our side too (connection_lost follows)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._stream_protocol is not None:  # redis-py's disconnect() waits for it to see the close
            self._stream_protocol.connection_lost(exc)
            self._stream_protocol = None
        self._lost(self)


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
        self._pending: list[tuple[_Command, asyncio.Future[Any], float]] = []
        self._scheduled = False
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle: list[_Link] = []  # links of batches not in flight, open or to be reopened
        self.batches_sent = 0
        """Batches answered so far (for tests and metrics)."""

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
        commands: list[_Command] = []
        futures: list[asyncio.Future[Any]] = []
        for args, future, queued in taken:
            if future.done():  # the caller was cancelled while it waited
                continue
            if queued < stale_before:
                future.set_exception(QueueTimeout(f"not sent within {self.queue_wait_s} s"))
                continue
            commands.append(args)
            futures.append(future)
        if not commands:
            self._schedule()
            return
        self._in_flight += 1
        batch = _Batch(commands, futures)
        link = self._idle.pop() if self._idle else None
        if link is not None and link.is_open:
            self._send(link, batch)
        else:
            self._spawn(self._open_and_send(link, batch))

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)  # a reference, so the task is not collected while it runs
        task.add_done_callback(self._tasks.discard)

    async def _open_and_send(self, link: _Link | None, batch: _Batch) -> None:
        """Sends `batch` on `link` opened afresh, or on a new link of a connection from the pool."""
        try:
            if link is None:
                connection = await self.redis.connection_pool.get_connection()  # type: ignore[no-untyped-call]
                link = _Link(connection, self._on_lost, self._on_answered)
            await link.open()
        except BaseException as exc:
            self._finish(link, batch, exc)
            if not isinstance(exc, Exception):
                raise
            return
        self._send(link, batch)

    def _send(self, link: _Link, batch: _Batch) -> None:
        try:
            link.send(batch)
        except Exception as exc:  # the batch fails, not the loop's callback, leaving it in flight forever
            if link.batch is batch:  # packed, then the write itself failed: the connection is not trusted
                link.batch = None
                link.abort()
            self._finish(link, batch, exc)
            return
        # One deadline for the batch's replies, not a timeout per reply.
        timeout = link.connection.socket_timeout
        if timeout is not None:
            batch.deadline = asyncio.get_running_loop().call_later(timeout, self._on_deadline, link, timeout)

    def _on_answered(self, link: _Link, batch: _Batch) -> None:
        self.batches_sent += 1
        self._finish(link, batch, None)

    def _on_deadline(self, link: _Link, timeout: float) -> None:
        batch, link.batch = link.batch, None
        link.abort()  # its replies would come late, to the next batch's commands: never reuse it
        if batch is not None:
            self._finish(link, batch, RedisTimeoutError(f"no reply from Redis within {timeout} s"))

    def _on_lost(self, link: _Link) -> None:
        batch, link.batch = link.batch, None
        if batch is None:
            return  # lost while idle: reopened when next used
        if batch.deadline is not None:
            batch.deadline.cancel()
        if not batch.resent:
            # Redis closed it (restarted, killed the client): send what it did not answer once
            # more on a fresh connection, which is safe as every mutation carries a request_id.
            batch.resent = True
            self._spawn(self._open_and_send(link, batch))
        else:
            self._finish(link, batch, RedisConnectionError("Redis closed the connection twice"))

    def _finish(self, link: _Link | None, batch: _Batch, error: BaseException | None) -> None:
        """A batch is done with: answered (no error), or failed with `error`; its link is free."""
        if batch.deadline is not None:
            batch.deadline.cancel()
        if error is not None:
            batch.fail(error)
        if link is not None:
            self._idle.append(link)
        self._in_flight -= 1
        self._schedule()
