"""How every long-running pointauth process (serve, worker, dev) stops: the first SIGTERM or
Ctrl-C asks it to finish its work and exit; a second one exits at once, so that an operator who
asks twice is never ignored."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def on_stop_signals(loop: asyncio.AbstractEventLoop, stopping: asyncio.Event) -> None:
    """The first SIGTERM/SIGINT sets `stopping`; the second exits the process at once."""

    def first(sig: signal.Signals) -> None:
        log.info("%s: stopping (again to stop at once)", sig.name)
        stopping.set()
        for again in STOP_SIGNALS:
            loop.add_signal_handler(again, os._exit, 128 + again)

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, first, sig)
