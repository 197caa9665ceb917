"""The bare grpc.aio ceiling: a unary echo of raw bytes, served like `pointauth serve` (N processes on
one port with SO_REUSEPORT, uvloop, the same server options) but with no work per call.

    python -m loadtest.echo_server --port 50052 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import signal

import grpc
import uvloop

SERVICE = "pointauth.bench.v1.EchoService"


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def serve(host: str, port: int) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    # The options of pointauth.server.app.PointauthServer, so only the work per call differs.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1), ("grpc.max_concurrent_streams", 1000)])
    # No (de)serializers: the handler sees the request's bytes, the floor of what any RPC costs.
    handler = grpc.method_handlers_generic_handler(SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(_echo)})
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await stopping.wait()
    await server.stop(1.0)


def _worker(host: str, port: int) -> None:
    uvloop.run(serve(host, port))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(args.host, args.port)) for _ in range(args.workers)]
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
