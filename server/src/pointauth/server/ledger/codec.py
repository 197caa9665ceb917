"""Everything pointauth stores in Redis, defined once: the account (its hash, lots and open
holds), transaction records, stream events, the group directory, the hold index, the card index,
idempotency records, and the ledger function's arguments and answers. Python reads and writes them only
through this module; ledger.lua, which must write them itself, points here at each format, and
tests/ledger/test_codec.py checks this module against what the script wrote.

Every decoder raises msgspec.DecodeError on a value it cannot read.

Lua's cmsgpack packs a table's keys in the order of its hash part, which depends on how the
table was built, so a map the script wrote and the same map encoded here hold equal fields but
not in the same order; arrays and scalars are byte for byte the same.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import msgspec

from pointauth.server.domain.earning import LotKindCode, RuleSet
from pointauth.server.domain.ids import parse_transaction_id, transaction_id

TransactionType = Literal["EARN", "GRANT", "HOLD", "CAPTURE", "REDEMPTION", "REFUND", "VISIT"]


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


class EarnLineEntry(msgspec.Struct, array_like=True, frozen=True):
    """One rule's part of an earn (rules/engine.py): [rule ("base", a campaign id; "" for a plain
    earn), points given, the lot they went to (0: none), why fewer than the rules said
    (domain/earning.py's NOTE_*; "" if not), points of it refunded so far, whether its points
    came from a campaign budget]. A refund's lines are the shares it took back, per rule."""

    rule: str
    points: int
    lot_id: int
    note: str = ""
    refunded: int = 0
    budgeted: int = 0
    """1 if the points came from the campaign's budget (a refund's share goes back to it)."""


class CouponEntry(msgspec.Struct, array_like=True, frozen=True):
    """A coupon of a member's: [id ("<account>.<seq>.<line>" of the earn that issued it: unique in
    the group, and kept when the account merges into another), campaign, issued ms, valid-before
    ms, used ms (0: not yet)]. The account hash keeps it as q:<id> =
    "<campaign>|<issued>|<valid before>|<used>"."""

    coupon_id: str
    campaign_id: str
    issued_ms: int
    expire_ms: int
    used_ms: int = 0


def coupon_field(coupon: CouponEntry) -> str:
    """A coupon as the account hash's q:<id> field keeps it: "<campaign>|<issued>|<valid before>|<used>"."""
    return f"{coupon.campaign_id}|{coupon.issued_ms}|{coupon.expire_ms}|{coupon.used_ms}"


def decode_coupon_field(coupon_id: str, value: str) -> CouponEntry:
    """A q:<id> field's value as its CouponEntry."""
    campaign, issued, until, used = value.rsplit("|", 3)
    return CouponEntry(coupon_id, campaign, int(issued), int(until), int(used))


class AllocReturn(msgspec.Struct, array_like=True, frozen=True):
    """A refund's points given back to one lot count against entry `index` (from 0) of the
    original's allocation, whose points returned are now `returned`: [index, returned]."""

    index: int
    returned: int


# -- an account's state: the account hash, its lots and its open holds ------------------------
# Three keys per account (keys.py, AccountKeys), laid out so that a script call reads only what
# it touches, however many lots and holds the account has:
# - the account hash: `seq` (the account's last event), `x0` (the oldest transaction record not
#   yet pruned; absent means 1), `xt` (the time of record x0 when the script's pruning last
#   stopped at it for its age: a hint that spares each commit reading that record, so not part
#   of the account's state; absent or 0: unknown), `lp` (points in its lots) and `hp` (points on
#   hold), which the script keeps equal to the sums of the two sets below so that no call has to
#   add them up.
#   Plain text: Redis keeps a small hash of short strings compactly (listpack), and this hash
#   exists for every account. It also holds a field `c:<card number>` per card of the account
#   (CardLink): the script reads it on every call made for a card, so a stale card -> account
#   link (a server's cache, or the index mid-move) can never move points on the wrong account,
#   and a blocked card stops working at once in every process (see card_field). And the
#   account's status and member profile (MemberProfile): `st` ("C" closed; absent: active),
#   `ot`/`ct` (opened, closed ms), `bd`, `jt`, `hc`, `a:<attribute>`.
# - the lots: a sorted set, one member "<id key>:<points>:<issuer>" per lot with points (unheld),
#   scored `expiry ms * 2 + (0 limited-time, 1 regular)`: ascending order is the spending order
#   (soonest expiry, then limited-time, then, at an equal score, Redis's byte order of members,
#   which the id key makes the lot ids' numeric order: a letter a..p for 1..16 digits, then the
#   digits). Expiry and kind live only in the score. A score is below 2^53 for any expiry before
#   year 10000, so exact as a double. An account has at most one lot per expiry, kind and issuer.
# - the open holds: a sorted set, one member "<hold seq>:<points>" per open hold, scored by its
#   expiry ms.

