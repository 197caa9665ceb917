"""What one account's events make of the PostgreSQL projections: its lots, its transaction records
(holds among them, earns' lines under the rules, visits, and earns' qualifying amounts under a
rank program), its cards, its accounts row (status, profile, merge, rule counts, first earn,
rank, visit limits), its coupons, the merges it took part in, and the points each campaign gave
and had refunded (campaign_points), those drawn on its budget among them.

The events carry everything the ledger script derived (allocations, what a capture used and
released, what a refund gave back and where, the balance after each event), so this module
copies; the ledger's arithmetic lives in ledger.lua alone. Records come out as the script
stores them (ledger/codec.py, TransactionRecord): rehydrate writes them back to Redis as they are.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec
from msgspec.structs import replace

from pointauth.server.domain.earning import BASE_RULE
from pointauth.server.journal.flows import FlowRow, point_flows
from pointauth.server.ledger.codec import (
    AccountStatusCode,
    AllocEntry,
    CardLink,
    CardStateCode,
    CouponEntry,
    EarnLineEntry,
    Event,
    LotEntry,
    MemberProfile,
    TransactionRecord,
    TransactionType,
    coupon_field,
    decode_card_link,
)

RecordKey = tuple[str, int]
"""(account id, seq) of a transaction record."""

_T = TypeVar("_T")


class ProjectionError(ValueError):
    """An event that does not fit the stored state: PostgreSQL and Redis have diverged."""


class NotYetApplied(ProjectionError):
    """An event that needs another account's event which PostgreSQL does not have yet (a refund
    of a merged account's transaction whose record that account's stream has not brought yet):
    held back, to be applied once it has."""


@dataclass
class AccountState:
    account_id: str
    last_seq: int = 0
    lots: dict[int, LotEntry] = field(default_factory=dict)
    """Unheld points per lot, as the account hash keeps them: a lot at zero is gone."""
    card_number: str | None = None
    """The card the account was opened with (accounts.card_number), whatever became of it."""
    opened_ms: int | None = None
    touched_lots: set[int] = field(default_factory=set)
    cards: dict[str, CardLink] = field(default_factory=dict)
    """The account's cards as its `c:` fields keep them. The writer loads those the cards table
    has under the account; a card whose row another account has taken since (the card moved on,
    and that account's events were applied first) is not among them."""
    touched_cards: set[str] = field(default_factory=set)
    """Cards the applied events changed: written, or (no longer in `cards`) their row deleted."""
    card_moves: dict[str, int] = field(default_factory=dict)
    """The MERGED_IN time of each card of `cards` that a merge brought here (cards.moved_at)."""
    status: AccountStatusCode = "A"
    closed_ms: int | None = None
    profile: MemberProfile = field(default_factory=MemberProfile)
    merged_into: str | None = None
    """A merged account's target, merge id and merge time (status "M": the hash's mt, mi, mg)."""
    merge_id: str | None = None
    merged_ms: int | None = None
    rule_counts: dict[str, int] = field(default_factory=dict)
    """The capped rules' counts for the member (the hash's k:<rule> fields), as the events set them."""
    first_earn_ms: int | None = None
    """The member's first earn (the hash's fe): the time of the event that made the mark."""
    rank_id: str | None = None
    """The member's rank (the hash's rk), their qualifying spend (rs) and its rank period (rp)."""
    rank_spend: int = 0
    rank_period: int | None = None
    visits: dict[str, int] = field(default_factory=dict)
    """Each visit rule's limit key -> the day it last gave points (the hash's v:<key> fields)."""


@dataclass(frozen=True)
class MergeOut:
    """A merge as its MERGED_OUT (step 1, on the source) tells it: the move record step 2 applies."""

    merge_id: str
    source: str
    target: str
    time: int
    actor: str | None
    why: str | None
    lots: list[LotEntry]
    """The lots as they left the source (the source's lot ids)."""
    cards: dict[str, str]
    """Card number -> its field value (CardLink) as it left."""
    foreign: dict[str, str]
    """Transaction id -> refund state, the source's f: fields as they left."""
    coupons: dict[str, str]
    """Coupon id -> its q: field value, the source's coupons as they left."""


@dataclass(frozen=True)
class MergeLanded:
    """A merge as its MERGED_IN (step 2) tells it: where the move landed and when."""

    merge_id: str
    source: str
    account: str
    time: int


class Projector:
    """Applies one account's events in sequence to its state and its transaction records.

    `records` holds the transaction records the events may refer to (loaded beforehand) and
    collects those created or changed; `changed` names the latter. `versions`: the rule set
    version of each of those records that is an earn under the rules (loaded with them).
    `campaign_points`: what the events add to each (campaign, rule set version)'s points given
    and refunded. `coupons`: the coupons rows the events wrote, by (account, coupon id), each as
    the account hash's q: field has it after them; None: the row leaves (a merge moved it).
    `flows`: the point flows of the events applied (journal/flows.py), for settlement.
    """

    def __init__(
        self, records: dict[RecordKey, TransactionRecord], versions: dict[RecordKey, int] | None = None
    ) -> None:
        self.records = records
        self.versions = versions if versions is not None else {}
        self.changed: set[RecordKey] = set()
        self.merges_out: list[MergeOut] = []
        self.merges_landed: list[MergeLanded] = []
        self.campaign_points: dict[tuple[str, int], CampaignPoints] = defaultdict(CampaignPoints)
        self.coupons: dict[tuple[str, str], CouponEntry | None] = {}
        self.flows: list[FlowRow] = []

    def apply(self, state: AccountState, event: Event) -> None:
        if event.seq != state.last_seq + 1:
            raise ProjectionError(f"event {event.event_id} follows seq {state.last_seq}")
        self._apply_lots(state, event)
        handler = getattr(self, f"_on_{event.type.lower()}", None)
        if handler is None:
            raise ProjectionError(f"event {event.event_id} has unknown type {event.type}")
        handler(state, event)
        # A refund's original was checked by its handler (and is the same after it, but for its
        # refunded figures, which flows do not read).
        original = (
            self.records.get((event.racct or state.account_id, event.ref or 0)) if event.type == "REFUNDED" else None
        )
        try:
            self.flows.extend(point_flows(event, original))
        except ValueError as exc:
            raise ProjectionError(str(exc)) from None
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
        self._put_key((state.account_id, seq), rec)

    def _put_key(self, key: RecordKey, rec: TransactionRecord) -> None:
        self.records[key] = rec
        self.changed.add(key)

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
        qual: int = 0,
        rp: int = 0,
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
                racct=event.racct or "",
                # An earn's lines; a refund's shares (the script's new_tx copies the event's).
                lines=event.lines or [],
                qual=qual,
                rp=rp,
            ),
        )

    def _resolve_hold(self, state: AccountState, event: Event, new_state: str, released: int, **more: int) -> None:
        hold = self._record(state, event.ref, event)
        if hold.type != "HOLD" or hold.state != "HELD":
            raise ProjectionError(f"event {event.event_id} resolves hold {event.ref}, which is not open")
        self._put(state, event.ref or 0, replace(hold, state=new_state, released=released, **more))

    def _on_account_opened(self, state: AccountState, event: Event) -> None:
        card = _carried(event, "card", event.card)
        state.card_number = card
        state.opened_ms = event.time
        # A script before cards had kinds wrote neither kind nor profile, and the card's field
        # "1": an active physical card without a link time.
        link = CardLink() if event.kind is None else CardLink("A", event.kind, event.time)
        self._link(state, event, card, link)
        state.profile = event.profile or MemberProfile()

    def _on_card_linked(self, state: AccountState, event: Event) -> None:
        link = CardLink("A", _carried(event, "kind", event.kind), event.time)
        self._link(state, event, _carried(event, "card", event.card), link)

    def _on_card_unlinked(self, state: AccountState, event: Event) -> None:
        card = _carried(event, "card", event.card)
        state.cards.pop(card, None)  # absent: its row is another account's now (see AccountState)
        state.card_moves.pop(card, None)
        state.touched_cards.add(card)

    def _on_card_blocked(self, state: AccountState, event: Event) -> None:
        self._card_state(state, event, "B")

    def _on_card_unblocked(self, state: AccountState, event: Event) -> None:
        self._card_state(state, event, "A")

    def _on_card_reissued(self, state: AccountState, event: Event) -> None:
        new_card = _carried(event, "new_card", event.new_card)
        self._card_state(state, event, "R", replaced_by=new_card)
        self._link(state, event, new_card, CardLink("A", _carried(event, "kind", event.kind), event.time))

    def _on_profile_updated(self, state: AccountState, event: Event) -> None:
        # The whole profile after the update. Absent: none left (Lua packs an empty map as an
        # array, so the script cannot send an empty profile as a map).
        state.profile = event.profile or MemberProfile()

    def _on_account_closed(self, state: AccountState, event: Event) -> None:
        # Its lot effects, forfeiting every lot's points, are applied already (_apply_lots).
        state.status = "C"
        state.closed_ms = event.time

    def _on_merged_out(self, state: AccountState, event: Event) -> None:
        # Its lot effects, taking every lot, are applied already; the cards leave with the move
        # (their rows are deleted while still this account's: see AccountState.cards).
        target, merge = _carried(event, "target", event.target), _carried(event, "merge", event.merge)
        moved = _carried(event, "moved", event.moved)
        links = _links(event)
        coupons = {c.coupon_id: coupon_field(c) for c in event.coupons or []}
        for coupon in coupons:
            self.coupons[(state.account_id, coupon)] = None  # they left with the move
        state.status, state.merged_into, state.merge_id, state.merged_ms = "M", target, merge, event.time
        for card in links:
            state.cards.pop(card, None)
            state.card_moves.pop(card, None)
            state.touched_cards.add(card)
        self.merges_out.append(
            MergeOut(
                merge,
                state.account_id,
                target,
                event.time,
                event.actor,
                event.why,
                moved,
                links,
                event.foreign or {},
                coupons,
            )
        )

    def _on_merged_in(self, state: AccountState, event: Event) -> None:
        # Its lot effects (each moved lot where it landed) are applied already; the cards come
        # with their fields as they were (state, kind, link time), under this account now.
        source, merge = _carried(event, "source", event.source), _carried(event, "merge", event.merge)
        for card, text in _links(event).items():
            try:
                state.cards[card] = decode_card_link(text.encode())
            except msgspec.DecodeError as exc:
                raise ProjectionError(f"event {event.event_id} moves card {card} as {text!r}: {exc}") from None
            state.card_moves[card] = event.time
            state.touched_cards.add(card)
        self.merges_landed.append(MergeLanded(merge, source, state.account_id, event.time))
        # The source's coupons, under the ids they landed with (the script's choice).
        self._coupons(state, event)
        # The source's counts added to the target's (absolute, as set), its first-earn mark, and
        # the visit limits whose day it had later.
        self._rules_state(state, event)

    def _link(self, state: AccountState, event: Event, card: str, link: CardLink) -> None:
        if card in state.cards:
            raise ProjectionError(f"event {event.event_id} links card {card}, which the account has already")
        state.cards[card] = link
        state.card_moves.pop(card, None)
        state.touched_cards.add(card)

    def _card_state(
        self, state: AccountState, event: Event, new_state: CardStateCode, replaced_by: str | None = None
    ) -> None:
        """A block, unblock or reissue of one of the account's cards: its state, and the time of
        this event; its kind and link time are as they were."""
        card = _carried(event, "card", event.card)
        link = state.cards.get(card)
        if link is None:
            # Another account has the card's row: this account gave the card up after this event,
            # and the other account's later link was applied first. Nothing here to change.
            return
        state.cards[card] = replace(link, state=new_state, state_ms=event.time, replaced_by=replaced_by)
        state.touched_cards.add(card)

    def _on_earn(self, state: AccountState, event: Event) -> None:
        self._earned(state, event, "EARN")

    def _on_grant(self, state: AccountState, event: Event) -> None:
        self._earned(state, event, "GRANT")

    def _on_visit(self, state: AccountState, event: Event) -> None:
        self._earned(state, event, "VISIT")

    def _earned(self, state: AccountState, event: Event, type_: TransactionType) -> None:
        # Under a rank program the record keeps the qualifying amount and its period.
        self._new(state, event, type_, qual=event.qual or 0, rp=event.period or 0)
        self._rules_state(state, event)
        if event.spend is not None:
            # Under a rank program. A lazy review, if any, came before as an event of its own:
            # the rank is the one the earn reached, else the member's; spend and period the earn's
            # (no period: a script before events carried it).
            if event.rank:
                state.rank_id = event.rank[-1]
            state.rank_spend = event.spend
            if event.period is not None:
                state.rank_period = event.period
        self._coupons(state, event)  # a coupon campaign's lines issue coupons
        if event.rules:
            self.versions[(state.account_id, event.seq)] = event.rules
        for line in event.lines or []:
            if _campaign(line.rule) and line.points:
                points = self.campaign_points[(line.rule, event.rules or 0)]
                points.given += line.points
                if line.budgeted:
                    points.budget_given += line.points

    def _rules_state(self, state: AccountState, event: Event) -> None:
        """The counts the event set (k:<rule>, each the count after it), the first-earn mark and
        the visit limits (v:<key>, each the day after it)."""
        state.rule_counts.update(event.counts or {})
        if event.first:
            state.first_earn_ms = event.time
        state.visits.update(event.visits or {})

    def _on_rank_reviewed(self, state: AccountState, event: Event) -> None:
        # A new rank period for the member: the rank the review left, the spend starting at 0.
        rank = _carried(event, "rank", event.rank)
        if len(rank) != 2:
            raise ProjectionError(f"event {event.event_id} (RANK_REVIEWED) has rank {rank}, not [from, to]")
        state.rank_id, state.rank_spend = rank[1], 0
        if event.period is not None:  # absent: a script before events carried the period
            state.rank_period = event.period

    def _on_coupon_used(self, state: AccountState, event: Event) -> None:
        # No points, no lots: the coupon as the script left it (its used time the event's).
        for coupon in _carried(event, "coupons", event.coupons):
            self.coupons[(state.account_id, coupon.coupon_id)] = coupon

    def _coupons(self, state: AccountState, event: Event) -> None:
        """The coupons the event carries, each as the account's q: field now has it."""
        for coupon in event.coupons or []:
            self.coupons[(state.account_id, coupon.coupon_id)] = coupon

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
        # The original's figures are the event's (everything refunded of it so far, and returned
        # per allocation entry), kept only where they are ahead of the stored ones: a refund of a
        # merged account's transaction (`racct`) comes in another account's stream, which may be
        # applied before that account's own earlier refunds of it.
        key = (event.racct or state.account_id, event.ref or 0)
        orig = self.records.get(key)
        if orig is None:
            if event.racct:
                raise NotYetApplied(f"event {event.event_id} refunds {event.racct}.{event.ref}, not in PostgreSQL yet")
            raise ProjectionError(f"event {event.event_id} refers to unknown transaction {event.ref}")
        alloc = list(orig.alloc)
        for back in event.returned or []:
            if not 0 <= back.index < len(alloc):
                raise ProjectionError(f"event {event.event_id} returns to allocation entry {back.index} of {event.ref}")
            entry = alloc[back.index]
            alloc[back.index] = replace(entry, returned=max(entry.returned, back.returned))
        refunded = max(orig.refunded, _carried(event, "refunded", event.refunded))
        self._put_key(key, replace(orig, refunded=refunded, alloc=alloc, lines=self._refund_lines(key, orig, event)))
        self._new(state, event, "REFUND")
        self._rules_state(state, event)
        # A refund of an earn counted in the member's current rank period lowers its spend.
        if event.spend is not None:
            state.rank_spend = event.spend

    def _refund_lines(self, key: RecordKey, orig: TransactionRecord, event: Event) -> list[EarnLineEntry]:
        """The original earn's lines after a refund's shares (`lines`, one per rule it took
        back from), each line's refunded up by its share as the script does; and what those
        shares take back from their campaigns' points given under the earn's version. Shares add
        up whatever order refunds landing on two accounts are applied in."""
        if not event.lines:
            return orig.lines
        lines = list(orig.lines)
        index = {line.rule: i for i, line in enumerate(lines)}
        version = self.versions.get(key, 0)
        for share in event.lines:
            i = index.get(share.rule)
            if i is None:
                raise ProjectionError(f"event {event.event_id} refunds rule {share.rule!r}, not a line of {key[1]}")
            lines[i] = replace(lines[i], refunded=lines[i].refunded + share.points)
            if _campaign(share.rule) and share.points:
                points = self.campaign_points[(share.rule, version)]
                points.refunded += share.points
                if share.budgeted:
                    points.budget_refunded += share.points
        return lines

    def _on_lots_expired(self, state: AccountState, event: Event) -> None:
        pass  # its lot effects are all it changes


@dataclass
class CampaignPoints:
    """Points a campaign (or visit rule) gave under one rule set version, and points refunds took
    back of them; `budget_given`/`budget_refunded`: the part of each its lines and shares say
    came from (went back to) its budget."""

    given: int = 0
    refunded: int = 0
    budget_given: int = 0
    budget_refunded: int = 0


def _campaign(rule: str) -> bool:
    """Whether a line's rule is a campaign or visit rule (not the base points, nor a plain earn's
    one line)."""
    return rule not in ("", BASE_RULE)


def _links(event: Event) -> dict[str, str]:
    """A merge event's cards with their field values (`cards` lists them; `links`, absent when
    there are none, has their values)."""
    links = event.links or {}
    if sorted(links) != sorted(event.cards or []):
        raise ProjectionError(f"event {event.event_id} ({event.type}) lacks the field values of cards {event.cards}")
    return links


def _carried(event: Event, name: str, value: _T | None) -> _T:
    """A field the event's type always carries."""
    if value is None:
        raise ProjectionError(f"event {event.event_id} ({event.type}) lacks {name}")
    return value
