"""ledger/codec.py, the one definition of what Redis stores: its pure functions, and a round trip
through everything the ledger script itself wrote for one account taken through every
operation (each record type and hold state, each event type).

Maps are compared field by field, each field's value byte for byte: Lua's cmsgpack orders a
map's keys by how the table was built (a record loaded and changed packs them in another order
than a new one), so a map's bytes depend on its history, never its content."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis

from pointauth.server.clock import ManualClock
from pointauth.server.domain.earning import Rate, RuleSet
from pointauth.server.ledger import Keyspace, Ledger, codec
from pointauth.server.ledger.codec import (
    AllocEntry,
    AllocReturn,
    Event,
    HoldEntry,
    IdempotencyNote,
    LotEntry,
    OpResult,
    StoredAccount,
    TransactionRecord,
)
from tests.conftest import START_MS
from tests.journal.support import DAY_MS, TILL, every_kind, fingerprint

T = START_MS
EXPIRY = {2: T + 30 * DAY_MS, 3: T + DAY_MS}  # every_kind's lots: 2 regular, 3 limited-time
ACCOUNT = "codec-1"


def lot(lot_id: int, points: int) -> LotEntry:
    return LotEntry(lot_id, points, EXPIRY[lot_id], "R" if lot_id == 2 else "L", "acme")


def alloc(lot_id: int, points: int, returned: int = 0) -> AllocEntry:
    return AllocEntry(lot_id, points, EXPIRY[lot_id], "R" if lot_id == 2 else "L", "acme", returned)


def packed_fields(packed: bytes) -> dict[str, bytes]:
    """A msgpack map's fields, each value as packed: equal maps give equal results in any order."""
    return {k: bytes(v) for k, v in msgspec.msgpack.decode(packed, type=dict[str, msgspec.Raw]).items()}


# -- pure functions ----------------------------------------------------------------------------


def test_an_account_is_a_hash_a_lot_set_and_an_open_hold_set() -> None:
    lots = {7: LotEntry(7, 120, 1_800_000_000_000, "L", "acme"), 12: LotEntry(12, 5, 1_800_000_000_000, "R", "acme")}
    account = codec.account_of(9, 4, lots, {8: HoldEntry(30, 1_795_000_600_000)})
    assert (account.lot_points, account.held_points) == (125, 30)
    encoded = codec.encode_account(account)
    assert encoded.fields == {b"seq": b"9", b"x0": b"4", b"lp": b"125", b"hp": b"30"}
    # Expiry and kind are the score; the id key (digit count as a letter, then the digits).
    assert encoded.lots == {b"a7:120:acme": 3_600_000_000_000, b"b12:5:acme": 3_600_000_000_001}
    assert encoded.holds == {b"8:30": 1_795_000_600_000}
    stored = codec.decode_account(
        encoded.fields,
        [(m, float(s)) for m, s in encoded.lots.items()],
        [(m, float(s)) for m, s in encoded.holds.items()],
    )
    assert stored == account


def test_the_lot_set_orders_lots_for_spending() -> None:
    # Soonest expiry first, limited-time first at an equal expiry, then lot ids in numeric order.
    lots = [(5, 2_000, "R"), (10, 1_000, "R"), (9, 1_000, "R"), (100, 1_000, "L"), (1_000_000, 1_000, "R")]
    order = sorted((codec.lot_score(exp, kind), codec.lot_member_of(i, 1, b"x")) for i, exp, kind in lots)
    assert [codec.decode_lot(m, s).lot_id for s, m in order] == [100, 9, 10, 1_000_000, 5]


def test_a_seeded_account_has_no_x0() -> None:
    seeded = {b"seq": b"1", b"lp": b"500", b"hp": b"0"}
    lots = [(codec.lot_member_of(1, 500, b"seed-retail"), float(codec.lot_score(1_800_000_000_000, b"R")))]
    account = codec.decode_account(seeded, lots)
    lot = LotEntry(1, 500, 1_800_000_000_000, "R", "seed-retail")
    assert account == StoredAccount(seq=1, x0=None, lot_points=500, lots={1: lot})
    assert codec.encode_account(account).fields == seeded
    assert codec.lot_member(lot) == b"a1:500:seed-retail"


