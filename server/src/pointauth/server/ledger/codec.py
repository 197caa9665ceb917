"""Everything pointauth stores in Redis, defined once: the account hash, transaction records,
stream events, the hold index, the card index, idempotency records, and the ledger function's
arguments and answers. Python reads and writes them only through this module; ledger.lua, which
must write them itself, points here at each format, and tests/ledger/test_codec.py checks this
module against what the script wrote.

Every decoder raises msgspec.DecodeError on a value it cannot read.

Lua's cmsgpack packs a table's keys in the order of its hash part, which depends on how the
table was built, so a map the script wrote and the same map encoded here hold equal fields but
not in the same order; arrays and scalars are byte for byte the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from pointauth.server.domain.ids import parse_transaction_id, transaction_id

LotKindCode = Literal["R", "L"]
TransactionType = Literal["EARN", "GRANT", "HOLD", "CAPTURE", "REDEMPTION", "REFUND"]


class PointOfSaleRef(msgspec.Struct, array_like=True, frozen=True):
    """Where a request came from: [company, store, terminal, channel]."""

    company_id: str
    store_id: str
    terminal_id: str
    channel: int


class LotEntry(msgspec.Struct, array_like=True, frozen=True):
    """A lot, or one transaction's effect on a lot (`points` is then a signed delta):
    [lot id, points, expiry ms, kind, issuer]."""

    lot_id: int
    points: int
    expire_ms: int
    kind: LotKindCode
    issuer_id: str


class AllocEntry(msgspec.Struct, array_like=True, frozen=True):
    """Points a hold, capture or redemption took from one lot, in spending order, and how many
    of them refunds have given back: [lot id, points, expiry ms, kind, issuer, returned]."""

    lot_id: int
    points: int
    expire_ms: int
    kind: LotKindCode
    issuer_id: str
    returned: int = 0


class AllocReturn(msgspec.Struct, array_like=True, frozen=True):
    """A refund's points given back to one lot count against entry `index` (from 0) of the
    original's allocation, whose points returned are now `returned`: [index, returned]."""

    index: int
    returned: int


# -- the account hash ------------------------------------------------------------------------
# One hash per account. Fields: `seq` (the account's last event), `x0` (the oldest transaction
# record not yet pruned; absent means 1), `l:<lot id>` = "points:expiry ms:kind:issuer" per lot
# with points (unheld), `h:<hold seq>` = "points:expiry ms" per open hold. Plain text rather
# than msgpack: Redis keeps a small hash of short strings compactly (listpack), and this hash
# exists for every account.

SEQ_FIELD = b"seq"
X0_FIELD = b"x0"
LOT_PREFIX = b"l:"
HOLD_PREFIX = b"h:"


class HoldEntry(msgspec.Struct, frozen=True):
    """An open hold as the account hash keeps it."""

    points: int
    expire_ms: int


class AccountHash(msgspec.Struct):
    """An account hash, decoded. `x0` None: the field is absent (a seeded account, which has no
    transaction records); the script reads that as 1."""

    seq: int = 0
    x0: int | None = None
    lots: dict[int, LotEntry] = {}
    holds: dict[int, HoldEntry] = {}


_KINDS: dict[bytes, LotKindCode] = {b"R": "R", b"L": "L"}


def lot_field(lot_id: int) -> bytes:
    return b"l:%d" % lot_id


def lot_value(lot: LotEntry) -> bytes:
    return lot_value_of(lot.points, lot.expire_ms, lot.kind.encode(), lot.issuer_id.encode())


def lot_value_of(points: int, expire_ms: int, kind: bytes, issuer_id: bytes) -> bytes:
    """lot_value without a LotEntry, for writers of millions of lots (seed)."""
    return b"%d:%d:%s:%s" % (points, expire_ms, kind, issuer_id)


def hold_field(hold_seq: int) -> bytes:
    return b"h:%d" % hold_seq


def hold_value(hold: HoldEntry) -> bytes:
    return b"%d:%d" % (hold.points, hold.expire_ms)


def encode_account(account: AccountHash) -> dict[bytes, bytes]:
    """Every field of the hash, for one HSET of a new or emptied key."""
    fields = {SEQ_FIELD: b"%d" % account.seq}
    if account.x0 is not None:
        fields[X0_FIELD] = b"%d" % account.x0
    for lot_id in sorted(account.lots):
        fields[lot_field(lot_id)] = lot_value(account.lots[lot_id])
    for seq in sorted(account.holds):
        fields[hold_field(seq)] = hold_value(account.holds[seq])
    return fields


