"""Keeping a process's copy of shared data (the group directory, the rule set) current."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Follower:
    """Calls `refresh` (which returns the version it now has) every `every_seconds` between
    start() and stop(). A failure is logged once and retried: the process goes on with the copy
    it has until Redis answers again."""

    def __init__(self, what: str, every_seconds: float, refresh: Callable[[], Awaitable[int]]) -> None:
        self.what = what
        self.every_seconds = every_seconds
        self.refresh = refresh
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        # The flag too, not only the cancellation: a library that swallows a cancellation (Python
        # 3.11's asyncio.wait_for can, in a race) would otherwise keep the loop, and the stop
        # awaiting it, going forever.
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _follow(self) -> None:
        failing = False
        while not self._stopping:
            await asyncio.sleep(self.every_seconds)
            try:
                version = await self.refresh()
            except Exception as exc:
                if not failing:
                    log.warning("%s refresh failed (%s: %s); retrying", self.what, type(exc).__name__, exc)
                failing = True
            else:
                if failing:
                    log.info("%s refresh works again (version %d)", self.what, version)
                failing = False