@pytest.mark.parametrize(
    ("stored", "lots", "holds", "message"),
    [
        ({b"seq": b""}, [], [], "account hash field b'seq' = b'': ValueError("),
        ({b"owner": b"me"}, [], [], "account hash field b'owner' = b'me': ValueError('unknown field')"),
        ({}, [(b"a3:5", 7.0)], [], "lot b'a3:5' scored 7.0: ValueError("),
        ({}, [(b"b3:5:acme", 7.0)], [], "lot b'b3:5:acme' scored 7.0: ValueError('no lot id key')"),
        ({}, [(b"a3:5:acme", 7.5)], [], "lot b'a3:5:acme' scored 7.5: ValueError('score is not a whole number')"),
        ({}, [], [(b"x:5", 7.0)], "open hold b'x:5' scored 7.0: ValueError("),
    ],
)
def test_an_account_it_cannot_read_is_named(
    stored: dict[bytes, bytes], lots: list[tuple[bytes, float]], holds: list[tuple[bytes, float]], message: str
) -> None:
    with pytest.raises(msgspec.DecodeError) as raised:
        codec.decode_account(stored, lots, holds)
    assert str(raised.value).startswith(message)


def test_a_record_has_one_shape_and_older_records_read_with_defaults() -> None:
    # An EARN record as the script wrote them before records had one shape: only its type's fields.
    older = {"type": "EARN", "time": T, "pos": ["acme", "s", "t", 1], "refunded": 0, "pts": 5,
             "lots": [[2, 5, T + 1, "R", "acme"]], "amount": 500, "available": 5, "held": 0}  # fmt: skip
    record = codec.decode_record(msgspec.msgpack.encode(older))
    assert record == TransactionRecord(
        type="EARN", time=T, pos=codec.PointOfSaleRef("acme", "s", "t", 1), pts=5, refunded=0, available=5, held=0,
        lots=[LotEntry(2, 5, T + 1, "R", "acme")], amount=500,
    )  # fmt: skip
    assert list(msgspec.msgpack.decode(codec.encode_record(record))) == [
        "type", "time", "pos", "pts", "refunded", "available", "held", "lots", "alloc", "ref", "state", "exp",
        "captured", "released", "capture", "amount", "racct", "lines", "qual", "rp",
    ]  # fmt: skip
    assert codec.record_field(12) == "12"


def test_an_event_holds_only_the_fields_its_type_carries() -> None:
    event = Event(type="HOLD_VOIDED", seq=7, account="a", time=T, pts=10, lots=[lot(2, 10)], available=280, held=0,
                  ref=6, rid="void")  # fmt: skip
    assert msgspec.msgpack.decode(codec.encode_event(event)) == {
        "type": "HOLD_VOIDED", "seq": 7, "account": "a", "time": T, "pts": 10,
        "lots": [[2, 10, EXPIRY[2], "R", "acme"]], "available": 280, "held": 0, "rid": "void", "ref": 6,
    }  # fmt: skip
    assert codec.decode_event(codec.encode_event(event)) == event
    assert event.event_id == "a.7"


def test_an_event_without_the_balance_after_it_is_not_read() -> None:
    # What a script before events carried their derivations wrote: the journal cannot copy it.
    older = {"type": "EARN", "seq": 2, "account": "a", "time": T, "pts": 5, "lots": []}
    with pytest.raises(msgspec.DecodeError, match="missing required field `available`"):
        codec.decode_event(msgspec.msgpack.encode(older))


def test_stream_entries_carry_an_event_a_note_or_a_rule_set_publication() -> None:
    event = Event(type="LOTS_EXPIRED", seq=3, account="a", time=T, pts=4, lots=[lot(3, -4)], available=0, held=0)
    note = IdempotencyNote(account="a", rid="r-1")
    assert codec.decode_stream_entry({b"e": codec.encode_event(event)}) == event
    assert codec.decode_stream_entry({b"i": codec.encode_note(note)}) == note
    rule_set = RuleSet(2, T, base_rates=(("acme", "", Rate(2, 100)),))
    published = codec.RuleSetPublished(2, T, rule_set)
    assert codec.decode_stream_entry({b"u": codec.encode_rule_set_published(published)}) == published
    with pytest.raises(
        msgspec.DecodeError, match=r"a stream entry has field b'e', b'i', b'g', b'u' or b'a', not \[b'x'\]"
    ):
        codec.decode_stream_entry({b"x": b""})


