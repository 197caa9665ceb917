"""What one account's events make of the PostgreSQL projections: its lots, its transaction records
(holds among them) and its accounts row.

The events carry everything the ledger script derived (allocations, what a capture used and
released, what a refund gave back and where, the balance after each event), so this module
copies; the ledger's arithmetic lives in ledger.lua alone. Records come out as the script
stores them (ledger/codec.py, TransactionRecord): rehydrate writes them back to Redis as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

from msgspec.structs import replace

from pointauth.server.ledger.codec import AllocEntry, Event, LotEntry, TransactionRecord, TransactionType

RecordKey = tuple[str, int]
"""(account id, seq) of a transaction record."""

_T = TypeVar("_T")


class ProjectionError(ValueError):
    """An event that does not fit the stored state: PostgreSQL and Redis have diverged."""


@dataclass
class AccountState:
    account_id: str
    last_seq: int = 0
    lots: dict[int, LotEntry] = field(default_factory=dict)
    """Unheld points per lot, as the account hash keeps them: a lot at zero is gone."""
    card_number: str | None = None
    opened_ms: int | None = None
    touched_lots: set[int] = field(default_factory=set)


class Projector:
    """Applies one account's events in sequence to its state and its transaction records.

    `records` holds the transaction records the events may refer to (loaded beforehand) and
    collects those created or changed; `changed` names the latter.
    """

    def __init__(self, records: dict[RecordKey, TransactionRecord]) -> None:
        self.records = records
        self.changed: set[RecordKey] = set()

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
        for effect in event.lots:
            # An effect on a lot that is gone recreates it, with the expiry, kind and issuer the
            # effect names (the lot's own), as the script does.
            lot = state.lots.get(effect.lot_id)
            if lot is None:
                lot = replace(effect, points=0)
            points = lot.points + effect.points
            if points < 0:
                raise ProjectionError(f"event {event.event_id} takes lot {effect.lot_id} below zero")
            state.touched_lots.add(effect.lot_id)
            if points == 0:
                state.lots.pop(effect.lot_id, None)
            else:
                state.lots[effect.lot_id] = replace(lot, points=points)

    def _record(self, state: AccountState, seq: int | None, event: Event) -> TransactionRecord:
        rec = self.records.get((state.account_id, seq or 0))
        if rec is None:
            raise ProjectionError(f"event {event.event_id} refers to unknown transaction {seq}")
        return rec

    def _put(self, state: AccountState, seq: int, rec: TransactionRecord) -> None:
        self.records[(state.account_id, seq)] = rec
        self.changed.add((state.account_id, seq))

    def _new(
        self,
        state: AccountState,
        event: Event,
        type_: TransactionType,
        *,
        lots: list[LotEntry] | None = None,
        alloc: list[AllocEntry] | None = None,
        hold_state: str = "",
        exp: int = 0,
    ) -> None:
        """The record the event made, field for field as the script's new_tx makes it."""
        self._put(
            state,
            event.seq,
            TransactionRecord(
                type=type_,
                time=event.time,
                pos=_carried(event, "pos", event.pos),
                pts=event.pts,
                refunded=0,
                available=event.available,
                held=event.held,
                lots=event.lots if lots is None else lots,
                alloc=alloc or [],
                ref=event.ref or 0,
                state=hold_state,
                exp=exp,
                amount=event.amount or 0,
            ),
        )

    def _resolve_hold(self, state: AccountState, event: Event, new_state: str, released: int, **more: int) -> None:
        hold = self._record(state, event.ref, event)
        if hold.type != "HOLD" or hold.state != "HELD":
            raise ProjectionError(f"event {event.event_id} resolves hold {event.ref}, which is not open")
        self._put(state, event.ref or 0, replace(hold, state=new_state, released=released, **more))

    def _on_account_opened(self, state: AccountState, event: Event) -> None:
        state.card_number = event.card
        state.opened_ms = event.time

    def _on_earn(self, state: AccountState, event: Event) -> None:
        self._new(state, event, "EARN")

    def _on_grant(self, state: AccountState, event: Event) -> None:
        self._new(state, event, "GRANT")

    def _on_hold_authorized(self, state: AccountState, event: Event) -> None:
        alloc = _carried(event, "alloc", event.alloc)
        self._new(state, event, "HOLD", alloc=alloc, hold_state="HELD", exp=_carried(event, "hold_exp", event.hold_exp))

    def _on_hold_captured(self, state: AccountState, event: Event) -> None:
        released = _carried(event, "released", event.released)
        self._resolve_hold(state, event, "CAPTURED", released, captured=event.pts, capture=event.seq)
        used, spent = _carried(event, "alloc", event.alloc), _carried(event, "spent", event.spent)
        self._new(state, event, "CAPTURE", lots=spent, alloc=used)

    def _on_hold_voided(self, state: AccountState, event: Event) -> None:
        self._resolve_hold(state, event, "VOIDED", event.pts)

    def _on_hold_expired(self, state: AccountState, event: Event) -> None:
        self._resolve_hold(state, event, "EXPIRED", event.pts)

    def _on_redeemed(self, state: AccountState, event: Event) -> None:
        self._new(state, event, "REDEMPTION", alloc=_carried(event, "alloc", event.alloc))

    def _on_refunded(self, state: AccountState, event: Event) -> None:
        orig = self._record(state, event.ref, event)
        alloc = list(orig.alloc)
        for back in event.returned or []:
            if not 0 <= back.index < len(alloc):
                raise ProjectionError(f"event {event.event_id} returns to allocation entry {back.index} of {event.ref}")
            alloc[back.index] = replace(alloc[back.index], returned=back.returned)
        refunded = _carried(event, "refunded", event.refunded)
        self._put(state, event.ref or 0, replace(orig, refunded=refunded, alloc=alloc))
        self._new(state, event, "REFUND")

    def _on_lots_expired(self, state: AccountState, event: Event) -> None:
        pass  # its lot effects are all it changes


def _carried(event: Event, name: str, value: _T | None) -> _T:
    """A field the event's type always carries."""
    if value is None:
        raise ProjectionError(f"event {event.event_id} ({event.type}) lacks {name}")
    return value
