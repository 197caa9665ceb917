"""The tick pipeline against a real Redis: one batch per tick, replies kept apart, back-pressure,
a bounded wait, and a Redis outage reported as what a retry can fix."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pointauth.server.config import RedisSettings
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.ledger import BACKEND_ERRORS, connect
from pointauth.server.ledger.pipeline import QueueTimeout, TickPipeline


async def test_the_commands_of_one_tick_go_as_one_batch(redis: Redis) -> None:
    pipeline = TickPipeline(redis)
    replies = await asyncio.gather(*(pipeline.execute("INCR", "counter") for _ in range(500)))
    assert sorted(replies) == list(range(1, 501))
    assert pipeline.batches_sent == 1


async def test_each_command_gets_its_own_reply_or_error(redis: Redis) -> None:
    pipeline = TickPipeline(redis)
    await redis.set("text", "not a number")
    results = await asyncio.gather(
        pipeline.execute("INCR", "a"),
        pipeline.execute("INCR", "text"),
        pipeline.execute("INCRBY", "a", 5),
        pipeline.execute("EVALSHA", "0" * 40, 0),
        return_exceptions=True,
    )
    assert results[0] == 1
    assert type(results[1]) is ResponseError
    assert results[2] == 6
    assert type(results[3]) is NoScriptError  # redis-py's exception for the error, as its own client raises
    assert pipeline.batches_sent == 1


async def test_replies_split_over_many_reads_answer_their_own_commands(redis: Redis) -> None:
    pipeline = TickPipeline(redis, max_batch=50)
    # 20 kB replies: a batch's replies arrive in many reads, cut anywhere.
    values = [f"{i}:".encode() + bytes([i % 251]) * 20_000 for i in range(400)]
    replies = await asyncio.gather(*(pipeline.execute("ECHO", value) for value in values))
    assert replies == values
    assert pipeline.batches_sent == 8


async def test_commands_wait_for_a_free_batch_and_join_the_next(redis: Redis) -> None:
    pipeline = TickPipeline(redis, max_batches=1)
    await redis.client_pause(300, all=False)  # the first batch stays in flight meanwhile
    first = [asyncio.create_task(pipeline.execute("INCR", "n")) for _ in range(10)]
    await asyncio.sleep(0.05)
    later = [asyncio.create_task(pipeline.execute("INCR", "n")) for _ in range(10)]
    replies = await asyncio.gather(*first, *later)
    assert sorted(replies) == list(range(1, 21))
    assert pipeline.batches_sent == 2


async def test_a_command_not_sent_within_the_wait_fails_and_is_never_sent(redis: Redis) -> None:
    pipeline = TickPipeline(redis, max_batches=1, queue_wait_s=0.2)
    await redis.client_pause(1000, all=False)
    in_flight = asyncio.create_task(pipeline.execute("INCR", "m"))
    await asyncio.sleep(0.05)
    waiting = [asyncio.create_task(pipeline.execute("INCR", "m")) for _ in range(5)]
    results = await asyncio.gather(in_flight, *waiting, return_exceptions=True)
    assert results[0] == 1
    assert [type(r) for r in results[1:]] == [QueueTimeout] * 5
    assert await redis.get("m") == b"1"
    assert pipeline.batches_sent == 1


async def test_a_redis_outage_fails_the_batch_with_a_backend_error(stack: EmbeddedStack) -> None:
    client = connect(RedisSettings(url=stack.redis.url))
    pipeline = TickPipeline(client)
    try:
        assert await pipeline.execute("PING") == b"PONG"
        assert stack.redis.proc is not None
        stack.redis.proc.kill()
        stack.redis.proc.wait()
        with pytest.raises(BACKEND_ERRORS):
            await pipeline.execute("PING")
        stack.redis.start()
        assert await pipeline.execute("PING") == b"PONG"
    finally:
        await client.aclose()


async def test_a_connection_redis_closed_is_replaced_and_the_batch_sent_once(stack: EmbeddedStack) -> None:
    client = connect(RedisSettings(url=stack.redis.url))
    pipeline = TickPipeline(client)
    try:
        await client.delete("once")
        assert await pipeline.execute("INCR", "once") == 1
        # Redis drops every connection but the killer's: the pipeline's kept one is dead.
        async with Redis.from_url(stack.redis.url) as killer:
            assert await killer.client_kill_filter(_type="normal", skipme=True) >= 1
        assert await pipeline.execute("INCR", "once") == 2
        assert await client.get("once") == b"2"
        assert pipeline.batches_sent == 2
    finally:
        await client.aclose()


async def test_the_server_client_packs_commands_as_redis_py_does(stack: EmbeddedStack) -> None:
    client = connect(RedisSettings(url=stack.redis.url))
    try:
        pool, plain = client.connection_pool, Redis.from_url(stack.redis.url).connection_pool
        ours = pool.connection_class(**pool.connection_kwargs)
        theirs = plain.connection_class(**plain.connection_kwargs)
        command = ("FCALL", "f", 2, "pa:{s1}:a", b"\x00\xff", "é", 10**15, -3, 1.5, memoryview(b"mv"))
        assert b"".join(ours.pack_command(*command)) == b"".join(theirs.pack_command(*command))
        assert type(ours).pack_command is not type(theirs).pack_command  # hiredis's packer, not the Python one
        replies = await asyncio.gather(TickPipeline(client).execute("ECHO", "é"), client.echo(b"\x00\xff"))
        assert list(replies) == ["é".encode(), b"\x00\xff"]
    finally:
        await client.aclose()


async def _pipeline_connection(watcher: Redis, other_than: int | None = None) -> int:
    """The id of the pipeline's connection (one other than `other_than`), once Redis lists it."""
    for _ in range(500):
        ids = [int(c["id"]) for c in await watcher.client_list() if c["name"] == "tick" and int(c["id"]) != other_than]
        if ids:
            assert len(ids) == 1
            return ids[0]
        await asyncio.sleep(0.01)
    raise AssertionError("the pipeline opened no connection within 5 s")


