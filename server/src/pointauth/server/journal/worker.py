"""The write-behind worker: reads its shards' event streams with a consumer group and applies
them to PostgreSQL in batches, acknowledging each entry only after its batch has committed.

Reading names only streams known to have undelivered entries: a scan (a small Lua script that
answers the lengths of `scan_chunk` streams a call) compares each stream's length with the one it
had when last looked at, and only streams that grew are read, one XREADGROUP each with a bounded COUNT. Redis
runs one command at a time, and a pipeline's commands back to back: so every pipeline the worker
sends is short too (`entries_per_round_trip`, `scan_chunk`, pipeline.KEYS_PER_ROUND_TRIP), a
few hundred microseconds of Redis time, and nothing it sends holds up a till's call for long.

Crash safety comes from that order: an entry is acknowledged (and may be trimmed) only once
PostgreSQL has it, and applying an entry twice is harmless (per-account sequence check, then
ON CONFLICT on the journal). Entries a crashed worker left pending are read again by the same
consumer on restart, or claimed by XAUTOCLAIM once idle too long. An entry that keeps failing
is moved to `dead_letters` after `max_deliveries`, with an error in the log.

Shard 0's stream also carries the group directory's changes (codec.DirectoryChange): they are
copied into their tables in the batch's transaction (journal/directory.py), newest version wins;
and rule set publications (codec.RuleSetPublished), copied into rule_sets the same way
(journal/rules.py), each version once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError, ResponseError

from pointauth.server.config import WriteBehindSettings
from pointauth.server.journal.events import (
    AuditRecord,
    DirectoryChange,
    EntryId,
    Event,
    IdempotencyNote,
    RuleSetPublished,
    StreamEntry,
    UndecodableEntry,
    decode,
    entry_record,
)
from pointauth.server.journal.lease import ShardLease
from pointauth.server.journal.migrate import PARTITIONS_AHEAD, create_partitions
from pointauth.server.journal.outage import failed_store
from pointauth.server.journal.pg import Connection, connect
from pointauth.server.journal.priority import CpuClass
from pointauth.server.journal.status import GROUP, StreamBacklog, redis_now_ms, stream_backlogs
from pointauth.server.journal.writer import BatchOutcome, Delivered, IdempotencyRow, JournalWriter
from pointauth.server.ledger import Keyspace
from pointauth.server.ledger.pipeline import in_rounds

log = logging.getLogger(__name__)

_SETTINGS = WriteBehindSettings()
"""The [writebehind] settings' defaults, which are this configuration's too: written once, there."""


@dataclass(frozen=True)
class WorkerConfig:
    index: int = 0
    """This worker applies the shards with shard % count == index."""
    count: int = 1
    consumer: str = field(default_factory=socket.gethostname)
    """Consumer name in the group: keep it across restarts so a restart resumes its own entries."""
    group: str = GROUP
    batch_size: int = _SETTINGS.batch_size
    """Entries read per round, spread over the streams that have some."""
    catchup_factor: int = 4
    """While behind (the last round was full), rounds read this many times batch_size:
    PostgreSQL's cost per batch is then shared by more events."""
    catchup_share: float = _SETTINGS.catchup_share
    """While catching up, the worker works at most this share of the time: after each full
    batch it pauses (1/share - 1) times as long as the batch took. A backlog is then worked off
    at a bounded pace, and the worker and its PostgreSQL backend, which would otherwise keep a
    core busy for the whole catch-up, leave the cores to Redis and the servers the rest of it."""
    streams_per_read: int = 64
    """At most this many streams are read per round (their XREADGROUPs are pipelined)."""
    max_read_count: int = 100
    """COUNT of one XREADGROUP: its Redis time grows with the entries it returns, and must stay
    far below 1 ms, since every till's call waits behind it."""
    entries_per_round_trip: int = 200
    """Entries read or acknowledged per pipelined round trip. Redis runs the commands of one
    pipeline back to back (measured: about 2.5 µs an entry read, 1 µs an entry acknowledged), and
    a till's call that arrives meanwhile waits for all of them: so a batch goes out in short
    pipelines of at most about half a millisecond each, not in one long one."""
    scan_chunk: int = 128
    """Streams looked at per round trip of the scan: one call of the scan script on a standalone
    Redis, that many one-stream calls pipelined on a cluster (each stream is its own slot). About
    2 µs of Redis time per stream, so a round trip holds Redis for some 250 µs."""
    poll_ms: int = _SETTINGS.poll_ms
    """Pause when every stream is empty (bounds the lag added by polling)."""
    claim_idle_ms: int = _SETTINGS.claim_idle_ms
    """Pending entries idle this long (a crashed or stuck consumer) are claimed."""
    max_deliveries: int = _SETTINGS.max_deliveries
    """An entry not applied after this many deliveries goes to dead_letters."""
    housekeeping_s: float = 1.0
    """Heartbeat (throughput, lag) and the XAUTOCLAIM check run at most this often."""
    trim_s: float = 10.0
    """Stream trimming, which reads every stream's group state, runs at most this often."""
    lease_ms: int = _SETTINGS.lease_ms
    """The worker's lease on its shards (journal/lease.py) lapses this long after its last
    renewal (each housekeeping): how long a worker for the same shards waits after this one dies."""
    idle_cpu: bool = False
    """Run in the kernel's idle CPU class while keeping up (journal/priority.py). `pointauth
    worker` sets it from [writebehind] idle_cpu; off for a worker that shares its thread with a
    server (`pointauth dev`), which the class would slow down too."""
    idle_cpu_max_lag_ms: int = _SETTINGS.idle_cpu_max_lag_ms
    """Behind by more than this, an idle-class worker returns to the normal class until caught up."""
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.catchup_share <= 1:
            raise ValueError(f"catchup_share {self.catchup_share} is not in (0, 1]")
        if not 0 <= self.index < self.count:
            raise ValueError(f"worker index {self.index} is not below worker count {self.count}")


