"""Write-behind lag while the benchmark runs: `pointauth status`'s own measure (the age of the
oldest event PostgreSQL does not have yet, from the streams' consumer-group state), sampled once
a second in a thread."""

from __future__ import annotations

import asyncio
import threading
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

from pointauth.server.journal.status import stream_backlogs
from pointauth.server.ledger import Keyspace


async def _oldest_unapplied_ms(redis_url: str, keyspace: Keyspace) -> int:
    """The timestamp (ms) of the oldest event not yet applied; 0 when none waits."""
    client = Redis.from_url(redis_url)
    try:
        backlogs = await stream_backlogs(client, [keyspace.events(shard) for shard in range(keyspace.shards)])
    finally:
        await client.aclose()
    waiting = [b.oldest_unapplied.ms for b in backlogs if b.oldest_unapplied is not None]
    return min(waiting) if waiting else 0


def wait_until_drained(redis_url: str, keyspace: Keyspace, within_s: float = 120.0) -> bool:
    """Until no event waits for PostgreSQL (or `within_s` passed): a fixed-rate step's lag then
    is its own, not the backlog a saturating step before it left."""
    deadline = time.monotonic() + within_s
    while asyncio.run(_oldest_unapplied_ms(redis_url, keyspace)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


class LagSampler:
    """Samples the lag once a second in a thread while load runs; `samples_ms` keeps the figures.
    A sample Redis did not answer (within the client's 5 s) is missed, not a lag of 0: `missed`
    says why, and the sampling goes on."""

    def __init__(self, redis_url: str, keyspace: Keyspace, interval_s: float = 1.0) -> None:
        self.redis_url = redis_url
        self.keyspace = keyspace
        self.interval_s = interval_s
        self.samples_ms: list[int] = []
        self.missed: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                oldest = asyncio.run(_oldest_unapplied_ms(self.redis_url, self.keyspace))
            except (RedisError, OSError) as exc:
                self.missed.append(f"{time.strftime('%H:%M:%S')} {type(exc).__name__}: {exc}")
                continue
            self.samples_ms.append(max(0, int(time.time() * 1000) - oldest) if oldest else 0)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="lag-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
