"""The events the ledger script appends to each shard's stream, as the worker reads them."""

from __future__ import annotations

from typing import NamedTuple

import msgspec

# One effect on a lot: (lot id, signed delta of its unheld points, expiry ms, kind, issuer).
LotEffect = tuple[int, int, int, str, str]
# Point of sale: (company, store, terminal, channel).
Pos = tuple[str, str, str, int]


class Event(msgspec.Struct, frozen=True):
    """One state change of one account; unknown fields are ignored so the script may add some."""

    type: str
    seq: int
    account: str
    time: int
    pts: int = 0
    lots: list[LotEffect] = []
    rid: str | None = None
    pos: Pos | None = None
    card: str | None = None
    hold_exp: int | None = None
    released: int | None = None
    ref: int | None = None
    amount: int | None = None
    ptime: int | None = None

    @property
    def event_id(self) -> str:
        return f"{self.account}.{self.seq}"


class IdempotencyNote(msgspec.Struct, frozen=True):
    """Field `i`: a request id was answered without an event (a refusal); its record, in Redis
    under the idempotency key, is to be copied like those of events. Not written by the script
    yet; read when it is."""

    account: str
    rid: str


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


_decode_event = msgspec.msgpack.Decoder(Event).decode
_decode_note = msgspec.msgpack.Decoder(IdempotencyNote).decode


class UndecodableEntry(ValueError):
    """An entry that is neither an event nor an idempotency note: it can never be applied."""


def decode(entry: StreamEntry) -> Event | IdempotencyNote:
    try:
        if b"e" in entry.fields:
            return _decode_event(entry.fields[b"e"])
        if b"i" in entry.fields:
            return _decode_note(entry.fields[b"i"])
    except msgspec.DecodeError as exc:
        raise UndecodableEntry(f"entry {entry.entry_id} of {entry.stream}: {exc}") from exc
    raise UndecodableEntry(f"entry {entry.entry_id} of {entry.stream} has no field e or i")
