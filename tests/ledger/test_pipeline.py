"""The tick pipeline against a real Redis: one batch per tick, replies kept apart, back-pressure,
a bounded wait, and a Redis outage reported as what a retry can fix."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

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
        return_exceptions=True,
    )
    assert results[0] == 1
    assert isinstance(results[1], ResponseError)
    assert results[2] == 6
    assert pipeline.batches_sent == 1


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
