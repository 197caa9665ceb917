"""The bench's echo + 1 Redis call reference, through redis-py's pool or pointauth's tick
pipeline: each RPC answers its own bytes and makes exactly one Redis call, also when more calls
wait on Redis than there are connections."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from redis.asyncio import Redis

from pointauth.server.devstack.stack import EmbeddedStack, free_port

REPO = Path(__file__).resolve().parents[2]
METHOD = "/pointauth.bench.v1.EchoService/Echo"
CALLS = 300


async def _bench_counts(redis: Redis) -> int:
    total = 0
    async for key in redis.scan_iter(match="pa:*:bench"):
        total += int(await redis.get(key) or 0)
    return total


@pytest.mark.parametrize("client", [[], ["--tick-pipeline"]], ids=["redis-py-pool", "tick-pipeline"])
async def test_each_call_is_echoed_and_makes_one_redis_call(
    stack: EmbeddedStack, redis: Redis, client: list[str]
) -> None:
    port = free_port()
    command = [sys.executable, "-m", "loadtest.echo_server", "--port", str(port), "--redis-url", stack.redis.url]
    server = await asyncio.create_subprocess_exec(*command, *client, cwd=REPO)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), timeout=30)
            echo: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(METHOD)
            payloads = [b"call-%d" % n for n in range(CALLS)]
            # Redis holds every write for 0.5 s: all the calls wait on it at once (the reference's
            # pool, at 64 connections, failed those past 64).
            await redis.client_pause(500, all=False)
            replies = await asyncio.gather(*(echo(payload) for payload in payloads))
        assert replies == payloads
        assert await _bench_counts(redis) == CALLS
    finally:
        server.terminate()
        assert await asyncio.wait_for(server.wait(), timeout=30) == 0


def test_the_tick_pipeline_needs_a_redis() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "loadtest.echo_server", "--port", "1", "--tick-pipeline"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 2
    assert "--tick-pipeline needs --redis-url" in run.stderr
