"""`pointauth serve`: N server processes on one port (SO_REUSEPORT), each on uvloop.

On SIGTERM (or Ctrl-C) each process marks health NOT_SERVING, refuses new calls, lets the calls
in flight finish within `grace_seconds`, and exits 0. A second signal ends it at once: an
operator who asks twice is never ignored. Nor one who asks once: a stop still going
STOP_MARGIN_SECONDS after the grace (something in it hangs) ends the process with status 1.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import signal
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import NoReturn

import uvloop

from pointauth.server.app import PointauthServer
from pointauth.server.config import Settings
from pointauth.server.signals import STOP_SIGNALS, on_stop_signals
from pointauth.server.transport import check_security

log = logging.getLogger(__name__)
# How long past `grace_seconds` a stop may take (closing the stores, the background loops).
STOP_MARGIN_SECONDS = 10.0


async def serve_until_signalled(
    settings: Settings, *, reuse_port: bool, sweeper: bool, signalled_early: list[int] | None = None
) -> None:
    stopping = asyncio.Event()
    on_stop_signals(asyncio.get_running_loop(), stopping)
    if signalled_early:
        return
    server = PointauthServer(settings, reuse_port=reuse_port, sweeper=sweeper)
    await server.start()
    try:
        # What start-up made (modules, descriptors, settings) lives as long as the process: out
        # of the collector's sight, a full collection no longer walks it (pauses of 16-60 ms
        # measured before, about 6 ms after, with the tail latency following).
        gc.collect()
        gc.freeze()
        await stopping.wait()
        log.info("draining in-flight calls (up to %.0f s)", settings.server.grace_seconds)
    finally:
        await stop_or_exit(server.stop(), settings.server.grace_seconds + STOP_MARGIN_SECONDS)


async def stop_or_exit(stop: Awaitable[None], seconds: float, exit: Callable[[int], NoReturn] = os._exit) -> None:
    """Awaits the stop; one not over `seconds` later ends the process with status 1 (`exit`),
    whatever it waits for. Not asyncio.wait_for: it waits for what it cancels to end."""
    task = asyncio.ensure_future(stop)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if task in done:
        task.result()  # its error, if it failed
        return
    log.error("the stop did not end within %.0f s: exiting now", seconds)
    for handler in logging.getLogger().handlers:
        handler.flush()  # the line above reaches the log before the process ends
    exit(1)


def _worker_main(settings: Settings, index: int) -> None:
    # A stop forwarded while this child was still starting: remembered, not lost.
    early: list[int] = []
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, _frame: early.append(signum))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker-{index} %(levelname)s %(message)s")
    # One sweeper is enough: the others would repeat its work.
    uvloop.run(serve_until_signalled(settings, reuse_port=True, sweeper=index == 0, signalled_early=early))


def serve(settings: Settings) -> int:
    check_security(settings)  # before any process starts: the field is named once, not per process
    workers = settings.server.workers
    if workers == 1:
        uvloop.run(serve_until_signalled(settings, reuse_port=False, sweeper=True))
        return 0
    if settings.server.port == 0:
        raise SystemExit("--workers > 1 needs a fixed port: each process would get its own with port 0")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(settings, i), name=f"pointauth-{i}") for i in range(workers)]
    received: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signum)

    # Before the children start: a signal during their start-up is forwarded, not lost.
    for sig in STOP_SIGNALS:
        signal.signal(sig, forward)
    for proc in procs:
        if received:  # stopped while starting: start no more
            break
        proc.start()
        if received:  # the signal came while this child was being spawned
            forward(received[-1], None)
    started = [proc for proc in procs if proc.pid is not None]
    for proc in started:
        proc.join()
    return max((proc.exitcode or 0 for proc in started), default=0)
