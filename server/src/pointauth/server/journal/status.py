"""How far PostgreSQL is behind Redis: per shard stream, what is not yet applied and how old
the oldest of it is, and each worker's recent throughput."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from pointauth.server.journal.events import EntryId
from pointauth.server.journal.pg import connection
from pointauth.server.ledger import Keyspace
from pointauth.server.ledger.pipeline import in_rounds

GROUP = "pointauth-writebehind"

COUNT_PAGE = 200
"""Entries per XRANGE when counting a backlog Redis cannot count itself: one XRANGE of all of
them would hold Redis about 2.5 µs an entry (a quarter of a second for 100,000), every till's
call waiting behind it."""


@dataclass(frozen=True)
class StreamBacklog:
    stream: str
    pending: int
    """Delivered to a worker, not yet acknowledged (being applied, or held back)."""
    undelivered: int
    """Not yet read by any worker."""
    oldest_unapplied: EntryId | None
    last_delivered: EntryId
    oldest_pending: EntryId | None
    length: int = 0
    """XLEN: every entry still in the stream, applied or not (the worker trims it)."""

    @property
    def backlog(self) -> int:
        return self.pending + self.undelivered


@dataclass(frozen=True)
class WorkerHeartbeat:
    consumer: str
    shards: list[int]
    applied_total: int
    events_per_second: float
    lag_ms: int
    cpu_class: str
    """journal/priority.py's CpuClass.state: idle, normal, or why not."""
    last_seen: datetime


@dataclass(frozen=True)
class Status:
    now_ms: int
    streams: list[StreamBacklog]
    workers: list[WorkerHeartbeat]
    applied_events: int

    @property
    def backlog(self) -> int:
        return sum(s.backlog for s in self.streams)

    @property
    def lag_ms(self) -> int:
        """Age of the oldest event not yet in PostgreSQL (0 when none is waiting)."""
        oldest = [s.oldest_unapplied.ms for s in self.streams if s.oldest_unapplied is not None]
        return max(0, self.now_ms - min(oldest)) if oldest else 0

    def render(self) -> str:
        lines = [
            f"write-behind lag: {self.lag_ms} ms, backlog: {self.backlog} events, "
            f"applied so far: {self.applied_events} events",
        ]
        for w in self.workers:
            lines.append(
                f"  worker {w.consumer}: {w.events_per_second:.0f} events/s, lag {w.lag_ms} ms, "
                f"{w.applied_total} applied, {len(w.shards)} shards, CPU class {w.cpu_class}, "
                f"last seen {w.last_seen:%Y-%m-%d %H:%M:%S%z}"
            )
        behind = sorted((s for s in self.streams if s.backlog), key=lambda s: -s.backlog)
        for s in behind[:20]:
            lines.append(f"  {s.stream}: {s.pending} pending, {s.undelivered} undelivered")
        if len(behind) > 20:
            lines.append(f"  ... and {len(behind) - 20} more streams with a backlog")
        return "\n".join(lines)


async def redis_now_ms(redis: Redis) -> int:
    """Stream entry ids carry Redis's clock, so ages are measured on it."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def stream_backlogs(redis: Redis, streams: list[str], group: str = GROUP) -> list[StreamBacklog]:
    """Pipelined in short rounds (pipeline.in_rounds); each stream is its own key, so this also
    works on a Redis Cluster."""

    def state(pipe: Pipeline, stream: str) -> None:
        pipe.xlen(stream)
        pipe.xinfo_groups(stream)
        pipe.xpending(stream, group)

    replies = await in_rounds(redis, streams, state, raise_on_error=False)
    found: list[tuple[str, EntryId, int, EntryId | None, int | None, int]] = []
    for i, stream in enumerate(streams):
        length, groups, pending = replies[3 * i : 3 * i + 3]
        if not length or isinstance(length, ResponseError) or isinstance(groups, ResponseError):
            continue  # no stream: nothing written, nothing to apply
        info = next((g for g in groups if _text(g["name"]) == group), None)
        if info is None or isinstance(pending, ResponseError):
            # No worker has read this stream yet: all of it waits.
            found.append((stream, EntryId(0, 0), 0, None, int(length), int(length)))
            continue
        last = EntryId.parse(info["last-delivered-id"])
        oldest_pending = EntryId.parse(pending["min"]) if pending["pending"] else None
        # Redis 7 counts the undelivered entries itself, except where it cannot (nil: after
        # deletions, or a group moved by hand with XGROUP SETID): then they are counted here.
        lag = info.get("lag")
        lag_count = None if lag is None else int(lag)
        found.append((stream, last, int(pending["pending"]), oldest_pending, lag_count, int(length)))
    # The first entry after what was delivered: its id is its time.
    after_delivered = {stream: (last, lag) for stream, last, _, _, lag, _ in found}

    def first_after(pipe: Pipeline, stream: str) -> None:
        pipe.xrange(stream, min=f"({after_delivered[stream][0]}", count=1)

    replies = await in_rounds(redis, [f[0] for f in found], first_after, raise_on_error=False)
    out: list[StreamBacklog] = []
    for (stream, last, pending_count, oldest_pending, lag, length), after in zip(found, replies, strict=True):
        new = [] if isinstance(after, ResponseError) else after
        first_new = EntryId.parse(new[0][0]) if new else None
        candidates = [e for e in (oldest_pending, first_new) if e is not None]
        out.append(
            StreamBacklog(
                stream=stream,
                pending=pending_count,
                undelivered=lag if lag is not None else await _count_after(redis, stream, last),
                oldest_unapplied=min(candidates) if candidates else None,
                last_delivered=last,
                oldest_pending=oldest_pending,
                length=length,
            )
        )
    return out


async def _count_after(redis: Redis, stream: str, last: EntryId) -> int:
    """The entries of `stream` after `last`, counted COUNT_PAGE at a time."""
    counted, start = 0, f"({last}"
    while True:
        page: list[Any] = await redis.xrange(stream, min=start, count=COUNT_PAGE) or []
        counted += len(page)
        if len(page) < COUNT_PAGE:
            return counted
        start = f"({_text(page[-1][0])}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def worker_status(redis: Redis, dsn: str, keyspace: Keyspace, group: str = GROUP) -> Status:
    streams = [keyspace.events(shard) for shard in range(keyspace.shards)]
    backlogs = await stream_backlogs(redis, streams, group)
    now_ms = await redis_now_ms(redis)
    async with connection(dsn) as conn:
        rows = await conn.fetch(
            "SELECT consumer, shards, applied_total, events_per_second, lag_ms, cpu_class, last_seen"
            " FROM worker_heartbeats ORDER BY consumer"
        )
        applied = await conn.fetchval("SELECT coalesce(sum(applied_events), 0) FROM stream_positions")
    workers = [
        WorkerHeartbeat(
            consumer=r["consumer"],
            shards=list(r["shards"]),
            applied_total=r["applied_total"],
            events_per_second=r["events_per_second"],
            lag_ms=r["lag_ms"],
            cpu_class=r["cpu_class"],
            last_seen=r["last_seen"],
        )
        for r in rows
    ]
    return Status(now_ms=now_ms, streams=backlogs, workers=workers, applied_events=int(applied))
