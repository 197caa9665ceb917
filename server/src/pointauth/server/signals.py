"""How every long-running pointauth process (serve, worker, dev) stops: the first SIGTERM or
Ctrl-C asks it to finish its work and exit; a second one exits at once, so that an operator who
asks twice is never ignored."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_AFTER_S = 1.0


def on_stop_signals(loop: asyncio.AbstractEventLoop, stopping: asyncio.Event) -> None:
    """The first SIGTERM/SIGINT sets `stopping`; another one a second or more later exits the
    process at once. (One Ctrl-C can arrive twice within milliseconds: the terminal signals the
    whole process group, and a launcher such as `uv run` may forward it again.)"""
    first_at: list[float] = []

    def on_signal(sig: signal.Signals) -> None:
        if not first_at:
            first_at.append(time.monotonic())
            log.info("%s: stopping (again to stop at once)", sig.name)
            stopping.set()
        elif time.monotonic() - first_at[0] >= REPEAT_AFTER_S:
            os._exit(128 + sig)

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