SEQ_FIELD = b"seq"
X0_FIELD = b"x0"
PRUNE_HINT_FIELD = b"xt"
LOT_POINTS_FIELD = b"lp"
HELD_POINTS_FIELD = b"hp"
STATUS_FIELD = b"st"
OPENED_FIELD = b"ot"
CLOSED_FIELD = b"ct"
CARD_FIELD_PREFIX = b"c:"
ATTRIBUTE_FIELD_PREFIX = b"a:"
AccountStatusCode = Literal["A", "C", "M"]
"""Active, closed, merged."""
CardStateCode = Literal["A", "B", "R"]
"""Active, blocked, replaced."""
CardKindCode = Literal["P", "A"]
"""Physical card, app member ID."""


def card_field(card_number: str | bytes) -> bytes:
    """The account hash's field saying the account has this card (its value: CardLink)."""
    return CARD_FIELD_PREFIX + (card_number.encode() if isinstance(card_number, str) else card_number)


class CardLink(msgspec.Struct, frozen=True):
    """A card of an account, as its `c:` field keeps it: "<state><kind>[<link ms>[:<state
    ms>[:<replaced by>]]]" (e.g. "AP1795000000000", "RP1795000000000:1795000100000:CARD-2").
    Seeded cards have no link time ("AP"); "1" is an active physical card of the layout before
    cards had states. Card numbers never contain ':'."""

    state: CardStateCode = "A"
    kind: CardKindCode = "P"
    link_ms: int | None = None
    state_ms: int | None = None
    replaced_by: str | None = None


_CARD_LINK = re.compile(rb"([ABR])([PA])(\d*)(?::(\d*)(?::([A-Za-z0-9-]+))?)?")


def encode_card_link(link: CardLink) -> bytes:
    text = f"{link.state}{link.kind}{'' if link.link_ms is None else link.link_ms}"
    if link.state_ms is not None or link.replaced_by is not None:
        text += f":{'' if link.state_ms is None else link.state_ms}"
    if link.replaced_by is not None:
        text += f":{link.replaced_by}"
    return text.encode()


def decode_card_link(raw: bytes) -> CardLink:
    if raw == b"1":
        return CardLink()
    m = _CARD_LINK.fullmatch(raw)
    if m is None:
        raise msgspec.DecodeError(f"card field value {raw!r} is not <state><kind>[<ms>[:<ms>[:<card>]]]")
    state, kind, link, state_ms, by = m.groups()
    return CardLink(
        state=state.decode(),  # type: ignore[arg-type]
        kind=kind.decode(),  # type: ignore[arg-type]
        link_ms=int(link) if link else None,
        state_ms=int(state_ms) if state_ms else None,
        replaced_by=by.decode() if by else None,
    )


class MemberProfile(msgspec.Struct, frozen=True, omit_defaults=True):
    """What the rules may know of a member, as the account hash and the events keep it:
    `bd` birthday "MMDD", `jt` joined (ms), `hc` home company, `attrs` free attributes (absent
    when none: Lua packs an empty table as an array)."""

    bd: str | None = None
    jt: int | None = None
    hc: str | None = None
    attrs: dict[str, str] | None = None


class MergeIn(msgspec.Struct, frozen=True):
    source: str
    time: int


class MergeMove(msgspec.Struct, frozen=True):
    """What step 1 of a merge took off the source, as its transactions hash's field "m" keeps it
    for step 2: its lots (ids the source's), its cards (values as CardLink), and the refund
    state of transactions merged into it before (by transaction id)."""

    merge: str
    source: str
    target: str
    time: int
    lots: list[LotEntry]
    cards: dict[str, str] | list[Any]
    """Lua packs an empty table as an array."""
    foreign: dict[str, str] | None = None
    counts: dict[str, str] | None = None
    """The source's rule counts (k:<rule>), added to the target's."""
    earned: bool = False
    """The source had earned (its first-earn mark carries over)."""
    visits: dict[str, str] | None = None
    """The source's visit limits (v:<key>): the target keeps the later day."""
    coupons: dict[str, str] | None = None
    """The source's coupons (q:<coupon id>, values as CouponEntry's field), moved to the target
    (ledger.lua, merge_in: under a new id where the target's could collide with it)."""


def foreign_refund_state(refunded: int, returned: Iterable[int], lines_refunded: Iterable[int]) -> str:
    """An f:<transaction id> field: "<points refunded>|<returned per allocation entry>[|<refunded
    per rule line>]", lists comma-separated, the last only for an earn under the rules
    (ledger.lua, foreign_original)."""
    state = f"{refunded}|{','.join(map(str, returned))}"
    lines = ",".join(map(str, lines_refunded))
    return f"{state}|{lines}" if lines else state


MERGE_MOVE_FIELD = "m"
_decode_move = msgspec.msgpack.Decoder(MergeMove).decode


def decode_merge_move(raw: bytes) -> MergeMove:
    return _decode_move(raw)


