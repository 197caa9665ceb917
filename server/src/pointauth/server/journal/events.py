"""The shard streams as the worker reads them: entry ids, entries, and the events they carry
(whose format ledger/codec.py defines)."""

from __future__ import annotations

from typing import NamedTuple

import msgspec

from pointauth.server.ledger.codec import (
    AuditRecord,
    DirectoryChange,
    Event,
    IdempotencyNote,
    RuleSetPublished,
    decode_stream_entry,
    stream_entry_record,
)

__all__ = [
    "AuditRecord",
    "DirectoryChange",
    "EntryId",
    "Event",
    "IdempotencyNote",
    "RuleSetPublished",
    "StreamEntry",
    "UndecodableEntry",
    "decode",
    "entry_record",
]


class EntryId(NamedTuple):
    """A stream entry id (Redis time in ms, sequence): ordered like the stream."""

    ms: int
    seq: int

    @classmethod
    def parse(cls, raw: bytes | str) -> EntryId:
        text = raw.decode() if isinstance(raw, bytes) else raw
        ms, _, seq = text.partition("-")
        return cls(int(ms), int(seq or 0))

    def next(self) -> EntryId:
        return EntryId(self.ms, self.seq + 1)

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"


class StreamEntry(NamedTuple):
    stream: str
    shard: int
    entry_id: EntryId
    fields: dict[bytes, bytes]


class UndecodableEntry(ValueError):
    """An entry that is neither an event, an idempotency note, a group directory change, a rule
    set publication nor an audit record: it can never be applied.

    So is an event from a ledger script older than the one whose events carry what it derived
    (the balance after each, allocations): upgrade the worker after the servers, once `pointauth
    status` shows no backlog of events the older servers wrote."""


def decode(entry: StreamEntry) -> Event | IdempotencyNote | DirectoryChange | RuleSetPublished | AuditRecord:
    try:
        return decode_stream_entry(entry.fields)
    except msgspec.DecodeError as exc:
        raise UndecodableEntry(f"entry {entry.entry_id} of {entry.stream}: {exc}") from exc


def entry_record(entry: StreamEntry) -> tuple[bytes, int] | None:
    """The idempotency record the entry carries, and the Unix ms it expires at (None: none)."""
    try:
        return stream_entry_record(entry.fields)
    except msgspec.DecodeError as exc:
        raise UndecodableEntry(f"entry {entry.entry_id} of {entry.stream}: {exc}") from exc