class LeaseLost(Exception):
    """This worker's lease on its shards lapsed (it could not renew it in time) and another took it."""


class _Backoff:
    def __init__(self, initial: float, maximum: float) -> None:
        self.initial, self.maximum = initial, maximum
        self.current = initial

    def next(self) -> float:
        delay = self.current
        self.current = min(self.maximum, self.current * 2)
        return delay

    def reset(self) -> None:
        self.current = self.initial


class WriteBehindWorker:
    def __init__(self, redis: Redis, dsn: str, keyspace: Keyspace, config: WorkerConfig | None = None) -> None:
        self.redis = redis
        self.dsn = dsn
        self.keyspace = keyspace
        self.config = config or WorkerConfig()
        self.shards = [s for s in range(keyspace.shards) if s % self.config.count == self.config.index]
        self.streams = {keyspace.events(s): s for s in self.shards}
        # The scan names the same streams on every call and nothing else: encoded once, the
        # worker's packing of its calls costs about half as much.
        self._stream_names = [stream.encode() for stream in self.streams]
        self.writer = JournalWriter(keyspace)
        self.applied_total = 0
        self.dead_lettered = 0
        self.directory_changes_applied = 0
        """Group directory changes copied (delivered again after a crash: counted again)."""
        self.rule_sets_applied = 0
        """Rule set publications copied (delivered again after a crash: counted again)."""
        self.audit_records_applied = 0
        """Audit records copied (delivered again after a crash: counted again)."""
        self._conn: Connection | None = None
        self._batch: list[StreamEntry] | None = None
        # Streams whose own pending entries are still to be read again, and from which id: set at
        # start (a restart after a crash) and after losing Redis between commit and XACK.
        self._own_cursor: dict[str, str] = {}
        self._is_standalone: bool | None = None
        # XLEN of each stream when last looked at: a stream whose length grew has new entries.
        self._seen_len: dict[str, int] = {}
        # Per stream, the entries added (as the scans saw them grow) minus the entries read: what
        # is known to wait. Below zero when a read took entries added after the last scan, which
        # the next scan then counts: so a stream is read only when it has something to give.
        self._todo: dict[str, int] = {}
        # The streams whose _todo is above zero, in the order they are read in (round robin).
        self._dirty: dict[str, None] = {}
        self._catching_up = False
        self._scan_script = redis.register_script(_SCAN_LUA)
        self._claim_cursor: dict[str, str] = dict.fromkeys(self.streams, "0-0")
        self._months: set[tuple[int, int]] = set()
        self._next_housekeeping = 0.0
        self._next_trim = 0.0
        self._read_after = 0.0
        self._next_claim = 0.0
        self._rate_mark = (time.monotonic(), 0)
        self.events_per_second = 0.0
        self.lag_ms = 0
        self.cpu_class = CpuClass(self.config.idle_cpu_max_lag_ms)
        self.lease = ShardLease(
            redis, keyspace, self.config.index, self.config.count, self.config.consumer, self.config.lease_ms
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Applies events until `stop` is set; survives PostgreSQL and Redis outages."""
        backoff = _Backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
        log.info(
            "write-behind worker %s: %d of %d shards (index %d of %d)",
            self.config.consumer, len(self.shards), self.keyspace.shards, self.config.index, self.config.count,
        )  # fmt: skip
        ready = False
        if self.config.idle_cpu:
            self.cpu_class.enter()
        try:
            while not stop.is_set():
                try:
                    if not ready:
                        if not await self._take_lease(stop):
                            break  # stopped while another worker held the shards
                        await self._ensure_groups()
                        await self._find_work()
                        ready = True
                    await self._step(stop)
                    backoff.reset()
                except LeaseLost as exc:
                    # Another worker applies these shards now: this one's batch is not committed,
                    # and its entries go to that worker by XAUTOCLAIM.
                    log.error("write-behind: %s; waiting for the shards again", exc)
                    self._batch = None
                    ready = False
                except Exception as exc:
                    store = failed_store(exc)
                    if store is None:
                        if not (isinstance(exc, ResponseError) and "NOGROUP" in str(exc)):
                            raise
                        log.warning("write-behind: consumer group missing (Redis flushed or replaced); recreating it")
                        self._batch = None
                        ready = False
                        continue
                    delay = backoff.next()
                    log.warning(
                        "write-behind: %s unavailable (%s: %s); %d entries wait, retrying in %.1f s",
                        store, type(exc).__name__, exc, len(self._batch or ()), delay,
                    )  # fmt: skip
                    if store == "PostgreSQL":
                        # Whatever state the failure left it in, the connection is not used again.
                        self._discard_connection()
                    else:
                        # A batch may have committed without its XACK: read our pending entries again.
                        self._batch = None
                        ready = False
                    await _sleep(stop, delay)
        finally:
            self.cpu_class.leave()
            await self._close_connection()
            await self._release_lease()  # a no-op unless this worker holds it

    async def _take_lease(self, stop: asyncio.Event) -> bool:
        """Waits until this worker holds its shards' lease (False: stopped while waiting)."""
        told = ""
        while not stop.is_set():
            holder = await self.lease.take()
            if holder is None:
                if told:
                    log.info("write-behind: worker %s now holds lease %s", self.config.consumer, self.lease.field)
                return True
            if holder.consumer != told:
                told = holder.consumer
                log.warning(
                    "write-behind: worker %s (lease %s) applies some of these shards (lease %s wanted); waiting "
                    "until it stops, or for %.1f s after its last renewal if it died",
                    holder.consumer, holder.lease, self.lease.field, holder.remaining_ms / 1000,
                )  # fmt: skip
            await _sleep(stop, min(1.0, self.config.lease_ms / 3000))
        return False

    async def _release_lease(self) -> None:
        """At a clean stop: another worker for these shards may start at once."""
        try:
            await self.lease.release()
        except (RedisError, OSError) as exc:
            log.warning("write-behind: could not give back lease %s (%s); it lapses on its own", self.lease.field, exc)

    async def _find_work(self) -> None:
        """At start, and after losing Redis: each stream's exact state, once. Streams with
        entries pending (a crash, or a batch committed without its XACK) are read again from
        their start; those with undelivered entries are marked to be read."""
        backlogs = await stream_backlogs(self.redis, list(self.streams), self.config.group)
        self._seen_len = {b.stream: b.length for b in backlogs}
        self._own_cursor = {b.stream: "0-0" for b in backlogs if b.pending}
        self._todo = {b.stream: b.undelivered for b in backlogs}
        self._dirty = {b.stream: None for b in backlogs if b.undelivered}

    def _waiting(self, stream: str, added: int) -> None:
        self._todo[stream] = todo = self._todo.get(stream, 0) + added
        if todo > 0:
            self._dirty[stream] = None

    async def _ensure_groups(self) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in self.streams:
                pipe.xgroup_create(stream, self.config.group, id="0", mkstream=True)
            replies = await pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, ResponseError) and "BUSYGROUP" not in str(reply):
                raise reply

    async def _connection(self) -> Connection:
        if self._conn is not None and self._conn.is_closed():
            self._discard_connection()
        if self._conn is None:
            conn = await connect(self.dsn)
            try:
                await self.writer.prepare(conn)
            except BaseException:
                conn.terminate()
                raise
            self._conn = conn
        return self._conn

    def _discard_connection(self) -> None:
        """Drops the connection without a word to the server: after a failure it may be broken or
        mid-operation, and a polite close could wait on a server that is gone."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None or conn.is_closed():
            return
        try:
            await asyncio.wait_for(conn.close(), 2)
        except Exception as exc:
            log.debug("closing the PostgreSQL connection failed (%s); terminating it", exc)
            conn.terminate()

    async def _step(self, stop: asyncio.Event) -> None:
        now = time.monotonic()
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + self.config.housekeeping_s
            await self._housekeeping()
        started = time.monotonic()
        if self._batch is None:
            self._batch = await self._read()
        if not self._batch:
            self._batch = None
            self.lag_ms = 0  # nothing was waiting
            self._catching_up = False
            self.cpu_class.update(0, caught_up=True)
            await _sleep(stop, self.config.poll_ms / 1000)
            return
        # Kept until it has committed and been acknowledged: a PostgreSQL outage retries the same
        # batch instead of delivering its entries again.
        await self._process(self._batch)
        # The oldest entry of the batch just committed waited this long (entry ids carry Redis's
        # clock in ms; the worker runs beside it or close to it).
        self.lag_ms = max(0, int(time.time() * 1000) - min(e.entry_id.ms for e in self._batch))
        done = time.monotonic()
        if len(self._batch) < self._batch_size():
            # A short batch: let the next one gather for a moment, so that under a steady
            # trickle the worker scans and commits ~1/poll_ms a second, not once per event.
            self._read_after = done + self.config.poll_ms / 1000
            self._catching_up = False
        else:
            # A full one: more waits. Bigger batches from now on, each followed by a pause in
            # proportion to what it took (catchup_share).
            self._catching_up = True
            self._read_after = done + (done - started) * (1 / self.config.catchup_share - 1)
        self.cpu_class.update(self.lag_ms, caught_up=not self._catching_up)
        self._batch = None

    # -- reading --------------------------------------------------------------------------------

    def _batch_size(self) -> int:
        return self.config.batch_size * (self.config.catchup_factor if self._catching_up else 1)

    def _per_stream(self, streams: int) -> int:
        return min(self.config.max_read_count, max(1, -(-self._batch_size() // max(1, streams))))

    async def _read(self) -> list[StreamEntry]:
        if (wait := self._read_after - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        if self._own_cursor:
            entries = await self._read_own()
            if entries:
                return entries
        entries = []
        if time.monotonic() >= self._next_claim:
            self._next_claim = time.monotonic() + max(self.config.housekeeping_s, self.config.claim_idle_ms / 2000)
            entries = await self._claim_idle()
        if not self._dirty:
            await self._scan()
        return entries + await self._read_dirty()

    async def _scan(self) -> None:
        """Marks the streams that grew since last looked at, `scan_chunk` streams per round trip:
        a stream costs Redis about 2 µs, where a pipelined XLEN per stream would cost the worker
        ~13 µs of Python. Not all in one pipeline: Redis would run it in one go, about 2 ms for
        1,024 streams, 20 times a second, and the tills' calls would wait behind it (their p99
        beside an idle worker was about 1 ms higher so)."""
        names, chunk = self._stream_names, self.config.scan_chunk
        standalone = await self._standalone()
        lengths: list[int] = []
        for first in range(0, len(names), chunk):
            if standalone:
                lengths.extend(await self._scan_script(keys=names[first : first + chunk]))
                continue
            async with self.redis.pipeline(transaction=False) as pipe:
                for name in names[first : first + chunk]:
                    await self._scan_script(keys=[name], client=pipe)
                lengths.extend(length for reply in await pipe.execute() for length in reply)
        for stream, length in zip(self.streams, lengths, strict=True):
            grown = length - self._seen_len.get(stream, 0)
            if grown:
                # Shorter: trimmed by someone else (ours adjust the length they remember).
                self._seen_len[stream] = length
                if grown > 0:
                    self._waiting(stream, grown)

    async def _read_dirty(self) -> list[StreamEntry]:
        """Up to `streams_per_read` of the streams with entries, round robin, each by its own
        XREADGROUP asking for no more than the stream is known to hold (and max_read_count)."""
        streams = list(itertools.islice(self._dirty, self.config.streams_per_read))
        if not streams:
            return []
        per_stream = self._per_stream(len(streams))
        counts = {s: min(per_stream, self._todo[s]) for s in streams}
        entries = await self._read_group(dict.fromkeys(streams, ">"), counts)
        got: dict[str, int] = defaultdict(int)
        for e in entries:
            got[e.stream] += 1
        for stream in streams:
            del self._dirty[stream]
            # Nothing at all: another consumer took them (a change of the shard split), or the
            # stream lost them; the scan and the trim's exact count find whatever comes next.
            self._todo[stream] = self._todo[stream] - got[stream] if got[stream] else 0
            if self._todo[stream] > 0:
                self._dirty[stream] = None  # to the back: the other streams' turn first
        return entries

    async def _read_own(self) -> list[StreamEntry]:
        streams = list(itertools.islice(self._own_cursor, self.config.streams_per_read))
        count = self._per_stream(len(streams))
        entries = await self._read_group({s: self._own_cursor[s] for s in streams}, dict.fromkeys(streams, count))
        by_stream: dict[str, list[StreamEntry]] = defaultdict(list)
        for e in entries:
            by_stream[e.stream].append(e)
        for stream in streams:
            got = by_stream.get(stream, [])
            if len(got) < count:
                del self._own_cursor[stream]
            else:
                self._own_cursor[stream] = str(got[-1].entry_id)
        return entries

    async def _read_group(self, positions: dict[str, str], counts: dict[str, int]) -> list[StreamEntry]:
        # One XREADGROUP per stream: its Redis time is bounded by its count, whatever the number
        # of streams, and it is what a Redis Cluster (a slot per stream) needs anyway.
        entries: list[StreamEntry] = []
        for streams in _rounds(list(positions), counts, self.config.entries_per_round_trip):
            async with self.redis.pipeline(transaction=False) as pipe:
                for stream in streams:
                    position: dict[Any, Any] = {stream: positions[stream]}
                    pipe.xreadgroup(self.config.group, self.config.consumer, position, count=counts[stream])
                replies: list[Any] = await pipe.execute()
            for stream, reply in zip(streams, replies, strict=True):
                for _name, items in reply or []:
                    entries.extend(self._entries(stream, items))
        return entries

    async def _standalone(self) -> bool:
        if self._is_standalone is None:
            info: dict[str, Any] = await self.redis.info("server")
            self._is_standalone = info.get("redis_mode", "standalone") == "standalone"
        return self._is_standalone

    def _entries(self, stream: str, items: list[tuple[bytes, dict[bytes, bytes] | None]]) -> list[StreamEntry]:
        shard = self.streams[stream]
        return [StreamEntry(stream, shard, EntryId.parse(eid), fields or {}) for eid, fields in items]

    async def _claim_idle(self) -> list[StreamEntry]:
        def claim(pipe: Pipeline, stream: str) -> None:
            pipe.xautoclaim(
                stream, self.config.group, self.config.consumer, self.config.claim_idle_ms,
                start_id=self._claim_cursor[stream], count=_CLAIM_COUNT,
            )  # fmt: skip

        streams = list(self.streams)
        replies = await in_rounds(self.redis, streams, claim)
        claimed: list[StreamEntry] = []
        for stream, reply in zip(streams, replies, strict=True):
            cursor, items = reply[0], reply[1]
            self._claim_cursor[stream] = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
            claimed.extend(self._entries(stream, items))
        if claimed:
            log.warning("write-behind: claimed %d entries idle for over %d ms", len(claimed), self.config.claim_idle_ms)
        return claimed

    # -- applying -------------------------------------------------------------------------------

    async def _process(self, entries: list[StreamEntry]) -> None:
        deliveries: list[Delivered] = []
        notes: list[tuple[StreamEntry, IdempotencyNote]] = []
        directory: list[tuple[StreamEntry, DirectoryChange]] = []
        rule_sets: list[tuple[StreamEntry, RuleSetPublished]] = []
        audits: list[tuple[StreamEntry, AuditRecord]] = []
        undecodable: list[tuple[StreamEntry, str]] = []
        for entry in entries:
            try:
                decoded = decode(entry)
            except UndecodableEntry as exc:
                undecodable.append((entry, str(exc)))
                continue
            if isinstance(decoded, Event):
                deliveries.append(Delivered(entry, decoded))
            elif isinstance(decoded, DirectoryChange):
                directory.append((entry, decoded))
            elif isinstance(decoded, RuleSetPublished):
                rule_sets.append((entry, decoded))
            elif isinstance(decoded, AuditRecord):
                audits.append((entry, decoded))
            else:
                notes.append((entry, decoded))
        idempotency = await self._idempotency_rows(deliveries, notes)
        await self._ensure_partitions(deliveries)
        conn = await self._connection()
        outcome = await self.writer.apply(conn, deliveries, idempotency, directory, rule_sets, audits)
        dead = [(e, reason, 1) for e, reason in undecodable]
        dead += await self._exhausted(outcome)
        if dead:
            await self._dead_letter(conn, dead)
        await self._ack(
            [d.entry for d in outcome.acknowledged] + [e for e, _ in notes] + [e for e, _ in directory]
            + [e for e, _ in rule_sets] + [e for e, _ in audits] + [e for e, _, _ in dead]
        )  # fmt: skip
        self.applied_total += len(outcome.applied)
        self.directory_changes_applied += len(directory)
        self.rule_sets_applied += len(rule_sets)
        self.audit_records_applied += len(audits)

    async def _idempotency_rows(
        self, deliveries: list[Delivered], notes: list[tuple[StreamEntry, IdempotencyNote]]
    ) -> list[IdempotencyRow]:
        """The request-id records of this batch, copied so rehydrate can restore them.

        The ledger script keeps them in Redis, and puts each one (with its expiry) in the stream
        entry of its call's last event, or its note; the worker copies it from there. A record
        lost with Redis before that copy (the worker's lag, about a second) is not restored: a
        retry of that request then runs anew.
        """
        rows: list[IdempotencyRow] = []
        carried: set[tuple[str, str]] = set()
        keyed = [(d.entry, d.event.account, d.event.rid) for d in deliveries if d.event.rid]
        keyed += [(entry, n.account, n.rid) for entry, n in notes]
        for entry, account, rid in keyed:
            try:
                found = entry_record(entry)
            except UndecodableEntry as exc:
                log.warning("write-behind: %s; reading the record's key instead", exc)
                found = None
            if found is not None:
                record, expires_ms = found
                rows.append(IdempotencyRow(account, rid, record, datetime.fromtimestamp(expires_ms / 1000, UTC)))
                carried.add((account, rid))
        # Entries a script older than those fields wrote (during a rolling deploy), or a call's
        # earlier event whose last one came in another batch: read the key itself.
        with_rid = list({(a, r) for _, a, r in keyed} - carried)
        if with_rid:
            rows += await self._idempotency_keys(with_rid)
        # One row per key (a request id may come twice: redelivery, or an event and a note).
        return list({(r.account_id, r.request_id): r for r in rows}.values())

    async def _idempotency_keys(self, with_rid: list[tuple[str, str]]) -> list[IdempotencyRow]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for account, rid in with_rid:
                key = self.keyspace.idempotency(account, rid)
                pipe.get(key)
                pipe.pttl(key)
            replies: list[Any] = await pipe.execute()
        now_ms = time.time_ns() // 1_000_000
        rows: list[IdempotencyRow] = []
        for i, (account, rid) in enumerate(with_rid):
            record, ttl = replies[2 * i], replies[2 * i + 1]
            if isinstance(record, bytes) and isinstance(ttl, int) and ttl > 0:
                expires = datetime.fromtimestamp((now_ms + ttl) / 1000, UTC)
                rows.append(IdempotencyRow(account, rid, record, expires))
        return rows

    async def _ensure_partitions(self, deliveries: list[Delivered]) -> None:
        months = {_month(d.event.time) for d in deliveries} - self._months
        if not months:
            return
        conn = await self._connection()
        for year, month in sorted(months):
            await create_partitions(conn, datetime(year, month, 1, tzinfo=UTC), 1)
            self._months.add((year, month))

    async def _exhausted(self, outcome: BatchOutcome) -> list[tuple[StreamEntry, str, int]]:
        """Held-back entries that have used up their deliveries (to be dead-lettered)."""
        if not outcome.held:
            return []
        by_stream: dict[str, list[tuple[Delivered, str]]] = defaultdict(list)
        for item, why in outcome.held:
            by_stream[item.entry.stream].append((item, why))
        dead: list[tuple[StreamEntry, str, int]] = []
        for stream, held in by_stream.items():
            ids = sorted(d.entry.entry_id for d, _ in held)
            pending = await self.redis.xpending_range(
                stream, self.config.group, min=str(ids[0]), max=str(ids[-1]), count=len(ids) * 4 + 100,
                consumername=self.config.consumer,
            )  # fmt: skip
            delivered: dict[EntryId, int] = {}
            for p in pending:
                message_id = p["message_id"]
                if isinstance(message_id, bytes | str):
                    delivered[EntryId.parse(message_id)] = int(p["times_delivered"])
            for item, why in held:
                times = delivered.get(item.entry.entry_id, 1)
                if times >= self.config.max_deliveries:
                    dead.append((item.entry, why, times))
                else:
                    log.warning(
                        "write-behind: holding back %s (%s, delivery %d of %d)",
                        item.event.event_id, why, times, self.config.max_deliveries,
                    )  # fmt: skip
        return dead

    async def _dead_letter(self, conn: Connection, dead: list[tuple[StreamEntry, str, int]]) -> None:
        rows = []
        for entry, reason, times in dead:
            payload = next((entry.fields[f] for f in (b"e", b"i", b"g", b"u") if f in entry.fields), None)
            event = None
            try:
                decoded = decode(entry)
                event = decoded if isinstance(decoded, Event) else None
            except UndecodableEntry:
                pass
            rows.append(
                (
                    entry.stream, str(entry.entry_id), event.account if event else None,
                    event.seq if event else None, times, reason, payload,
                )
            )  # fmt: skip
            log.error(
                "write-behind: DEAD LETTER %s %s after %d deliveries: %s (kept in dead_letters; the account's "
                "later events will wait behind it until an operator repairs it)",
                entry.stream, entry.entry_id, times, reason,
            )  # fmt: skip
        await conn.executemany(
            "INSERT INTO dead_letters (stream, entry_id, account_id, seq, deliveries, reason, payload)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
            rows,
        )
        self.dead_lettered += len(rows)

    async def _ack(self, entries: list[StreamEntry]) -> None:
        by_stream: dict[str, list[str]] = defaultdict(list)
        for entry in entries:
            by_stream[entry.stream].append(str(entry.entry_id))
        sizes = {stream: len(ids) for stream, ids in by_stream.items()}
        for streams in _rounds(list(by_stream), sizes, self.config.entries_per_round_trip):
            async with self.redis.pipeline(transaction=False) as pipe:
                for stream in streams:
                    pipe.xack(stream, self.config.group, *by_stream[stream])
                await pipe.execute()

    # -- housekeeping ---------------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        # First, before anything that needs PostgreSQL: an outage there must not cost the lease.
        if not await self.lease.renew():
            raise LeaseLost(f"lease {self.lease.field} of worker {self.config.consumer} lapsed and was taken")
        now_ms = await redis_now_ms(self.redis)
        conn = await self._connection()
        if time.monotonic() >= self._next_trim:
            # Reading the group state of every stream costs a round of a thousand commands: the
            # exact lag comes with it every trim_s, and from the batches in between.
            self._next_trim = time.monotonic() + self.config.trim_s
            backlogs = await stream_backlogs(self.redis, list(self.streams), self.config.group)
            # Exact, where the scan infers: a stream it missed (trimmed or rewound by hand) is
            # read now.
            for b in backlogs:
                if b.undelivered > 0 >= self._todo.get(b.stream, 0):
                    self._todo[b.stream] = 0
                    self._waiting(b.stream, b.undelivered)
            oldest = [b.oldest_unapplied.ms for b in backlogs if b.oldest_unapplied is not None]
            self.lag_ms = max(0, now_ms - min(oldest)) if oldest else 0
            await self._trim(conn, backlogs)
        mark_time, mark_count = self._rate_mark
        elapsed = time.monotonic() - mark_time
        if elapsed >= 1.0:
            self.events_per_second = (self.applied_total - mark_count) / elapsed
            self._rate_mark = (time.monotonic(), self.applied_total)
        await self._heartbeat(conn)
        if _month(now_ms + 31 * 86_400_000) not in self._months:
            await create_partitions(conn, datetime.now(UTC), PARTITIONS_AHEAD)
            self._months.update(_month(now_ms + i * 28 * 86_400_000) for i in range(PARTITIONS_AHEAD))

    async def _trim(self, conn: Connection, backlogs: list[StreamBacklog]) -> None:
        """Trims each stream below the oldest entry PostgreSQL may still lack.

        That is below every pending entry, below the first undelivered one, and at most up to the
        applied position PostgreSQL recorded: acknowledgement follows commit, so all three agree
        unless someone acknowledged by hand.
        """
        rows = await conn.fetch(
            "SELECT stream, applied_ms, applied_seq FROM stream_positions WHERE stream = ANY($1::text[])",
            [b.stream for b in backlogs],
        )
        applied = {r["stream"]: EntryId(r["applied_ms"], r["applied_seq"]) for r in rows}
        below: dict[str, EntryId] = {}
        for b in backlogs:
            if b.stream in applied:
                bounds = [b.last_delivered.next(), applied[b.stream].next()]
                if b.oldest_pending is not None:
                    bounds.append(b.oldest_pending)
                below[b.stream] = min(bounds)

        def trim(pipe: Pipeline, stream: str) -> None:
            # Bounded like a read: trimming a long-neglected stream in one go would be slow.
            pipe.xtrim(stream, minid=str(below[stream]), approximate=True, limit=10 * self.config.max_read_count)

        trimmed = list(below)
        removed = await in_rounds(self.redis, trimmed, trim)
        # XTRIM is atomic and says how many it removed: the length the scan remembers drops by
        # as much, so entries added meanwhile still show as growth.
        for stream, count in zip(trimmed, removed, strict=True):
            if stream in self._seen_len:
                self._seen_len[stream] -= int(count)

    async def _heartbeat(self, conn: Connection) -> None:
        await conn.execute(
            """
            INSERT INTO worker_heartbeats
                (consumer, shards, applied_total, events_per_second, lag_ms, cpu_class, last_seen)
            VALUES ($1, $2, $3, $4, $5, $6, now())
            ON CONFLICT (consumer) DO UPDATE SET shards = EXCLUDED.shards, applied_total = EXCLUDED.applied_total,
                events_per_second = EXCLUDED.events_per_second, lag_ms = EXCLUDED.lag_ms,
                cpu_class = EXCLUDED.cpu_class, last_seen = now()
            """,
            self.config.consumer,
            self.shards,
            self.applied_total,
            self.events_per_second,
            self.lag_ms,
            self.cpu_class.state,
        )


def _rounds(streams: list[str], sizes: dict[str, int], per_round: int) -> list[list[str]]:
    """`streams` in consecutive groups whose sizes add up to at most `per_round` (a stream
    larger than that on its own is a group of its own)."""
    rounds: list[list[str]] = []
    current: list[str] = []
    total = 0
    for stream in streams:
        if current and total + sizes[stream] > per_round:
            rounds.append(current)
            current, total = [], 0
        current.append(stream)
        total += sizes[stream]
    if current:
        rounds.append(current)
    return rounds


def _month(ms: int) -> tuple[int, int]:
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.year, moment.month


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


# Entries claimed per stream per XAUTOCLAIM: a stuck consumer's entries come back over a few
# rounds, each command short.
_CLAIM_COUNT = 10

# The scan: KEYS streams; answers the length of each, in order. Reads only (no-writes). On a
# standalone Redis one call may name streams of many slots; on a cluster each call names one.
_SCAN_LUA = """#!lua flags=no-writes
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('XLEN', key) end
return out
"""