def decode_account(stored: Mapping[bytes, bytes]) -> AccountHash:
    """An HGETALL reply (bytes, as the clients here never decode responses)."""
    account = AccountHash()
    for field, value in stored.items():
        try:
            if field.startswith(LOT_PREFIX):
                lot_id = int(field[2:])
                points, expire_ms, kind, issuer = value.split(b":", 3)
                account.lots[lot_id] = LotEntry(lot_id, int(points), int(expire_ms), _KINDS[kind], issuer.decode())
            elif field.startswith(HOLD_PREFIX):
                points, expire_ms = value.split(b":")
                account.holds[int(field[2:])] = HoldEntry(int(points), int(expire_ms))
            elif field == SEQ_FIELD:
                account.seq = int(value)
            elif field == X0_FIELD:
                account.x0 = int(value)
            else:
                raise ValueError("unknown field")
        except (ValueError, KeyError) as exc:
            raise msgspec.DecodeError(f"account hash field {field!r} = {value!r}: {exc!r}") from None
    return account


# -- transaction records ---------------------------------------------------------------------
# The account's transactions hash: field <seq> (decimal) = a msgpack map, kept for refunds,
# receipts and open holds. One shape: the script writes every field in every record, whatever
# its type. Records written before it did (until they age out of the refund window) lack the
# fields their type did not use, which decode as the defaults below.


class TransactionRecord(msgspec.Struct, frozen=True):
    """A transaction as the ledger keeps it. `pts`: points earned, held, used or refunded;
    `available`/`held`: the balance right after it; `lots`: its effects on lots (a capture's:
    the points it spent); `alloc`: where a hold's, capture's or redemption's points came from;
    `ref`: the hold a capture captured, the transaction a refund refunded; `state`, `exp`,
    `captured`, `released`, `capture`: a hold's resolution (`capture`: its capture's seq);
    `amount`: an earn's purchase amount. Unused fields are 0, "" or []."""

    type: TransactionType
    time: int
    pos: PointOfSaleRef
    pts: int
    refunded: int
    available: int
    held: int
    lots: list[LotEntry]
    alloc: list[AllocEntry] = []
    ref: int = 0
    state: str = ""
    exp: int = 0
    captured: int = 0
    released: int = 0
    capture: int = 0
    amount: int = 0


def record_field(seq: int) -> str:
    return str(seq)


_encode = msgspec.msgpack.Encoder().encode
_decode_record = msgspec.msgpack.Decoder(TransactionRecord).decode


def encode_record(record: TransactionRecord) -> bytes:
    return _encode(record)


def decode_record(raw: bytes) -> TransactionRecord:
    return _decode_record(raw)


# -- stream events ---------------------------------------------------------------------------
# Each shard's stream. An entry has field `e` (an event, a msgpack map) or `i` (a note: a request
# id answered without an event, a refusal, whose idempotency record is to be kept durable too).

EVENT_FIELD = b"e"
NOTE_FIELD = b"i"


class Event(msgspec.Struct, frozen=True, omit_defaults=True):
    """One state change of one account, with everything the script derived for it, so that the
    journal's projections copy instead of computing. Fields the event's type does not carry are
    None (absent from the map). Unknown fields are ignored, so a later script may add some.

    Every event: `pts`, `lots` (its effects on lots' unheld points) and `available`/`held` (the
    balance right after it). By type:
    - ACCOUNT_OPENED: `card`, `rid`;
    - EARN, GRANT: `amount`, `ptime` (purchase time), `pos`, `rid`;
    - HOLD_AUTHORIZED: `hold_exp`, `alloc`, `pos`, `rid`;
    - HOLD_CAPTURED: `ref` (the hold), `released` (points given back), `alloc` (the part of the
      hold's allocation used), `spent` (the capture's own lot effects: what it used; `lots` is
      what it released), `pos`, `rid`;
    - HOLD_VOIDED, HOLD_EXPIRED: `ref` (the hold), `pts` released; HOLD_EXPIRED has no request;
    - REDEEMED: `alloc`, `pos`, `rid`;
    - REFUNDED: `ref` (the original), `refunded` (the original's points refunded, now), `returned`
      (a capture's or redemption's: one entry per lot effect, the allocation entry it counts
      against), `pos`, `rid`;
    - LOTS_EXPIRED: `lots` taking what was left of lots past their expiry; no request.
    """

    type: str
    seq: int
    account: str
    time: int
    pts: int
    lots: list[LotEntry]
    available: int
    held: int
    rid: str | None = None
    pos: PointOfSaleRef | None = None
    card: str | None = None
    hold_exp: int | None = None
    released: int | None = None
    ref: int | None = None
    amount: int | None = None
    ptime: int | None = None
    alloc: list[AllocEntry] | None = None
    spent: list[LotEntry] | None = None
    refunded: int | None = None
    returned: list[AllocReturn] | None = None

    @property
    def event_id(self) -> str:
        return transaction_id(self.account, self.seq)