def test_idempotency_record_layout() -> None:
    answer = msgspec.msgpack.encode({"code": "OK", "tx": 4})
    raw = codec.idempotency_record("f" * 32, answer)
    assert raw == b"f" * 32 + answer
    assert codec.split_idempotency_record(raw) == ("f" * 32, answer)
    assert codec.decode_result(answer) == OpResult(code="OK", tx=4)
    with pytest.raises(ValueError, match="a fingerprint has 32 characters, not 31"):
        codec.idempotency_record("f" * 31, answer)
    with pytest.raises(msgspec.DecodeError, match="longer than 32 bytes"):
        codec.split_idempotency_record(b"f" * 32)


def test_hold_index_members_and_card_owners() -> None:
    assert codec.hold_member("member-1", 12) == "member-1.12"
    assert codec.parse_hold_member(b"member-1.12") == ("member-1", 12)
    with pytest.raises(msgspec.DecodeError, match=r"hold index member 'member-1' is not <account>\.<seq>"):
        codec.parse_hold_member("member-1")
    assert codec.card_owner_value("member-1") == b"member-1"
    assert (codec.decode_card_owner(b"member-1"), codec.decode_card_owner(None)) == ("member-1", None)


# -- what the script wrote ---------------------------------------------------------------------


@dataclass
class Stored:
    """every_kind's answers, and everything Redis holds of its account, raw."""

    answers: dict[str, OpResult]
    account: dict[bytes, bytes]
    lots: list[tuple[bytes, float]]
    open_holds: list[tuple[bytes, float]]
    records: dict[bytes, bytes]
    entries: list[dict[bytes, bytes]]
    holds: list[tuple[bytes, float]]
    idempotency: dict[str, bytes | None]
    card: bytes | None


@pytest.fixture
async def stored(ledger: Ledger, clock: ManualClock, redis: Redis, keyspace: Keyspace) -> Stored:
    answers = await every_kind(ledger, clock, ACCOUNT)
    keys = keyspace.account(ACCOUNT)
    # The client never decodes responses: every reply below is bytes (redis-py types allow str too).
    replies: list[Any] = [
        await redis.hgetall(keys.account),
        await redis.zrange(keys.lots, 0, -1, withscores=True),
        await redis.zrange(keys.open_holds, 0, -1, withscores=True),
        await redis.hgetall(keys.transactions),
        await redis.xrange(keys.events),
        await redis.zrange(keys.holds, 0, -1, withscores=True),
        {rid: await redis.get(keyspace.idempotency(ACCOUNT, rid)) for rid in answers},
        await redis.hget(keyspace.card_bucket(f"card-{ACCOUNT}"), f"card-{ACCOUNT}"),
    ]
    account, lots, open_holds, records, entries, holds, idempotency, card = replies
    entries = [fields for _, fields in entries]
    return Stored(answers, account, lots, open_holds, records, entries, holds, idempotency, card)


async def test_the_account_round_trips_byte_for_byte(stored: Stored) -> None:
    account = codec.decode_account(stored.account, stored.lots, stored.open_holds)
    # Opening the account wrote its first card into the hash: the field every card call checks.
    # Opened at T: the card is active, physical, linked then; the member joined then.
    card = codec.CardLink(state="A", kind="P", link_ms=T)
    assert account == codec.account_of(
        15,
        2,
        {2: lot(2, 255)},
        {15: HoldEntry(5, T + DAY_MS + 600_000)},
        {f"card-{ACCOUNT}": card},
        opened_ms=T,
        profile=codec.MemberProfile(jt=T),
        first_earn_ms=T,  # its earn at T was the member's first
    )
    assert stored.account[codec.card_field(f"card-{ACCOUNT}")] == b"AP%d" % T
    # Beside the state, the pruning hint: the time of record x0 (the earn at T, seq 2), which the
    # commits since stopped at as too young to forget.
    assert stored.account[codec.PRUNE_HINT_FIELD] == b"%d" % T
    encoded = codec.encode_account(account)
    assert encoded.fields == {k: v for k, v in stored.account.items() if k != codec.PRUNE_HINT_FIELD}
    assert [(member, float(score)) for member, score in encoded.lots.items()] == stored.lots
    assert [(member, float(score)) for member, score in encoded.holds.items()] == stored.open_holds


