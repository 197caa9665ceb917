"""Applies a batch of stream events to PostgreSQL in one transaction: journal rows (COPY into a
staging table, then merged with ON CONFLICT DO NOTHING) and the projections they change.

Per account, events apply strictly in sequence: an event at or below the account's `last_seq`
is a redelivery (skipped, and acknowledged), the next one applies, and one beyond it means an
earlier event has not arrived yet (a gap): it and the account's later events are held back,
unacknowledged, to be delivered again.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import msgspec

from pointauth.server.journal.events import EntryId, Event, StreamEntry
from pointauth.server.journal.pg import Connection, Record
from pointauth.server.journal.projection import AccountState, ProjectionError, Projector, RecordKey
from pointauth.server.ledger import Keyspace
from pointauth.server.ledger.codec import AllocEntry, LotEntry, PointOfSaleRef, TransactionRecord

log = logging.getLogger(__name__)

JOURNAL_COLUMNS = (
    "event_id", "account_id", "seq", "type", "points", "lots", "issuer_id", "company_id", "store_id",
    "terminal_id", "channel", "request_id", "event_time", "ref_seq", "released", "amount", "purchase_time",
    "hold_expire_ms", "card_number", "stream", "entry_id",
)  # fmt: skip
_COLS = ", ".join(JOURNAL_COLUMNS)
_TX_COLUMNS = (
    "account_id", "seq", "type", "time_ms", "points", "refunded", "available", "held", "pos", "lots", "alloc",
    "ref_seq", "state", "expire_ms", "captured", "released", "capture_seq", "amount",
)  # fmt: skip
_JSON_TX_COLUMNS = {"pos", "lots", "alloc"}


class IdempotencyRow(NamedTuple):
    account_id: str
    request_id: str
    record: bytes
    expires_at: datetime


class Delivered(NamedTuple):
    """A stream entry and the event it carries."""

    entry: StreamEntry
    event: Event


@dataclass
class BatchOutcome:
    applied: list[Delivered] = field(default_factory=list)
    duplicates: list[Delivered] = field(default_factory=list)
    # Not applied, not to be acknowledged: (delivery, why).
    held: list[tuple[Delivered, str]] = field(default_factory=list)

    @property
    def acknowledged(self) -> list[Delivered]:
        return self.applied + self.duplicates


def to_time(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _json(value: Any) -> str | None:
    return None if value is None else msgspec.json.encode(value).decode()


class _Retry(Exception):
    """Rolls the transaction back so the batch is projected again without a failing event."""


class JournalWriter:
    def __init__(self, keyspace: Keyspace) -> None:
        self.keyspace = keyspace

    async def prepare(self, conn: Connection) -> None:
        """Per connection: the staging table COPY writes into."""
        await conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS journal_stage (LIKE journal INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )

    async def apply(
        self, conn: Connection, batch: Sequence[Delivered], idempotency: Sequence[IdempotencyRow] = ()
    ) -> BatchOutcome:
        blocked: dict[str, tuple[int, str]] = {}
        while True:
            try:
                async with conn.transaction():
                    return await self._apply_once(conn, batch, idempotency, blocked)
            except _Retry:
                continue

    async def _apply_once(
        self,
        conn: Connection,
        batch: Sequence[Delivered],
        idempotency: Sequence[IdempotencyRow],
        blocked: dict[str, tuple[int, str]],
    ) -> BatchOutcome:
        by_account: dict[str, list[Delivered]] = defaultdict(list)
        for item in batch:
            by_account[item.event.account].append(item)
        for items in by_account.values():
            items.sort(key=lambda d: d.event.seq)
        accounts = sorted(by_account)
        states = await self._load_states(conn, accounts)
        refs = {(d.event.account, d.event.ref) for d in batch if d.event.ref is not None}
        projector = Projector(await self._load_records(conn, refs))

        outcome = BatchOutcome()
        for account in accounts:
            state = states.setdefault(account, AccountState(account))
            stop_at, why = blocked.get(account, (0, ""))
            for item in by_account[account]:
                seq = item.event.seq
                if seq <= state.last_seq:
                    outcome.duplicates.append(item)
                elif stop_at and seq >= stop_at:
                    outcome.held.append((item, why))
                elif seq > state.last_seq + 1:
                    outcome.held.append((item, f"gap: {account} is at seq {state.last_seq}, got {seq}"))
                else:
                    try:
                        projector.apply(state, item.event)
                    except ProjectionError as exc:
                        log.error("write-behind: cannot apply %s: %s", item.event.event_id, exc)
                        blocked[account] = (seq, f"diverged: {exc}")
                        raise _Retry from exc
                    outcome.applied.append(item)

        if outcome.duplicates:
            await self._verify_duplicates(conn, outcome)
        applied = outcome.applied
        await self._write_accounts(conn, states, {d.event.account for d in applied})
        await self._write_journal(conn, applied)
        await self._write_lots(conn, states)
        await self._write_records(conn, [(key, projector.records[key]) for key in sorted(projector.changed)])
        await self._write_idempotency(conn, idempotency)
        await self._write_positions(conn, outcome.acknowledged)
        return outcome

    async def _verify_duplicates(self, conn: Connection, outcome: BatchOutcome) -> None:
        """A redelivered event must be the one the journal has: a different event under the same
        id means Redis lost its state and restarted the account's sequence (it was not
        rehydrated). Such events are held back, to be dead-lettered, never silently dropped."""
        dups = outcome.duplicates
        rows = await conn.fetch(
            "SELECT account_id, seq, type, event_time FROM journal"
            " WHERE (account_id, seq) IN (SELECT * FROM unnest($1::text[], $2::bigint[]))",
            [d.event.account for d in dups],
            [d.event.seq for d in dups],
        )
        stored = {(r["account_id"], r["seq"]): (r["type"], r["event_time"]) for r in rows}
        outcome.duplicates = []
        for d in dups:
            if stored.get((d.event.account, d.event.seq)) == (d.event.type, to_time(d.event.time)):
                outcome.duplicates.append(d)
            else:
                why = f"conflict: the journal has another event {d.event.event_id}"
                log.error("write-behind: %s (Redis state lost and not rehydrated?)", why)
                outcome.held.append((d, why))

    async def _load_states(self, conn: Connection, accounts: list[str]) -> dict[str, AccountState]:
        # FOR UPDATE: two workers never project the same account at once (e.g. while the shard
        # split changes), so last_seq cannot move under us.
        rows = await conn.fetch(
            "SELECT account_id, last_seq, card_number FROM accounts WHERE account_id = ANY($1::text[])"
            " ORDER BY account_id FOR UPDATE",
            accounts,
        )
        states = {
            r["account_id"]: AccountState(r["account_id"], r["last_seq"], card_number=r["card_number"]) for r in rows
        }
        if not states:
            return states
        known = list(states)
        for r in await conn.fetch(
            "SELECT account_id, lot_id, points, expire_ms, kind, issuer_id FROM lots"
            " WHERE account_id = ANY($1::text[])",
            known,
        ):
            states[r["account_id"]].lots[r["lot_id"]] = LotEntry(
                r["lot_id"], r["points"], r["expire_ms"], r["kind"], r["issuer_id"]
            )
        return states

    async def _load_records(self, conn: Connection, refs: set[RecordKey]) -> dict[RecordKey, TransactionRecord]:
        if not refs:
            return {}
        accounts = [a for a, _ in refs]
        seqs = [s for _, s in refs]
        rows = await conn.fetch(
            f"SELECT {', '.join(_TX_COLUMNS)} FROM transactions"
            " WHERE (account_id, seq) IN (SELECT * FROM unnest($1::text[], $2::bigint[]))",
            accounts,
            seqs,
        )
        return {(r["account_id"], r["seq"]): record_from_row(r) for r in rows}

    async def _write_accounts(self, conn: Connection, states: dict[str, AccountState], touched: set[str]) -> None:
        if not touched:
            return
        rows = [
            (
                s.account_id,
                self.keyspace.shard_of(s.account_id),
                s.card_number,
                s.last_seq,
                None if s.opened_ms is None else to_time(s.opened_ms),
            )
            for s in (states[a] for a in sorted(touched))
        ]
        await conn.execute(
            """
            INSERT INTO accounts (account_id, shard, card_number, last_seq, opened_at)
            SELECT * FROM unnest($1::text[], $2::int[], $3::text[], $4::bigint[], $5::timestamptz[])
            ON CONFLICT (account_id) DO UPDATE SET
                last_seq = EXCLUDED.last_seq,
                card_number = COALESCE(accounts.card_number, EXCLUDED.card_number),
                opened_at = COALESCE(accounts.opened_at, EXCLUDED.opened_at),
                updated_at = now()
            """,
            *map(list, zip(*rows, strict=True)),
        )
        cards = [(r[2], r[0]) for r in rows if r[2] is not None]
        if cards:
            # The first account to claim a card keeps it, as the Redis card index does (HSETNX).
            await conn.execute(
                "INSERT INTO cards (card_number, account_id) SELECT * FROM unnest($1::text[], $2::text[])"
                " ON CONFLICT DO NOTHING",
                *map(list, zip(*cards, strict=True)),
            )

    async def _write_journal(self, conn: Connection, applied: list[Delivered]) -> None:
        if not applied:
            return
        await conn.copy_records_to_table(
            "journal_stage", records=[journal_row(d) for d in applied], columns=JOURNAL_COLUMNS
        )
        # ON CONFLICT: a redelivered event that slipped past the sequence check is written once.
        await conn.execute(f"INSERT INTO journal ({_COLS}) SELECT {_COLS} FROM journal_stage ON CONFLICT DO NOTHING")

    async def _write_lots(self, conn: Connection, states: dict[str, AccountState]) -> None:
        upsert: list[tuple[str, int, int, int, str, str]] = []
        gone: list[tuple[str, int]] = []
        for state in states.values():
            for lot_id in sorted(state.touched_lots):
                lot = state.lots.get(lot_id)
                if lot is None:
                    gone.append((state.account_id, lot_id))
                else:
                    upsert.append((state.account_id, lot_id, lot.points, lot.expire_ms, lot.kind, lot.issuer_id))
        if gone:
            await conn.execute(
                "DELETE FROM lots WHERE (account_id, lot_id) IN (SELECT * FROM unnest($1::text[], $2::bigint[]))",
                *map(list, zip(*gone, strict=True)),
            )
        if upsert:
            await conn.execute(
                """
                INSERT INTO lots (account_id, lot_id, points, expire_ms, kind, issuer_id)
                SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::text[], $6::text[])
                ON CONFLICT (account_id, lot_id) DO UPDATE SET points = EXCLUDED.points
                """,
                *map(list, zip(*upsert, strict=True)),
            )

    async def _write_records(self, conn: Connection, records: list[tuple[RecordKey, TransactionRecord]]) -> None:
        if not records:
            return
        rows = [record_row(key, rec) for key, rec in records]
        types = [
            "text", "bigint", "text", "bigint", "bigint", "bigint", "bigint", "bigint", "text", "text", "text",
            "bigint", "text", "bigint", "bigint", "bigint", "bigint", "bigint",
        ]  # fmt: skip
        select = ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(types))
        casts = ", ".join(f"{c}::jsonb" if c in _JSON_TX_COLUMNS else c for c in _TX_COLUMNS)
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in _TX_COLUMNS[2:])
        await conn.execute(
            f"INSERT INTO transactions ({', '.join(_TX_COLUMNS)})"
            f" SELECT {casts} FROM unnest({select}) AS t({', '.join(_TX_COLUMNS)})"
            f" ON CONFLICT (account_id, seq) DO UPDATE SET {updates}",
            *map(list, zip(*rows, strict=True)),
        )

    async def _write_idempotency(self, conn: Connection, rows: Sequence[IdempotencyRow]) -> None:
        if not rows:
            return
        await conn.execute(
            """
            INSERT INTO idempotency_records (account_id, request_id, record, expires_at)
            SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::timestamptz[])
            ON CONFLICT (account_id, request_id)
                DO UPDATE SET record = EXCLUDED.record, expires_at = EXCLUDED.expires_at
            """,
            *map(list, zip(*rows, strict=True)),
        )

    async def _write_positions(self, conn: Connection, acknowledged: Iterable[Delivered]) -> None:
        highest: dict[str, EntryId] = {}
        counts: dict[str, int] = defaultdict(int)
        for d in acknowledged:
            stream = d.entry.stream
            highest[stream] = max(highest.get(stream, d.entry.entry_id), d.entry.entry_id)
            counts[stream] += 1
        if not highest:
            return
        streams = sorted(highest)
        await conn.execute(
            """
            INSERT INTO stream_positions AS p (stream, applied_ms, applied_seq, applied_events)
            SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[])
            ON CONFLICT (stream) DO UPDATE SET
                -- Claimed entries may be older than ones applied before: the position only grows.
                applied_ms = CASE WHEN (EXCLUDED.applied_ms, EXCLUDED.applied_seq) > (p.applied_ms, p.applied_seq)
                    THEN EXCLUDED.applied_ms ELSE p.applied_ms END,
                applied_seq = CASE WHEN (EXCLUDED.applied_ms, EXCLUDED.applied_seq) > (p.applied_ms, p.applied_seq)
                    THEN EXCLUDED.applied_seq ELSE p.applied_seq END,
                applied_events = p.applied_events + EXCLUDED.applied_events,
                updated_at = now()
            """,
            streams,
            [highest[s].ms for s in streams],
            [highest[s].seq for s in streams],
            [counts[s] for s in streams],
        )


def journal_row(d: Delivered) -> tuple[Any, ...]:
    e = d.event
    pos = e.pos
    company, store, terminal, channel = (
        (pos.company_id, pos.store_id, pos.terminal_id, pos.channel) if pos is not None else (None, None, None, None)
    )
    issuer = e.lots[0].issuer_id if e.type in ("EARN", "GRANT") and e.lots else None
    return (
        e.event_id, e.account, e.seq, e.type, e.pts, _json(e.lots), issuer, company, store,
        terminal, channel, e.rid or None, to_time(e.time), e.ref, e.released, e.amount,
        to_time(e.ptime) if e.ptime else None, e.hold_exp, e.card, d.entry.stream, str(d.entry.entry_id),
    )  # fmt: skip


def record_row(key: RecordKey, r: TransactionRecord) -> tuple[Any, ...]:
    """The transactions row of a record. A reference, state or expiry the record's type does not
    have is NULL, so that operators' SQL (`WHERE ref_seq IS NOT NULL`) means what it says."""
    account_id, seq = key
    return (
        account_id, seq, r.type, r.time, r.pts, r.refunded, r.available, r.held, _json(r.pos), _json(r.lots),
        _json(r.alloc) if r.alloc else None, r.ref or None, r.state or None, r.exp or None, r.captured,
        r.released, r.capture or None, r.amount,
    )  # fmt: skip


def record_from_row(r: Record) -> TransactionRecord:
    """A transactions row as the record Redis keeps. Rows written before records had one shape
    have NULL where their type had no field: those read as the record's defaults."""
    return TransactionRecord(
        type=r["type"],
        time=r["time_ms"],
        pos=msgspec.json.decode(r["pos"], type=PointOfSaleRef),
        pts=r["points"],
        refunded=r["refunded"],
        available=r["available"],
        held=r["held"],
        lots=msgspec.json.decode(r["lots"], type=list[LotEntry]),
        alloc=msgspec.json.decode(r["alloc"], type=list[AllocEntry]) if r["alloc"] is not None else [],
        ref=r["ref_seq"] or 0,
        state=r["state"] or "",
        exp=r["expire_ms"] or 0,
        captured=r["captured"] or 0,
        released=r["released"] or 0,
        capture=r["capture_seq"] or 0,
        amount=r["amount"] or 0,
    )
