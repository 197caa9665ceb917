"""The benchmark's two references, served like `pointauth serve` (N processes on one port with
SO_REUSEPORT, uvloop, the same server options):

- the bare grpc.aio ceiling: a unary echo of raw bytes, no work per call;
- with `--redis-url`, the echo plus one Redis script call per RPC, through redis-py's pool (a
  connection per call in flight): the ceiling of any design that touches Redis once per call (a
  write, so with `appendfsync always` it pays the fsync an AuthorizeHold pays);
- with `--tick-pipeline` too, that call goes the way pointauth's calls go (its Redis client, one
  pipeline per event-loop tick), not through redis-py's pool and a connection per call: what one
  Redis call costs a server built as pointauth is, the higher ceiling.

    python -m loadtest.echo_server --port 50052 --workers 2 [--redis-url redis://127.0.0.1:6379/0 [--tick-pipeline]]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import signal
from collections.abc import Awaitable, Callable

import grpc
import uvloop
from redis.asyncio import Redis

from pointauth.server.config import RedisSettings
from pointauth.server.ledger.connection import connect
from pointauth.server.ledger.pipeline import TickPipeline

SERVICE = "pointauth.bench.v1.EchoService"
MAX_CONCURRENT_STREAMS = 1000
"""Calls the server lets in at once on one connection (grpc.max_concurrent_streams)."""
REFERENCE_SCRIPT = "return redis.call('INCR', KEYS[1])"
"""The reference's one Redis call: a write in one shard's slot, as the ledger function's calls are."""

Handler = Callable[[bytes, grpc.aio.ServicerContext[bytes, bytes]], Awaitable[bytes]]


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


def reference_key() -> str:
    return f"pa:{{s{random.randrange(1024)}}}:bench"


def _echo_with_redis(redis_url: str) -> Handler:
    # redis-py's plain pool fails a call past its size (MaxConnectionsError) instead of waiting:
    # at 64 connections, a burst of more calls in flight met that. Sized to what one client
    # connection may have in flight, far more than any bench step has, it opens a connection per
    # call in flight (in the bench's steps as many as before, when none failed).
    redis = Redis.from_url(redis_url, max_connections=MAX_CONCURRENT_STREAMS)
    touch = redis.register_script(REFERENCE_SCRIPT)

    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        await touch(keys=[reference_key()])
        return request

    return echo


async def _echo_with_tick_pipeline(redis_url: str) -> Handler:
    redis = connect(RedisSettings(url=redis_url))
    sha = await redis.script_load(REFERENCE_SCRIPT)
    pipeline = TickPipeline(redis)

    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        await pipeline.execute("EVALSHA", sha, 1, reference_key())
        return request

    return echo


async def serve(host: str, port: int, redis_url: str | None = None, tick_pipeline: bool = False) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    # The options of pointauth.server.app.PointauthServer, so only the work per call differs.
    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 1), ("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS)]
    )
    # No (de)serializers: the handler sees the request's bytes, the floor of what any RPC costs.
    if redis_url:
        echo = await _echo_with_tick_pipeline(redis_url) if tick_pipeline else _echo_with_redis(redis_url)
    else:
        echo = _echo
    handler = grpc.method_handlers_generic_handler(SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await stopping.wait()
    await server.stop(1.0)


def _worker(host: str, port: int, redis_url: str | None, tick_pipeline: bool) -> None:
    uvloop.run(serve(host, port, redis_url, tick_pipeline))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--redis-url", help="make one Redis script call per RPC on this Redis")
    parser.add_argument("--tick-pipeline", action="store_true", help="make that call through pointauth's tick pipeline")
    args = parser.parse_args(argv)
    if args.tick_pipeline and not args.redis_url:
        parser.error("--tick-pipeline needs --redis-url")
    ctx = multiprocessing.get_context("spawn")
    worker_args = (args.host, args.port, args.redis_url, args.tick_pipeline)
    procs = [ctx.Process(target=_worker, args=worker_args) for _ in range(args.workers)]
    for proc in procs:
        proc.start()

    def forward(signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for proc in procs:
        proc.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