def encode_merge_move(move: MergeMove) -> bytes:
    """A move record as rehydrate writes it back (the script reads it as it wrote it)."""
    return msgspec.msgpack.encode(move)


EXTRA_LOT_ID_STEP = 1 << 40
"""A lot's id is the seq of the event that made it; an event making several (a merge, a refund of
a merged account's transaction) numbers the k-th after the first seq + k * 2^40."""


class HoldEntry(msgspec.Struct, frozen=True):
    """An open hold as the account's open-holds set keeps it."""

    points: int
    expire_ms: int


class StoredAccount(msgspec.Struct):
    """An account's three keys, decoded. `x0` None: the field is absent, which the script reads
    as 1. `lot_points`/`held_points`: the hash's totals, as stored (a consistent account has them
    equal to its lots' and holds' sums)."""

    seq: int = 0
    x0: int | None = None
    lot_points: int = 0
    held_points: int = 0
    lots: dict[int, LotEntry] = {}
    holds: dict[int, HoldEntry] = {}
    cards: dict[str, CardLink] = {}
    """The account's cards (its `c:` fields)."""
    status: AccountStatusCode = "A"
    opened_ms: int | None = None
    closed_ms: int | None = None
    profile: MemberProfile = MemberProfile()
    merged_into: str | None = None
    """A merged account's target (status "M"), with the merge's id and time."""
    merge_id: str | None = None
    merged_ms: int | None = None
    merges_in: dict[str, MergeIn] = {}
    """Merges into this account by merge id (`mh:<merge id>` = "<source>|<ms>")."""
    rule_counts: dict[str, int] = {}
    """`k:<rule>`: points the rule has given the member (for its per-member cap)."""
    first_earn_ms: int | None = None
    """`fe`: when the member first earned (absent: never; first-purchase campaigns)."""
    rank_id: str | None = None
    """`rk`: the member's rank, `rs` their qualifying spend in rank period `rp`."""
    rank_spend: int = 0
    rank_period: int | None = None
    visits: dict[str, int] = {}
    """`v:<rule>:<store or *>`: the day (a local date's ordinal) the visit rule last gave points."""
    coupons: dict[str, CouponEntry] = {}
    """`q:<coupon id>`: the member's coupons (CouponEntry)."""
    foreign_refunds: dict[str, str] = {}
    """`f:<transaction id>`: what has been refunded here of a transaction of an account merged
    into this one (foreign_refund_state)."""


class AccountLayout(msgspec.Struct, frozen=True):
    """What to write for an account into its three (new or emptied) keys: one HSET, and one ZADD
    per sorted set unless it is empty (member -> score)."""

    fields: dict[bytes, bytes]
    lots: dict[bytes, int]
    holds: dict[bytes, int]


_KINDS: dict[int, LotKindCode] = {0: "L", 1: "R"}


def lot_score(expire_ms: int, kind: bytes | str) -> int:
    return expire_ms * 2 + (0 if kind in (b"L", "L") else 1)


def lot_member_of(lot_id: int, points: int, issuer_id: bytes) -> bytes:
    """A lot's member without a LotEntry, for writers of millions of lots (seed)."""
    digits = b"%d" % lot_id
    return b"%c%s:%d:%s" % (96 + len(digits), digits, points, issuer_id)


def lot_member(lot: LotEntry) -> bytes:
    return lot_member_of(lot.lot_id, lot.points, lot.issuer_id.encode())


