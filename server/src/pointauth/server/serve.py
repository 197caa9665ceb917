"""`pointauth serve`: N server processes on one port (SO_REUSEPORT), each on uvloop."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal

import uvloop

from pointauth.server.app import PointauthServer
from pointauth.server.config import Settings

log = logging.getLogger(__name__)


async def serve_until_signalled(settings: Settings, *, reuse_port: bool, sweeper: bool) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    async with PointauthServer(settings, reuse_port=reuse_port, sweeper=sweeper):
        await stopping.wait()
        log.info("stopping: draining in-flight calls (up to %.0f s)", settings.server.grace_seconds)


def _worker_main(settings: Settings, index: int) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker-{index} %(levelname)s %(message)s")
    # One sweeper is enough: the others would repeat its work.
    uvloop.run(serve_until_signalled(settings, reuse_port=True, sweeper=index == 0))


def serve(settings: Settings) -> int:
    workers = settings.server.workers
    if workers == 1:
        uvloop.run(serve_until_signalled(settings, reuse_port=False, sweeper=True))
        return 0
    if settings.server.port == 0:
        raise SystemExit("--workers > 1 needs a fixed port: each process would get its own with port 0")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(settings, i), name=f"pointauth-{i}") for i in range(workers)]
    for proc in procs:
        proc.start()

    def forward(signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for proc in procs:
        proc.join()
    return max((proc.exitcode or 0) for proc in procs)