async def _kill_the_pipeline_connection(watcher: Redis, other_than: int | None = None) -> int:
    killed = await _pipeline_connection(watcher, other_than)
    assert await watcher.client_kill_filter(_id=str(killed)) == 1
    return killed


@contextlib.asynccontextmanager
async def _an_incr_redis_holds(stack: EmbeddedStack) -> AsyncIterator[tuple[TickPipeline, Redis, asyncio.Task[Any]]]:
    """A pipeline (its connections named "tick") whose INCR of "lost" Redis holds unanswered, its
    writes paused for up to 2 s; and another client, to watch and kill connections with."""
    client = Redis.from_url(stack.redis.url, client_name="tick")
    watcher = Redis.from_url(stack.redis.url)
    pipeline = TickPipeline(client)
    try:
        await watcher.delete("lost")
        await pipeline.execute("PING")  # the pipeline's connection is open
        await watcher.client_pause(2000, all=False)
        incr = asyncio.create_task(pipeline.execute("INCR", "lost"))
        await asyncio.sleep(0.05)
        yield pipeline, watcher, incr
    finally:
        await watcher.client_unpause()
        await client.aclose()
        await watcher.aclose()


async def test_a_connection_lost_mid_batch_sends_what_was_not_answered_once_more(stack: EmbeddedStack) -> None:
    async with _an_incr_redis_holds(stack) as (pipeline, watcher, incr):
        killed = await _kill_the_pipeline_connection(watcher)  # Redis frees it without running its INCR
        fresh = await _pipeline_connection(watcher, other_than=killed)  # its INCR waits too
        await watcher.client_unpause()
        assert await incr == 1  # sent once more on a fresh connection, and run once
        assert await watcher.get("lost") == b"1"
        assert pipeline.batches_sent == 2
        assert await _pipeline_connection(watcher) == fresh


async def test_a_connection_lost_twice_fails_the_batch_with_a_backend_error(stack: EmbeddedStack) -> None:
    async with _an_incr_redis_holds(stack) as (pipeline, watcher, incr):
        first = await _kill_the_pipeline_connection(watcher)
        await _kill_the_pipeline_connection(watcher, other_than=first)  # the one it was sent on again
        with pytest.raises(RedisConnectionError):
            await incr
        await watcher.client_unpause()
        assert await watcher.get("lost") is None  # neither connection ran it
        assert await pipeline.execute("INCR", "lost") == 1  # and the pipeline goes on


async def test_a_batch_not_answered_in_time_fails_and_its_connection_is_not_used_again(stack: EmbeddedStack) -> None:
    client = connect(RedisSettings(url=stack.redis.url, command_timeout_seconds=0.3))
    watcher = Redis.from_url(stack.redis.url)
    pipeline = TickPipeline(client)
    try:
        await pipeline.execute("PING")
        await watcher.client_pause(2000, all=False)
        with pytest.raises(RedisTimeoutError):
            await pipeline.execute("INCR", "late")
        await watcher.client_unpause()
        # A fresh connection: the late INCR's reply, if Redis still sends one, answers nothing.
        assert await pipeline.execute("ECHO", "after") == b"after"
        assert await pipeline.execute("INCRBY", "other", 7) == 7
    finally:
        await watcher.client_unpause()
        await client.aclose()
        await watcher.aclose()


async def test_a_link_never_takes_over_a_pooled_connection_redis_closed(stack: EmbeddedStack) -> None:
    client = connect(RedisSettings(url=stack.redis.url, command_timeout_seconds=1.0))
    try:
        await client.client_setname("pooled")  # the pool's one connection, idle once answered
        async with Redis.from_url(stack.redis.url) as watcher:
            [pooled] = [c for c in await watcher.client_list() if c["name"] == "pooled"]
            assert await watcher.client_kill_filter(_id=pooled["id"]) == 1
        await asyncio.sleep(0.1)  # redis-py's stream protocol reads the end of stream: half-open
        # The pipeline's first link comes from that pool: connected afresh, it answers.
        assert await TickPipeline(client).execute("PING") == b"PONG"
    finally:
        await client.aclose()


async def test_a_command_that_cannot_be_sent_fails_alone_and_the_pipeline_goes_on(redis: Redis) -> None:
    pipeline = TickPipeline(redis, max_batches=1)
    results = await asyncio.wait_for(
        asyncio.gather(pipeline.execute("SET", "k", None), pipeline.execute("INCR", "n"), return_exceptions=True), 5
    )
    # Not packable (redis-py's DataError), so nothing of its batch was written; its batch's other
    # command fails with it, and the one batch in flight allowed is free again.
    assert [type(r) for r in results] == [DataError, DataError]
    assert await redis.get("n") is None
    assert await asyncio.wait_for(pipeline.execute("INCR", "n"), 5) == 1