def decode_lot(member: bytes, score: float) -> LotEntry:
    """A member of the lots set and its score (as redis-py gives them) as a lot."""
    try:
        digits = member[0] - 96
        id_text, rest = member[1 : 1 + digits], member[1 + digits :]
        if not 1 <= digits <= 16 or len(id_text) != digits or not id_text.isdigit() or rest[:1] != b":":
            raise ValueError("no lot id key")
        points, issuer = rest[1:].split(b":", 1)
        whole = int(score)
        if whole != score:
            raise ValueError("score is not a whole number")
        return LotEntry(int(id_text), int(points), whole // 2, _KINDS[whole % 2], issuer.decode())
    except (ValueError, KeyError, IndexError) as exc:
        raise msgspec.DecodeError(f"lot {member!r} scored {score!r}: {exc!r}") from None


def open_hold_member(hold_seq: int, points: int) -> bytes:
    return b"%d:%d" % (hold_seq, points)


def decode_open_hold(member: bytes, score: float) -> tuple[int, HoldEntry]:
    """(hold seq, hold) from a member of the open-holds set and its score."""
    try:
        seq, points = member.split(b":")
        return int(seq), HoldEntry(int(points), int(score))
    except ValueError as exc:
        raise msgspec.DecodeError(f"open hold {member!r} scored {score!r}: {exc!r}") from None


def encode_account(account: StoredAccount) -> AccountLayout:
    fields = {SEQ_FIELD: b"%d" % account.seq}
    if account.x0 is not None:
        fields[X0_FIELD] = b"%d" % account.x0
    fields[LOT_POINTS_FIELD] = b"%d" % account.lot_points
    fields[HELD_POINTS_FIELD] = b"%d" % account.held_points
    for card, link in account.cards.items():
        fields[card_field(card)] = encode_card_link(link)
    fields.update(_status_fields(account))
    fields.update(profile_fields(account.profile))
    lots = {lot_member(lot): lot_score(lot.expire_ms, lot.kind) for lot in account.lots.values()}
    holds = {open_hold_member(seq, hold.points): hold.expire_ms for seq, hold in account.holds.items()}
    return AccountLayout(fields, lots, holds)


def account_of(
    seq: int,
    x0: int | None,
    lots: Mapping[int, LotEntry],
    holds: Mapping[int, HoldEntry],
    cards: Mapping[str, CardLink] | None = None,
    *,
    status: AccountStatusCode = "A",
    opened_ms: int | None = None,
    closed_ms: int | None = None,
    profile: MemberProfile | None = None,
    merged_into: str | None = None,
    merge_id: str | None = None,
    merged_ms: int | None = None,
    merges_in: Mapping[str, MergeIn] | None = None,
    foreign_refunds: Mapping[str, str] | None = None,
    rule_counts: Mapping[str, int] | None = None,
    first_earn_ms: int | None = None,
    rank: tuple[str, int, int] | None = None,
    visits: Mapping[str, int] | None = None,
    coupons: Mapping[str, CouponEntry] | None = None,
) -> StoredAccount:
    """A consistent account: its totals are its lots' and holds' sums."""
    return StoredAccount(
        seq=seq,
        x0=x0,
        lot_points=sum(lot.points for lot in lots.values()),
        held_points=sum(hold.points for hold in holds.values()),
        lots=dict(lots),
        holds=dict(holds),
        cards=dict(sorted((cards or {}).items())),
        status=status,
        opened_ms=opened_ms,
        closed_ms=closed_ms,
        profile=profile or MemberProfile(),
        merged_into=merged_into,
        merge_id=merge_id,
        merged_ms=merged_ms,
        merges_in=dict(merges_in or {}),
        foreign_refunds=dict(foreign_refunds or {}),
        rule_counts=dict(rule_counts or {}),
        first_earn_ms=first_earn_ms,
        rank_id=rank[0] if rank else None,
        rank_spend=rank[1] if rank else 0,
        rank_period=rank[2] if rank else None,
        visits=dict(sorted((visits or {}).items())),
        coupons=dict(sorted((coupons or {}).items())),
    )


def _status_fields(account: StoredAccount) -> dict[bytes, bytes]:
    fields: dict[bytes, bytes] = {}
    if account.status != "A":
        fields[STATUS_FIELD] = account.status.encode()
    if account.merged_into is not None:
        fields[b"mt"] = account.merged_into.encode()
    if account.merge_id is not None:
        fields[b"mi"] = account.merge_id.encode()
    if account.merged_ms is not None:
        fields[b"mg"] = b"%d" % account.merged_ms
    for merge, came in account.merges_in.items():
        fields[b"mh:" + merge.encode()] = f"{came.source}|{came.time}".encode()
    for txid, state in account.foreign_refunds.items():
        fields[b"f:" + txid.encode()] = state.encode()
    for rule, count in account.rule_counts.items():
        fields[b"k:" + rule.encode()] = b"%d" % count
    if account.first_earn_ms is not None:
        fields[b"fe"] = b"%d" % account.first_earn_ms
    if account.rank_id is not None:
        fields[b"rk"] = account.rank_id.encode()
        fields[b"rs"] = b"%d" % account.rank_spend
    if account.rank_period is not None:
        fields[b"rp"] = b"%d" % account.rank_period
    for key, day in account.visits.items():
        fields[b"v:" + key.encode()] = b"%d" % day
    for c in account.coupons.values():
        fields[b"q:" + c.coupon_id.encode()] = f"{c.campaign_id}|{c.issued_ms}|{c.expire_ms}|{c.used_ms}".encode()
    if account.opened_ms is not None:
        fields[OPENED_FIELD] = b"%d" % account.opened_ms
    if account.closed_ms is not None:
        fields[CLOSED_FIELD] = b"%d" % account.closed_ms
    return fields


def profile_fields(profile: MemberProfile) -> dict[bytes, bytes]:
    """The account hash's fields of a profile."""
    fields: dict[bytes, bytes] = {}
    if profile.bd is not None:
        fields[b"bd"] = profile.bd.encode()
    if profile.jt is not None:
        fields[b"jt"] = b"%d" % profile.jt
    if profile.hc is not None:
        fields[b"hc"] = profile.hc.encode()
    for key, value in (profile.attrs or {}).items():
        fields[ATTRIBUTE_FIELD_PREFIX + key.encode()] = value.encode()
    return fields


def decode_account(
    stored: Mapping[bytes, bytes],
    lots: Iterable[tuple[bytes, float]] = (),
    holds: Iterable[tuple[bytes, float]] = (),
) -> StoredAccount:
    """An HGETALL reply of the account hash (bytes, as the clients here never decode responses)
    and ZRANGE ... WITHSCORES replies of its lots and open holds."""
    account = StoredAccount()
    profile: dict[str, Any] = {}
    attrs: dict[str, str] = {}
    cards: dict[str, CardLink] = {}
    merges_in: dict[str, MergeIn] = {}
    foreign: dict[str, str] = {}
    counts: dict[str, int] = {}
    visits: dict[str, int] = {}
    coupons: dict[str, CouponEntry] = {}
    for field, value in stored.items():
        try:
            if field.startswith(CARD_FIELD_PREFIX):
                cards[field[len(CARD_FIELD_PREFIX) :].decode()] = decode_card_link(value)
            elif field.startswith(ATTRIBUTE_FIELD_PREFIX):
                attrs[field[len(ATTRIBUTE_FIELD_PREFIX) :].decode()] = value.decode()
            elif field == STATUS_FIELD:
                if value not in (b"C", b"M"):
                    raise ValueError("unknown status")
                account.status = "C" if value == b"C" else "M"
            elif field == b"mt":
                account.merged_into = value.decode()
            elif field == b"mi":
                account.merge_id = value.decode()
            elif field == b"mg":
                account.merged_ms = int(value)
            elif field.startswith(b"mh:"):
                source, _, ms = value.decode().partition("|")
                merges_in[field[3:].decode()] = MergeIn(source, int(ms))
            elif field.startswith(b"k:"):
                counts[field[2:].decode()] = int(value)
            elif field == b"fe":
                account.first_earn_ms = int(value)
            elif field.startswith(b"q:"):
                coupon = field[2:].decode()
                campaign, issued, until, used = value.decode().rsplit("|", 3)
                coupons[coupon] = CouponEntry(coupon, campaign, int(issued), int(until), int(used))
            elif field.startswith(b"v:"):
                visits[field[2:].decode()] = int(value)
            elif field == b"rk":
                account.rank_id = value.decode()
            elif field == b"rs":
                account.rank_spend = int(value)
            elif field == b"rp":
                account.rank_period = int(value)
            elif field.startswith(b"f:"):
                foreign[field[2:].decode()] = value.decode()
            elif field == OPENED_FIELD:
                account.opened_ms = int(value)
            elif field == CLOSED_FIELD:
                account.closed_ms = int(value)
            elif field in (b"bd", b"hc"):
                profile[field.decode()] = value.decode()
            elif field == b"jt":
                profile["jt"] = int(value)
            elif field == SEQ_FIELD:
                account.seq = int(value)
            elif field == X0_FIELD:
                account.x0 = int(value)
            elif field == PRUNE_HINT_FIELD:
                int(value)  # a hint, not state (see the layout above): checked, not kept
            elif field == LOT_POINTS_FIELD:
                account.lot_points = int(value)
            elif field == HELD_POINTS_FIELD:
                account.held_points = int(value)
            else:
                raise ValueError("unknown field")
        except ValueError as exc:
            raise msgspec.DecodeError(f"account hash field {field!r} = {value!r}: {exc!r}") from None
    account.cards = dict(sorted(cards.items()))
    account.merges_in = dict(sorted(merges_in.items(), key=lambda item: (item[1].time, item[0])))
    account.foreign_refunds = dict(sorted(foreign.items()))
    account.rule_counts = dict(sorted(counts.items()))
    account.visits = dict(sorted(visits.items()))
    account.coupons = dict(sorted(coupons.items()))
    account.profile = MemberProfile(**profile, attrs=dict(sorted(attrs.items())) or None)
    for member, score in lots:
        lot = decode_lot(member, score)
        account.lots[lot.lot_id] = lot
    for member, score in holds:
        seq, hold = decode_open_hold(member, score)
        account.holds[seq] = hold
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
    `amount`: an earn's purchase amount; `racct`: a refund's of a transaction of an account
    merged into this one, that account (`ref` is then its seq). Unused fields are 0, "" or []."""

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
    racct: str = ""
    lines: list[EarnLineEntry] = []
    """An earn under the rules: each rule's part, and how much of it refunds took back."""
    qual: int = 0
    """An earn under a rank program: its qualifying amount, counted in rank period `rp`."""
    rp: int = 0


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
# The entry of a call's last event, and a note, also carry the call's idempotency record: `r`,
# its bytes as the record's key holds them, and `x`, the Unix ms at which that key expires
# (decimal). The write-behind copies them from there instead of reading the key back.
# Shard 0's stream also carries the group directory's changes (`g`, DirectoryChange) and rule
# set publications (`u`, RuleSetPublished), which no account's script writes.

EVENT_FIELD = b"e"
NOTE_FIELD = b"i"
RECORD_FIELD = b"r"
RECORD_EXPIRY_FIELD = b"x"


class Event(msgspec.Struct, frozen=True, omit_defaults=True):
    """One state change of one account, with everything the script derived for it, so that the
    journal's projections copy instead of computing. Fields the event's type does not carry are
    None (absent from the map). Unknown fields are ignored, so a later script may add some.

    Every event: `pts`, `lots` (its effects on lots' unheld points) and `available`/`held` (the
    balance right after it). By type:
    - ACCOUNT_OPENED: `card`, `kind` (the card's), `profile`, `rid`;
    - CARD_LINKED: `card`, `kind`, `rid`; CARD_UNLINKED, CARD_BLOCKED, CARD_UNBLOCKED: `card`,
      `rid`; CARD_REISSUED: `card` (now replaced), `new_card`, `kind` (the new card's), `rid`;
    - PROFILE_UPDATED: `profile` (the whole profile after the update), `rid`;
    - ACCOUNT_CLOSED: `lots` taking every lot's points (forfeited: breakage), `rid`;
    - MERGED_OUT (on the source): `lots` taking every lot's points, `moved` (the lots as they
      left), `target`, `merge` (its id), `cards` (moved), `links` (the same cards' field values,
      CardLink; absent if none), `foreign` (the source's refund states of transactions merged
      into it before, as its `f:` fields had them; absent if none), `coupons` (the coupons moved,
      which leave the source; absent if none), `actor`, `why`, `rid`;
    - MERGED_IN (on the target): `lots` (where each moved lot landed), `source`, `merge`, `cards`,
      `links` (the cards' field values as they arrived; absent if none), `coupons` (the coupons as
      they landed: a coupon whose id the target could have issued gets a new one; absent if none);
    - COUPON_USED: `coupons`, the coupon as used (pts 0, no lot effects), `rid`;
    - REFUNDED of a transaction of an account merged into this one: `racct` names that account.
    - EARN under the rules: `lines` (each rule's part) and `rules` (the rule set's version);
      REFUNDED of one: `lines`, the shares taken back per rule.
    - EARN, GRANT: `amount`, `ptime` (purchase time), `pos`, `rid`; VISIT (a check-in) the same,
      `ptime` the visit's time, `visits` the limit keys it set;
    - EARN, VISIT under a rank program: `spend`, `period`, `qual`, and `rank` when it reached a
      higher rank; a lazy review before it is an event of its own;
    - RANK_REVIEWED (a new rank period for the member: the rank_review op, or an earn's lazy
      review): `rank` [from, to], `spend` (the period that ended), `period` (the new one);
    - REFUNDED of an earn under a rank program, in the period the earn counted in: `spend`;
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
    kind: CardKindCode | None = None
    new_card: str | None = None
    profile: MemberProfile | None = None
    moved: list[LotEntry] | None = None
    target: str | None = None
    source: str | None = None
    merge: str | None = None
    cards: list[str] | None = None
    actor: str | None = None
    why: str | None = None
    racct: str | None = None
    links: dict[str, str] | None = None
    foreign: dict[str, str] | None = None
    lines: list[EarnLineEntry] | None = None
    rules: int | None = None
    """EARN under the rules: the rule set version it used."""
    counts: dict[str, int] | None = None
    """EARN, REFUNDED, MERGED_IN: the capped rules' counts for the member after it (k:<rule>)."""
    first: bool | None = None
    """EARN, MERGED_IN: it made the member's first-earn mark (fe = its time)."""
    rank: list[str] | None = None
    """EARN, VISIT: [from, to] when its spend reached a higher rank; RANK_REVIEWED: [from, to]
    (from "" for a member who had none; to = from when the review kept the rank)."""
    coupons: list[CouponEntry] | None = None
    """EARN, VISIT: coupons it issued; COUPON_USED: the coupon used; MERGED_OUT: the coupons that
    left with the move; MERGED_IN: the same as they landed (ids the target's)."""
    visits: dict[str, int] | None = None
    """VISIT, MERGED_IN: the day (a local date's ordinal) each visit limit key now says (v:<key>)."""
    spend: int | None = None
    """EARN, VISIT under a rank program, REFUNDED lowering it: the member's qualifying spend in the
    period after it (rs); RANK_REVIEWED: the spend of the period that ended."""
    period: int | None = None
    """EARN, VISIT under a rank program: the rank period its spend counts in (rp, and its record's
    rp); RANK_REVIEWED: the period that began (rp after it; rs is then 0)."""
    qual: int | None = None
    """EARN, VISIT under a rank program: the qualifying amount it added to the spend (its record's
    qual)."""

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


def decode_stream_entry(
    fields: Mapping[bytes, bytes],
) -> Event | IdempotencyNote | DirectoryChange | RuleSetPublished | AuditRecord:
    """A stream entry's fields: the event, the note, the group directory's change, the rule set
    publication (shard 0's stream, see "rule sets") or the audit record (shard 0's too) it carries."""
    if EVENT_FIELD in fields:
        return _decode_event(fields[EVENT_FIELD])
    if NOTE_FIELD in fields:
        return _decode_note(fields[NOTE_FIELD])
    if DIRECTORY_FIELD in fields:
        return _decode_directory_change(fields[DIRECTORY_FIELD])
    if RULE_SET_FIELD in fields:
        return _decode_published(fields[RULE_SET_FIELD])
    if AUDIT_FIELD in fields:
        return _decode_audit(fields[AUDIT_FIELD])
    raise msgspec.DecodeError(
        f"a stream entry has field {EVENT_FIELD!r}, {NOTE_FIELD!r}, {DIRECTORY_FIELD!r}, {RULE_SET_FIELD!r} or"
        f" {AUDIT_FIELD!r}, not {sorted(fields)}"
    )


def stream_entry_record(fields: Mapping[bytes, bytes]) -> tuple[bytes, int] | None:
    """The idempotency record a stream entry carries and the Unix ms it expires at; None for an
    entry without one (a call's earlier events, or an entry of a script older than the fields)."""
    record = fields.get(RECORD_FIELD)
    if record is None:
        return None
    try:
        return record, int(fields[RECORD_EXPIRY_FIELD])
    except (KeyError, ValueError):
        raise msgspec.DecodeError(f"a stream entry's record has no expiry ms in {RECORD_EXPIRY_FIELD!r}") from None


# -- the group directory ---------------------------------------------------------------------
# In shard 0's slot (keys.py, Keyspace.directory): three hashes, `companies` (company id ->
# CompanyEntry), `stores` (store id -> StoreEntry) and `terminals` (terminal_field -> TerminalEntry),
# each value a msgpack map; and `version`, a counter (decimal, absent: 0) that every change
# raises by one. One MULTI/EXEC writes an entry, raises the version and appends the change
# (DirectoryChange, in a shard 0 stream entry's field `g`) for the write-behind to copy, so the
# version orders the changes in Redis, in the stream and in PostgreSQL alike. Unknown fields are
# ignored, so a later release may add some.

DIRECTORY_FIELD = b"g"


class CompanyEntry(msgspec.Struct, frozen=True, tag="company"):
    company_id: str
    name: str = ""
    yen: int = 1
    """Its point value: `yen` yen per `per` points (domain/settlement.py, PointValue)."""
    per: int = 1


class StoreEntry(msgspec.Struct, frozen=True, tag="store"):
    store_id: str
    company_id: str
    region_id: str
    name: str = ""


class TerminalEntry(msgspec.Struct, frozen=True, tag="terminal"):
    store_id: str
    terminal_id: str
    name: str = ""


DirectoryEntry = CompanyEntry | StoreEntry | TerminalEntry


class DirectoryChange(msgspec.Struct, frozen=True):
    """Change number `version` of the directory, made at `time` (Unix ms): `entry` as it is now
    stored (registering is create-or-update)."""

    version: int
    time: int
    entry: DirectoryEntry


def terminal_field(store_id: str, terminal_id: str) -> bytes:
    """The terminals hash's field of a terminal: "<store id>/<terminal id>" (ids have no '/')."""
    return f"{store_id}/{terminal_id}".encode()


def directory_field(entry: DirectoryEntry) -> bytes:
    """The field of its hash that keeps `entry`."""
    if isinstance(entry, CompanyEntry):
        return entry.company_id.encode()
    if isinstance(entry, StoreEntry):
        return entry.store_id.encode()
    return terminal_field(entry.store_id, entry.terminal_id)


_decode_company = msgspec.msgpack.Decoder(CompanyEntry).decode
_decode_store = msgspec.msgpack.Decoder(StoreEntry).decode
_decode_terminal = msgspec.msgpack.Decoder(TerminalEntry).decode
_decode_directory_change = msgspec.msgpack.Decoder(DirectoryChange).decode


def encode_directory_entry(entry: DirectoryEntry) -> bytes:
    return _encode(entry)


def decode_company(raw: bytes) -> CompanyEntry:
    return _decode_company(raw)


def decode_store(raw: bytes) -> StoreEntry:
    return _decode_store(raw)


def decode_terminal(raw: bytes) -> TerminalEntry:
    return _decode_terminal(raw)


def encode_directory_change(change: DirectoryChange) -> bytes:
    return _encode(change)


def decode_directory_change(raw: bytes) -> DirectoryChange:
    return _decode_directory_change(raw)


def decode_directory_version(raw: bytes | str | None) -> int:
    """The version key's value; 0 for a directory never changed."""
    if raw is None:
        return 0
    try:
        return int(raw)
    except ValueError:
        raise msgspec.DecodeError(f"directory version {raw!r} is not a decimal integer") from None


# -- the ledger function's arguments and answers, and idempotency records ----------------------


EXPIRY_CONTINUES = "EXPIRY_CONTINUES"
"""OpResult.code of a call that found more holds past their TTL than one call releases (the
ledger script's EXPIRE_PAGE): it released that many and did nothing else, wrote no idempotency
record, and the same call made again releases more, then runs. Never an answer to a client."""


class OpResult(msgspec.Struct, frozen=True):
    """What a ledger function call answered; `code` is OK, EXPIRY_CONTINUES, or the gRPC status
    name of a refusal."""

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
    card: str = ""
    """A card's field value after the call (CardLink): card_state, reissue (the old card)."""
    new_card: str = ""
    """reissue: the new card's field value."""
    fields: dict[str, str] = {}
    """account: the account hash."""
    cards: list[str] = []
    """merge_out: the cards moved."""
    more: bool = False
    """balance: more lots follow the page."""
    page: list[str] = []
    """balance: the page's lots as the lots' set stores them: member, score, member, score...
    (Ledger.balance turns them into `lots` with decode_lot)."""
    lines: list[EarnLineEntry] = []
    """earn under the rules: each rule's part; refund of one: the shares taken back."""
    rank: str = ""
    """earn under a rank program: the member's rank after it."""
    up: bool = False
    """earn: its spend reached a higher rank."""
    was: str = ""
    """rank_review: the rank before the review ("" if none)."""
    soon: list[LotEntry] = []
    """earn, capture (asked for receipt facts): lots expiring soon, soonest first."""
    bd: str = ""
    """earn, capture (receipt facts): the member's birthday "MMDD" ("" if not given)."""
    spend: int = 0
    """earn, capture (receipt facts): the member's qualifying spend (rank program)."""
    now: int = 0
    """earn, capture (receipt facts): the call's instant (ms)."""
    coupons: list[CouponEntry] = []
    """earn: the coupons it issued; use_coupon: the coupon used."""
    etx: int = 0
    """capture that earned for its sale: the earn's seq (its lots, lines... are in this answer)."""
    epts: int = 0
    """capture that earned: the points earned."""
    rules: int = 0
    """earn under the rules: the rule set version it used."""


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
# The index is where a server finds a card's account; the account's own `c:<card>` field (see
# card_field) is what the script trusts: a link is moved by changing both, and a call the
# index or a cache sent to the wrong account is refused, not applied.


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


# -- rule sets ---------------------------------------------------------------------------------
# Published rule sets live in shard 0's slot (Keyspace.rules): a hash version -> the rule set
# (domain/earning.py's RuleSet as msgpack), and the current version. Publishing appends an entry
# `u` (RuleSetPublished) to shard 0's stream in the same transaction, for the journal (which
# copies it into its rule_sets table: migration 0004, journal/rules.py).

RULE_SET_FIELD = b"u"


class RuleSetPublished(msgspec.Struct, frozen=True):
    version: int
    time: int
    rule_set: RuleSet


_decode_rule_set = msgspec.msgpack.Decoder(RuleSet).decode
_decode_published = msgspec.msgpack.Decoder(RuleSetPublished).decode


def encode_rule_set(rule_set: RuleSet) -> bytes:
    return _encode(rule_set)


def decode_rule_set(raw: bytes) -> RuleSet:
    return _decode_rule_set(raw)


def encode_rule_set_published(published: RuleSetPublished) -> bytes:
    return _encode(published)


def decode_rule_set_published(raw: bytes) -> RuleSetPublished:
    return _decode_published(raw)


# -- the audit trail ----------------------------------------------------------------------------
# Operator actions and refused calls (api/audit.py) go to shard 0's stream as entries with one
# field `a`, from where the write-behind copies them to audit_log (journal/audit.py): in Redis
# (appendfsync always) before the call is answered, so an answered action has its record, unless
# Redis failed just then (the server logs the record's method, actor and peer instead).

AUDIT_FIELD = b"a"


class AuditRecord(msgspec.Struct, frozen=True, omit_defaults=True):
    """Who did what, when, from where, and how it ended."""

    time: int
    """Unix ms."""
    method: str
    """The gRPC method (/pointauth.v1.Service/Method), or `cli:<command>` for an operator command."""
    actor: str
    """The credential's id; for a caller refused as unauthenticated, what it presented (`key:<id>`,
    `certificate:<identity>`, or ""); "" with authentication off."""
    role: str
    """The credential's role ("" if none)."""
    peer: str
    """Where the call came from (gRPC's peer: ipv4:host:port), or the operator's host for a command."""
    code: str
    """OK, or the status code's name."""
    reason: str = ""
    """The ErrorInfo reason of a refusal."""
    request: str = ""
    """The request, as protobuf's JSON (at most AUDIT_REQUEST_MAX characters; longer is cut)."""
    suppressed: int = 0
    """Refusals of this caller (actor and peer) in this process not recorded since its previous
    record: a flood beyond the refusals' recording rate is counted, not written one by one."""


AUDIT_REQUEST_MAX = 16_384
_decode_audit = msgspec.msgpack.Decoder(AuditRecord).decode


def audit_entry(record: AuditRecord) -> dict[bytes, bytes]:
    """The stream entry's fields of an audit record."""
    return {AUDIT_FIELD: _encode(record)}
