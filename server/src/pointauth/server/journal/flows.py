"""The point flows of an event (domain/settlement.py, Flow): what settlement sums. Copied from
the event's own lot effects, per lot issuer, never recomputed: a capture's are what it `spent`,
every other event's its `lots`. The write-behind writes them with the event's journal row."""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

from pointauth.server.domain.settlement import Flow
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

# Events whose lot effects are flows of one kind. The others (holds and their resolution, card
# and profile changes) move no points into, out of or between members' accounts: a hold's points
# stay the member's, and settlement sees them when a capture spends them.
_FLOW_OF_EVENT = {
    "EARN": Flow.ISSUED,
    "GRANT": Flow.ISSUED,
    "VISIT": Flow.ISSUED,
    "REDEEMED": Flow.USED,
    "HOLD_CAPTURED": Flow.USED,
    "LOTS_EXPIRED": Flow.EXPIRED,
    "ACCOUNT_CLOSED": Flow.FORFEITED,
    "MERGED_OUT": Flow.MERGED_OUT,
    "MERGED_IN": Flow.MERGED_IN,
}
_REFUNDED = {"EARN": Flow.ISSUE_REFUNDED, "GRANT": Flow.ISSUE_REFUNDED}


def point_flows(event: Event, original: TransactionRecord | None) -> list[FlowRow]:
    """The event's flows, one per lot issuer. `original`: for a refund, the transaction it refunds
    (a refund of an earn or grant takes points back; of a capture or redemption, gives them back),
    whose point of sale the flows carry: the pair a refund corrects is the original's."""
    effects: list[LotEntry] = event.lots
    ref: tuple[str, int, int] | None = None
    pos = event.pos
    if event.type == "REFUNDED":
        if original is None:
            raise ValueError(f"refund {event.event_id} without its original transaction")
        flow = _REFUNDED.get(original.type, Flow.USE_REFUNDED)
        pos = original.pos
        ref = (event.racct or event.account, event.ref or 0, original.time)
    elif event.type == "HOLD_CAPTURED":
        flow, effects = Flow.USED, event.spent or []
    elif event.type in _FLOW_OF_EVENT:
        flow = _FLOW_OF_EVENT[event.type]
    else:
        return []
    by_issuer: dict[str, int] = defaultdict(int)
    for effect in effects:
        by_issuer[effect.issuer_id] += abs(effect.points)
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