async def test_every_record_round_trips_and_holds_what_the_script_derived(stored: Stored) -> None:
    raw = stored.records
    records = {int(seq): codec.decode_record(packed) for seq, packed in raw.items()}
    for seq, packed in raw.items():
        assert packed_fields(codec.encode_record(records[int(seq)])) == packed_fields(packed), seq
        # One shape: every field, whatever the type.
        assert len(packed_fields(packed)) == len(TransactionRecord.__struct_fields__), seq

    def record(type_: Any, pts: int, available: int, held: int, lots: list[LotEntry], **more: Any) -> TransactionRecord:
        time = more.pop("time", T)
        return TransactionRecord(type_, time, TILL, pts, more.pop("refunded", 0), available, held, lots, **more)

    assert records == {
        2: record("EARN", 300, 300, 0, [lot(2, 300)], refunded=40, amount=30_000),
        3: record("GRANT", 100, 400, 0, [lot(3, 100)]),
        4: record("HOLD", 150, 250, 150, [lot(3, -100), lot(2, -50)], alloc=[alloc(3, 100), alloc(2, 50)],
                  state="CAPTURED", exp=T + 600_000, captured=120, released=30, capture=5),
        5: record("CAPTURE", 120, 280, 0, [lot(3, -100), lot(2, -20)], refunded=30,
                  alloc=[alloc(3, 100, returned=10), alloc(2, 20, returned=20)], ref=4),
        6: record("HOLD", 10, 270, 10, [lot(2, -10)], alloc=[alloc(2, 10)], state="VOIDED", exp=T + 600_000,
                  released=10),
        8: record("REDEMPTION", 50, 230, 0, [lot(2, -50)], refunded=50, alloc=[alloc(2, 50, returned=50)]),
        9: record("REFUND", 30, 260, 0, [lot(2, 20), lot(3, 10)], ref=5),
        10: record("REFUND", 50, 310, 0, [lot(2, 50)], ref=8),
        11: record("REFUND", 40, 270, 0, [lot(2, -40)], ref=2),
        12: record("HOLD", 20, 250, 20, [lot(3, -10), lot(2, -10)], alloc=[alloc(3, 10), alloc(2, 10)],
                   state="EXPIRED", exp=T + 60_000, released=20),
        15: record("HOLD", 5, 255, 5, [lot(2, -5)], alloc=[alloc(2, 5)], state="HELD", exp=T + DAY_MS + 600_000,
                   time=T + DAY_MS),
    }  # fmt: skip


async def test_every_event_round_trips_and_carries_what_the_script_derived(stored: Stored) -> None:
    entries = stored.entries
    decoded = [codec.decode_stream_entry(fields) for fields in entries]
    for fields, entry in zip(entries, decoded, strict=True):
        # The ledger script writes no directory changes nor rule set publications.
        assert isinstance(entry, Event | IdempotencyNote)
        packed = fields[codec.EVENT_FIELD] if isinstance(entry, Event) else fields[codec.NOTE_FIELD]
        again = codec.encode_event(entry) if isinstance(entry, Event) else codec.encode_note(entry)
        assert packed_fields(again) == packed_fields(packed), entry
    assert [e for e in decoded if isinstance(e, IdempotencyNote)] == [IdempotencyNote(ACCOUNT, "refused")]

    def event(seq: int, type_: str, pts: int, lots: list[LotEntry], available: int, held: int, **more: Any) -> Event:
        if more.pop("request", True):
            more = {"rid": more.pop("rid"), "pos": TILL} | more
        return Event(type_, seq, ACCOUNT, more.pop("time", T), pts, lots, available, held, **more)

    assert [e for e in decoded if isinstance(e, Event)] == [
        event(1, "ACCOUNT_OPENED", 0, [], 0, 0, rid="open", pos=None, card=f"card-{ACCOUNT}", kind="P",
              profile=codec.MemberProfile(jt=T)),
        event(2, "EARN", 300, [lot(2, 300)], 300, 0, rid="earn", amount=30_000, ptime=T, first=True),
        event(3, "GRANT", 100, [lot(3, 100)], 400, 0, rid="grant", amount=0, ptime=0),
        event(4, "HOLD_AUTHORIZED", 150, [lot(3, -100), lot(2, -50)], 250, 150, rid="hold-captured",
              hold_exp=T + 600_000, alloc=[alloc(3, 100), alloc(2, 50)]),
        event(5, "HOLD_CAPTURED", 120, [lot(2, 30)], 280, 0, rid="capture", released=30, ref=4,
              alloc=[alloc(3, 100), alloc(2, 20)], spent=[lot(3, -100), lot(2, -20)]),
        event(6, "HOLD_AUTHORIZED", 10, [lot(2, -10)], 270, 10, rid="hold-voided", hold_exp=T + 600_000,
              alloc=[alloc(2, 10)]),
        event(7, "HOLD_VOIDED", 10, [lot(2, 10)], 280, 0, rid="void", ref=6),
        event(8, "REDEEMED", 50, [lot(2, -50)], 230, 0, rid="redeem", alloc=[alloc(2, 50)]),
        event(9, "REFUNDED", 30, [lot(2, 20), lot(3, 10)], 260, 0, rid="refund-capture", ref=5, refunded=30,
              returned=[AllocReturn(1, 20), AllocReturn(0, 10)]),
        event(10, "REFUNDED", 50, [lot(2, 50)], 310, 0, rid="refund-redemption", ref=8, refunded=50,
              returned=[AllocReturn(0, 50)]),
        event(11, "REFUNDED", 40, [lot(2, -40)], 270, 0, rid="refund-earn", ref=2, refunded=40),
        event(12, "HOLD_AUTHORIZED", 20, [lot(3, -10), lot(2, -10)], 250, 20, rid="hold-expired",
              hold_exp=T + 60_000, alloc=[alloc(3, 10), alloc(2, 10)]),
        event(13, "HOLD_EXPIRED", 20, [lot(3, 10), lot(2, 10)], 270, 0, request=False, ref=12, time=T + 60_000),
        event(14, "LOTS_EXPIRED", 10, [lot(3, -10)], 260, 0, request=False, time=T + DAY_MS),
        event(15, "HOLD_AUTHORIZED", 5, [lot(2, -5)], 255, 5, rid="hold-held", hold_exp=T + DAY_MS + 600_000,
              alloc=[alloc(2, 5)], time=T + DAY_MS),
    ]  # fmt: skip


