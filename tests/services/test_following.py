"""Background loops stop when asked, even where a library swallows the cancellation."""

from __future__ import annotations

import asyncio
import contextlib

from pointauth.server.services.following import Follower


async def test_a_follower_stops_even_when_its_refresh_swallows_the_cancellation() -> None:
    refreshes = 0

    async def refresh() -> int:
        nonlocal refreshes
        refreshes += 1
        with contextlib.suppress(asyncio.CancelledError):  # swallowed, as 3.11's asyncio.wait_for can in a race
            await asyncio.sleep(3600)
        return refreshes

    follower = Follower("test data", 0.01, refresh)
    follower.start()
    await asyncio.sleep(0.1)  # inside its first refresh
    stop = asyncio.ensure_future(follower.stop())
    done, _ = await asyncio.wait({stop}, timeout=2)
    assert stop in done
    assert refreshes == 1
