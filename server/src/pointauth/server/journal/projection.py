"""An account's state as the journal makes it: the same arithmetic the ledger script does, so
the PostgreSQL projections (lots, transactions) equal what Redis stores after the same events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pointauth.server.journal.events import Event, LotEffect, Pos

# [lot id, points, expiry ms, kind, issuer, points returned by refunds]: the script's allocation.
AllocEntry = list[Any]


class ProjectionError(ValueError):
    """An event that does not fit the stored state: PostgreSQL and Redis have diverged."""


@dataclass
class Lot:
    points: int
    expire_ms: int
    kind: str
    issuer_id: str


@dataclass
class TxRecord:
    """A transaction record (the script's `x` hash entry), as stored in `transactions`."""

    account_id: str
    seq: int
    type: str
    time_ms: int
    points: int
    available: int
    held: int
    pos: Pos | None = None
    lots: list[LotEffect] = field(default_factory=list)
    alloc: list[AllocEntry] | None = None
    refunded: int = 0
    ref_seq: int | None = None
    state: str | None = None
    expire_ms: int | None = None
    captured: int | None = None
    released: int | None = None
    capture_seq: int | None = None
    amount: int | None = None

    def as_script_record(self) -> dict[str, Any]:
        """The msgpack map the ledger script keeps in the account's transactions hash."""
        rec: dict[str, Any] = {
            "type": self.type,
            "time": self.time_ms,
            "pts": self.points,
            "refunded": self.refunded,
            "available": self.available,
            "held": self.held,
            "lots": [list(lot) for lot in self.lots],
        }
        optional = {
            "pos": list(self.pos) if self.pos is not None else None,
            "alloc": self.alloc,
            "ref": self.ref_seq,
            "state": self.state,
            "exp": self.expire_ms,
            "captured": self.captured,
            "released": self.released,
            "capture": self.capture_seq,
            "amount": self.amount,
        }
        rec.update({key: value for key, value in optional.items() if value is not None})
        return rec


@dataclass
class OpenHold:
    points: int
    expire_ms: int


@dataclass
class AccountState:
    account_id: str
    last_seq: int = 0
    lots: dict[int, Lot] = field(default_factory=dict)
    holds: dict[int, OpenHold] = field(default_factory=dict)
    card_number: str | None = None
    opened_ms: int | None = None
    touched_lots: set[int] = field(default_factory=set)

    def available(self, now_ms: int) -> int:
        return sum(lot.points for lot in self.lots.values() if lot.expire_ms > now_ms)

    def held(self) -> int:
        return sum(hold.points for hold in self.holds.values())


class Projector:
    """Applies one account's events in sequence to its state and its transaction records.

    `records` holds the transaction records the events may refer to (loaded beforehand) and
    collects those created or changed; `changed` names the latter.
    """

    def __init__(self, records: dict[tuple[str, int], TxRecord]) -> None:
        self.records = records
        self.changed: set[tuple[str, int]] = set()

    def apply(self, state: AccountState, event: Event) -> None:
        if event.seq != state.last_seq + 1:
            raise ProjectionError(f"event {event.event_id} follows seq {state.last_seq}")
        self._apply_lots(state, event)
        handler = getattr(self, f"_on_{event.type.lower()}", None)
        if handler is None:
            raise ProjectionError(f"event {event.event_id} has unknown type {event.type}")
        handler(state, event)
        state.last_seq = event.seq

    def _apply_lots(self, state: AccountState, event: Event) -> None:
        for lot_id, delta, expire_ms, kind, issuer_id in event.lots:
            lot = state.lots.get(lot_id)
            if lot is None:
                lot = state.lots[lot_id] = Lot(0, expire_ms, kind, issuer_id)
            lot.points += delta
            if lot.points < 0:
                raise ProjectionError(f"event {event.event_id} takes lot {lot_id} below zero")
            state.touched_lots.add(lot_id)
            if lot.points == 0:
                del state.lots[lot_id]

    def _record(self, state: AccountState, seq: int, event: Event) -> TxRecord:
        rec = self.records.get((state.account_id, seq))
        if rec is None:
            raise ProjectionError(f"event {event.event_id} refers to unknown transaction {seq}")
        self.changed.add((state.account_id, seq))
        return rec

    def _new(self, acct: AccountState, event: Event, type_: str, **fields: Any) -> TxRecord:
        # The balance stamp is taken after the event, as the script stamps its records.
        rec = TxRecord(
            account_id=acct.account_id,
            seq=event.seq,
            type=type_,
            time_ms=event.time,
            points=event.pts,
            available=acct.available(event.time),
            held=acct.held(),
            pos=event.pos,
            lots=list(event.lots),
            **fields,
        )
        self.records[(acct.account_id, event.seq)] = rec
        self.changed.add((acct.account_id, event.seq))
        return rec

    def _on_account_opened(self, state: AccountState, event: Event) -> None:
        state.card_number = event.card
        state.opened_ms = event.time

    def _on_earn(self, state: AccountState, event: Event) -> None:
        self._new(state, event, event.type, amount=event.amount or 0)

    _on_grant = _on_earn

    def _on_hold_authorized(self, state: AccountState, event: Event) -> None:
        if event.hold_exp is None:
            raise ProjectionError(f"hold {event.event_id} has no expiry")
        state.holds[event.seq] = OpenHold(event.pts, event.hold_exp)
        alloc = [[lot_id, -delta, exp, kind, issuer, 0] for lot_id, delta, exp, kind, issuer in event.lots]
        self._new(state, event, "HOLD", alloc=alloc, state="HELD", expire_ms=event.hold_exp, captured=0, released=0)

    def _close_hold(self, state: AccountState, event: Event, new_state: str) -> TxRecord:
        ref = event.ref or 0
        if state.holds.pop(ref, None) is None:
            raise ProjectionError(f"event {event.event_id} closes hold {ref}, which is not open")
        hold = self._record(state, ref, event)
        hold.state = new_state
        return hold

    def _on_hold_captured(self, state: AccountState, event: Event) -> None:
        hold = self._close_hold(state, event, "CAPTURED")
        hold.captured, hold.released, hold.capture_seq = event.pts, event.released or 0, event.seq
        # The capture spends the hold's allocation in its order; the script does the same.
        used: list[AllocEntry] = []
        rest = event.pts
        for lot_id, pts, exp, kind, issuer, _ in hold.alloc or []:
            n = min(pts, rest)
            rest -= n
            if n > 0:
                used.append([lot_id, n, exp, kind, issuer, 0])
        self._new(state, event, "CAPTURE", alloc=used, ref_seq=event.ref)
        self.records[(state.account_id, event.seq)].lots = [(e[0], -e[1], e[2], e[3], e[4]) for e in used]

    def _on_hold_voided(self, state: AccountState, event: Event) -> None:
        hold = self._close_hold(state, event, "VOIDED")
        hold.released = event.pts

    def _on_hold_expired(self, state: AccountState, event: Event) -> None:
        hold = self._close_hold(state, event, "EXPIRED")
        hold.released = event.pts

    def _on_redeemed(self, state: AccountState, event: Event) -> None:
        alloc = [[lot_id, -delta, exp, kind, issuer, 0] for lot_id, delta, exp, kind, issuer in event.lots]
        self._new(state, event, "REDEMPTION", alloc=alloc)

    def _on_refunded(self, state: AccountState, event: Event) -> None:
        orig = self._record(state, event.ref or 0, event)
        orig.refunded += event.pts
        if orig.alloc is not None and orig.type in ("CAPTURE", "REDEMPTION"):
            # Points given back are counted per allocation entry (a lot appears once in one).
            returned = {lot_id: n for lot_id, n, *_ in event.lots}
            for entry in orig.alloc:
                entry[5] += returned.get(entry[0], 0)
        self._new(state, event, "REFUND", ref_seq=event.ref)

    def _on_lots_expired(self, state: AccountState, event: Event) -> None:
        pass
