"""Keeping a process's copy of shared data (the group directory, the rule set) current."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def follow(what: str, every_seconds: float, refresh: Callable[[], Awaitable[int]]) -> None:
    """Calls `refresh` (which returns the version it now has) every `every_seconds`, forever.
    A failure is logged once and retried: the process goes on with the copy it has."""
    failing = False
    while True:
        await asyncio.sleep(every_seconds)
        try:
            version = await refresh()
        except Exception as exc:
            if not failing:
                log.warning("%s refresh failed (%s: %s); retrying", what, type(exc).__name__, exc)
            failing = True
        else:
            if failing:
                log.info("%s refresh works again (version %d)", what, version)
            failing = False