async def test_each_call_s_stream_entry_carries_its_idempotency_record_and_expiry(
    stored: Stored, redis: Redis, keyspace: Keyspace
) -> None:
    """The last event of a call, or a refusal's note, carries the record its key holds and the
    instant the key expires at: the write-behind copies both from the entry."""
    carried: dict[str, tuple[bytes, int]] = {}
    for fields in stored.entries:
        found = codec.stream_entry_record(fields)
        entry = codec.decode_stream_entry(fields)
        assert isinstance(entry, Event | IdempotencyNote)
        if found is not None:
            assert entry.rid is not None
            assert entry.rid not in carried  # one entry per call
            carried[entry.rid] = found
    kept = {rid: raw for rid, raw in stored.idempotency.items() if raw is not None}
    assert {rid: record for rid, (record, _) in carried.items()} == kept
    for rid, (_, expires_ms) in carried.items():
        assert await redis.pexpiretime(keyspace.idempotency(ACCOUNT, rid)) == expires_ms, rid
    with pytest.raises(msgspec.DecodeError, match="no expiry ms"):
        codec.stream_entry_record({codec.EVENT_FIELD: b"", codec.RECORD_FIELD: b"f" * 40})


async def test_idempotency_records_hold_the_answers_given(stored: Stored) -> None:
    answers = stored.answers
    kept = {rid: raw for rid, raw in stored.idempotency.items() if raw is not None}
    assert sorted(kept) == sorted(set(answers) - {"expire-hold", "expire-lot"})  # balance calls keep none
    for rid, raw in kept.items():
        fp, packed = codec.split_idempotency_record(raw)
        assert fp == fingerprint(rid)
        assert codec.idempotency_record(fp, packed) == raw
        assert codec.decode_result(packed) == answers[rid], rid
    assert answers["refused"] == OpResult(
        code="FAILED_PRECONDITION", available=270, held=0, reason="INSUFFICIENT_POINTS",
        message="the account has 270 points available, 1000000 were asked for",
        meta={"available_points": "270", "requested_points": "1000000"},
    )  # fmt: skip
    assert answers["capture"] == OpResult(code="OK", available=280, held=0, tx=5, pts=120, released=30)


async def test_the_hold_index_and_the_card_index(stored: Stored) -> None:
    assert stored.holds == [(b"codec-1.15", float(T + DAY_MS + 600_000))]
    (member, _), = stored.holds  # fmt: skip
    assert codec.parse_hold_member(member) == (ACCOUNT, 15)
    assert codec.hold_member(ACCOUNT, 15).encode() == member
    assert codec.decode_card_owner(stored.card) == ACCOUNT
    assert codec.card_owner_value(ACCOUNT) == stored.card