class IdempotencyNote(msgspec.Struct, frozen=True):
    """A stream entry's `i`: request `rid` of `account` was refused; its record is to be copied."""

    account: str
    rid: str


_decode_event = msgspec.msgpack.Decoder(Event).decode
_decode_note = msgspec.msgpack.Decoder(IdempotencyNote).decode


def encode_event(event: Event) -> bytes:
    return _encode(event)


def decode_event(raw: bytes) -> Event:
    return _decode_event(raw)


def encode_note(note: IdempotencyNote) -> bytes:
    return _encode(note)


def decode_stream_entry(fields: Mapping[bytes, bytes]) -> Event | IdempotencyNote:
    """A stream entry's fields: the event, or the note, it carries."""
    if EVENT_FIELD in fields:
        return _decode_event(fields[EVENT_FIELD])
    if NOTE_FIELD in fields:
        return _decode_note(fields[NOTE_FIELD])
    raise msgspec.DecodeError(f"a stream entry has field {EVENT_FIELD!r} or {NOTE_FIELD!r}, not {sorted(fields)}")


# -- the ledger function's arguments and answers, and idempotency records ----------------------


class OpResult(msgspec.Struct, frozen=True):
    """What a ledger function call answered; `code` is OK or the gRPC status name of a refusal."""

    code: str
    available: int = 0
    held: int = 0
    reason: str = ""
    message: str = ""
    meta: dict[str, str] = {}
    tx: int = 0
    pts: int = 0
    released: int = 0
    exp: int = 0
    lots: list[LotEntry] = []


_decode_result = msgspec.msgpack.Decoder(OpResult).decode


def encode_args(args: Mapping[str, Any]) -> bytes:
    """The call's msgpack argument (ARGV 7)."""
    return _encode(args)


def decode_result(raw: bytes) -> OpResult:
    return _decode_result(raw)


# An idempotency record (a string key per account and request id) is the request's fingerprint
# followed by the packed answer, which a retry gets back byte for byte: so the answer is kept as
# the script packed it, never encoded again here.
FINGERPRINT_CHARS = 32


def idempotency_record(fingerprint: str, packed_result: bytes) -> bytes:
    if len(fingerprint) != FINGERPRINT_CHARS:
        raise ValueError(f"a fingerprint has {FINGERPRINT_CHARS} characters, not {len(fingerprint)}")
    return fingerprint.encode() + packed_result


def split_idempotency_record(raw: bytes) -> tuple[str, bytes]:
    """(fingerprint, packed answer); decode_result reads the answer."""
    if len(raw) <= FINGERPRINT_CHARS:
        raise msgspec.DecodeError(f"an idempotency record is longer than {FINGERPRINT_CHARS} bytes")
    return raw[:FINGERPRINT_CHARS].decode(), raw[FINGERPRINT_CHARS:]


# -- the hold index and the card index -------------------------------------------------------
# The shard's hold index is a sorted set of open holds scored by expiry, each member the hold's
# transaction id `<account>.<seq>`. A card bucket is a hash: card number -> account id.


def hold_member(account_id: str, hold_seq: int) -> str:
    return transaction_id(account_id, hold_seq)


def parse_hold_member(member: bytes | str) -> tuple[str, int]:
    """(account id, hold seq)."""
    text = member.decode() if isinstance(member, bytes) else member
    parsed = parse_transaction_id(text)
    if parsed is None:
        raise msgspec.DecodeError(f"hold index member {text!r} is not <account>.<seq>")
    return parsed


def card_owner_value(account_id: str) -> bytes:
    return account_id.encode()


def decode_card_owner(raw: bytes | str | None) -> str | None:
    """The account a card bucket's field names; None for a card not linked."""
    return raw.decode() if isinstance(raw, bytes) else raw
