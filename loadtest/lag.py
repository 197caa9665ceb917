"""Write-behind lag, read from Redis itself: the age of the oldest event a consumer group has not yet
acknowledged (pending) or not yet read, over every shard's stream. Stream ids start with their
millisecond timestamp, so this needs nothing from the worker but its consumer group, and it holds
for any number of workers."""

from __future__ import annotations

import threading
import time
from typing import Any

import redis

from pointauth.server.ledger import Keyspace


def _id_ms(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def oldest_unapplied_ms(client: redis.Redis, keyspace: Keyspace) -> int | None:
    """The timestamp (ms) of the oldest event not yet applied; 0 when all are; None without groups."""
    streams = [keyspace.events(shard) for shard in range(keyspace.shards)]
    pipe = client.pipeline(transaction=False)
    for stream in streams:
        pipe.exists(stream)
    exists = pipe.execute()
    live = [stream for stream, found in zip(streams, exists, strict=True) if found]
    pipe = client.pipeline(transaction=False)
    for stream in live:
        pipe.xinfo_groups(stream)
    infos = pipe.execute(raise_on_error=False)
    probes: list[tuple[str, str]] = []
    for stream, groups in zip(live, infos, strict=True):
        if isinstance(groups, Exception):
            continue
        probes.extend((stream, _text(group["name"])) for group in groups)
        probes.extend((stream, "(" + _text(group["last-delivered-id"])) for group in groups)
    if not probes:
        return None
    pipe = client.pipeline(transaction=False)
    for stream, arg in probes:
        if arg.startswith("("):
            pipe.xrange(stream, min=arg, count=1)  # the oldest event no consumer has read
        else:
            pipe.xpending(stream, arg)  # its oldest read but unacknowledged event
    oldest = 0
    for answer in pipe.execute():
        if isinstance(answer, list):
            first: bytes | None = answer[0][0] if answer else None
        else:
            first = answer.get("min") if answer.get("pending") else None
        if first is not None:
            ms = _id_ms(first)
            oldest = ms if oldest == 0 else min(oldest, ms)
    return oldest


class LagSampler:
    """Samples the lag once a second in a thread while load runs; `samples_ms` keeps the figures."""

    def __init__(self, redis_url: str, keyspace: Keyspace, interval_s: float = 1.0) -> None:
        self.client = redis.Redis.from_url(redis_url)
        self.keyspace = keyspace
        self.interval_s = interval_s
        self.samples_ms: list[int] = []
        self.available = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            oldest = oldest_unapplied_ms(self.client, self.keyspace)
            if oldest is None:
                self.available = False
                continue
            self.available = True
            self.samples_ms.append(max(0, int(time.time() * 1000) - oldest) if oldest else 0)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="lag-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
