"""The point flows of an event (domain/settlement.py, Flow): what settlement sums. Copied from
the event's own lot effects, per lot issuer, never recomputed: a capture's are what it `spent`,
every other event's its `lots`. The write-behind writes them with the event's journal row."""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

from pointauth.server.domain.settlement import TIE_OUTS, Flow
from pointauth.server.ledger.codec import Event, LotEntry, TransactionRecord


class FlowRow(NamedTuple):
    """A point_flows row."""

    time_ms: int
    """The event's time (event_time, once written)."""
    account_id: str
    seq: int
    flow: str
    issuer_id: str
    company_id: str | None
    store_id: str | None
    points: int
    ref_account: str | None
    ref_seq: int | None
    ref_time_ms: int | None


FLOW_COLUMNS = ("event_time", *FlowRow._fields[1:-1], "ref_time")
"""point_flows' columns, in FlowRow's order."""

# Events whose lot effects are flows of one kind, as the tie-out counts them (TIE_OUTS: one
# definition). The others (holds and their resolution, card and profile changes) move no points
# into, out of or between members' accounts: a hold's points stay the member's, and settlement
# sees them when a capture spends them (its `spent`, not its `lots`).
_FLOW_OF_EVENT = {t: check.flows[0] for check in TIE_OUTS if len(check.flows) == 1 for t in check.event_types}
_REFUNDED = {
    "EARN": Flow.ISSUE_REFUNDED,
    "GRANT": Flow.ISSUE_REFUNDED,
    "CAPTURE": Flow.USE_REFUNDED,
    "REDEMPTION": Flow.USE_REFUNDED,
}
"""A refund's flow, by the type of the transaction it refunds."""
# The sign of a flow's lot effects: points added to the member's lots, or taken from them.
_ADDS = {Flow.ISSUED, Flow.USE_REFUNDED, Flow.MERGED_IN}


def point_flows(event: Event, original: TransactionRecord | None) -> list[FlowRow]:
    """The event's flows, one per lot issuer; ValueError for an event no flow can copy (a refund
    without its original, or of a type no flow maps; a lot effect of the wrong sign). `original`:
    for a refund, the transaction it refunds
    (a refund of an earn or grant takes points back; of a capture or redemption, gives them back),
    whose point of sale the flows carry: the pair a refund corrects is the original's."""
    effects: list[LotEntry] = event.lots
    ref: tuple[str, int, int] | None = None
    pos = event.pos
    if event.type == "REFUNDED":
        if original is None:
            raise ValueError(f"refund {event.event_id} without its original transaction")
        if original.type not in _REFUNDED:
            raise ValueError(f"refund {event.event_id} of a {original.type}, which no flow maps")
        flow = _REFUNDED[original.type]
        pos = original.pos
        ref = (event.racct or event.account, event.ref or 0, original.time)
    elif event.type == "HOLD_CAPTURED":
        flow, effects = Flow.USED, event.spent or []
    elif event.type in _FLOW_OF_EVENT:
        flow = _FLOW_OF_EVENT[event.type]
    else:
        return []
    sign = 1 if flow in _ADDS else -1
    by_issuer: dict[str, int] = defaultdict(int)
    for effect in effects:
        if effect.points * sign < 0:
            raise ValueError(f"event {event.event_id}: a {flow} flow with a lot effect of {effect.points}")
        by_issuer[effect.issuer_id] += effect.points * sign
    company, store = (pos.company_id, pos.store_id) if pos else (None, None)
    ref_account, ref_seq, ref_ms = ref if ref else (None, None, None)
    return [
        FlowRow(
            event.time,
            event.account,
            event.seq,
            flow.value,
            issuer,
            company,
            store,
            points,
            ref_account,
            ref_seq,
            ref_ms,
        )
        for issuer, points in sorted(by_issuer.items())
        if points
    ]
