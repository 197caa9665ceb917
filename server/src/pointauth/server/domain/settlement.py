"""Settlement between group companies (ポイント精算): the issuer of a lot bears its points' cost,
so when points a company issued are used at another company's store, the issuer pays the user.

A statement covers one period, a calendar month in the program's time zone. It sums the point
flows of the period (the events' effects on members' lots, per lot issuer: `Flow`) into what each
issuer's points did (issued, used, expired...), what each (issuer, using company) pair owes, and
nets each pair of companies into one payment in yen at the issuers' point values.

Late events belong to the period in which they happen: a December refund of a November capture
is in December's statement, as an adjustment naming the transaction it corrects.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

from pointauth.server.domain.ids import transaction_id


class Flow(StrEnum):
    """How points enter, leave or move between a member's lots; each is one lot issuer's."""

    ISSUED = "ISSUED"
    """An earn, a grant or a visit's points added to a lot (the issuer's liability grows)."""
    ISSUE_REFUNDED = "ISSUE_REFUNDED"
    """A refund of an earn or grant took them back."""
    USED = "USED"
    """A capture or a redemption spent them at the using company: the issuer owes it."""
    USE_REFUNDED = "USE_REFUNDED"
    """A refund of a capture or redemption gave them back to the member: the debt is undone."""
    EXPIRED = "EXPIRED"
    """They expired unused: breakage, which stays with the issuer."""
    FORFEITED = "FORFEITED"
    """The account was closed with them: breakage too."""
    MERGED_OUT = "MERGED_OUT"
    """They left an account merged into another (lots keep their issuer)."""
    MERGED_IN = "MERGED_IN"
    """They arrived on the account merged into."""


USE_FLOWS = (Flow.USED, Flow.USE_REFUNDED)


@dataclass(frozen=True)
class TieOut:
    """One check of a statement against the journal: the flows' points of `flows` must equal the
    points (`journal.points`) of the journal's events of `event_types` in the period."""

    name: str
    flows: tuple[Flow, ...]
    event_types: tuple[str, ...]


TIE_OUTS = (
    TieOut("issued", (Flow.ISSUED,), ("EARN", "GRANT", "VISIT")),
    TieOut("used", (Flow.USED,), ("HOLD_CAPTURED", "REDEEMED")),
    TieOut("refunded", (Flow.ISSUE_REFUNDED, Flow.USE_REFUNDED), ("REFUNDED",)),
    TieOut("expired", (Flow.EXPIRED,), ("LOTS_EXPIRED",)),
    TieOut("forfeited", (Flow.FORFEITED,), ("ACCOUNT_CLOSED",)),
    TieOut("merged_out", (Flow.MERGED_OUT,), ("MERGED_OUT",)),
    TieOut("merged_in", (Flow.MERGED_IN,), ("MERGED_IN",)),
)


MOVES_NO_POINTS = (
    "ACCOUNT_OPENED", "CARD_LINKED", "CARD_UNLINKED", "CARD_BLOCKED", "CARD_UNBLOCKED", "CARD_REISSUED",
    "PROFILE_UPDATED", "COUPON_USED", "RANK_REVIEWED", "HOLD_AUTHORIZED", "HOLD_VOIDED", "HOLD_EXPIRED",
)  # fmt: skip
"""Event types with no flow: a hold's points stay the member's until a capture spends them."""
UNCLASSIFIED = "unclassified_events"
"""The tie-out line that counts the period's events of a type neither TIE_OUTS nor MOVES_NO_POINTS
knows (a newer ledger's): it must be (0, 0), or their points went uncounted."""

_PERIOD = re.compile(r"(\d{4})-(0[1-9]|1[0-2])")


@dataclass(frozen=True)
class Period:
    """A calendar month in the program's time zone: [starts, ends)."""

    name: str
    """YYYY-MM."""
    zone: str

    @classmethod
    def parse(cls, name: str, zone: str) -> Period:
        """ValueError for anything but YYYY-MM (months 01 to 12, years 2000 to 9998)."""
        match = _PERIOD.fullmatch(name)
        if match is None or not 2000 <= int(match[1]) <= 9998:
            raise ValueError(f"period {name!r} is not a month as YYYY-MM (e.g. 2026-11)")
        ZoneInfo(zone)
        return cls(name, zone)

    @classmethod
    def of(cls, time: datetime, zone: str) -> Period:
        """The period a time falls in."""
        return cls(time.astimezone(ZoneInfo(zone)).strftime("%Y-%m"), zone)

    @property
    def starts(self) -> datetime:
        year, month = (int(part) for part in self.name.split("-"))
        return datetime(year, month, 1, tzinfo=ZoneInfo(self.zone))

    @property
    def ends(self) -> datetime:
        # Day 28 plus four days is always in the next month.
        following = (self.starts.replace(day=28) + timedelta(days=4)).replace(day=1)
        return following.replace(tzinfo=ZoneInfo(self.zone))


MAX_POINT_VALUE_YEN = 1_000_000


@dataclass(frozen=True)
class PointValue:
    """What an issuer pays per point used elsewhere: `yen` per `points` points (1 or 100)."""

    yen: int = 1
    points: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.yen <= MAX_POINT_VALUE_YEN or self.points not in (1, 100):
            raise ValueError(f"point value {self.yen} yen per {self.points} points: yen >= 0, per 1 or 100 points")

    def hundredths(self, points: int) -> int:
        """The value of `points` in hundredths of a yen: exact, as `points` is 1 or 100."""
        return points * self.yen * (100 // self.points)

    def __str__(self) -> str:
        return f"{self.yen} yen per {'point' if self.points == 1 else f'{self.points} points'}"


DEFAULT_POINT_VALUE = PointValue()


def yen_of_hundredths(hundredths: int) -> int:
    """Whole yen, half up: a payment is rounded once, after netting (see `payments`)."""
    return (hundredths + 50) // 100


@dataclass
class IssuerLine:
    """What one issuer's points did in the period, and the point value its payments used."""

    issuer_id: str
    value: PointValue = DEFAULT_POINT_VALUE
    totals: dict[Flow, int] = field(default_factory=lambda: dict.fromkeys(Flow, 0))

    @property
    def outstanding_change(self) -> int:
        """How much the issuer's points held by members (in lots or on hold) grew in the period."""
        t = self.totals
        return (
            t[Flow.ISSUED] - t[Flow.ISSUE_REFUNDED] - t[Flow.USED] + t[Flow.USE_REFUNDED] - t[Flow.EXPIRED]
            - t[Flow.FORFEITED] - t[Flow.MERGED_OUT] + t[Flow.MERGED_IN]
        )  # fmt: skip


@dataclass(frozen=True)
class PairLine:
    """Points of `issuer_id`'s lots used at `company_id` (or at one of its stores), and refunds
    of such uses."""

    issuer_id: str
    company_id: str
    used: int
    use_refunded: int
    store_id: str = ""

    @property
    def net(self) -> int:
        return self.used - self.use_refunded


@dataclass(frozen=True)
class Payment:
    """One payment per pair of companies: `payer_id` pays `payee_id`."""

    payer_id: str
    payee_id: str
    yen: int


@dataclass(frozen=True)
class Adjustment:
    """A refund in the period of a transaction of an earlier period."""

    account_id: str
    seq: int
    flow: Flow
    issuer_id: str
    company_id: str
    store_id: str
    points: int
    ref_account: str
    ref_seq: int
    ref_period: str

    @property
    def transaction_id(self) -> str:
        """The refund's."""
        return transaction_id(self.account_id, self.seq)

    @property
    def adjusts_transaction_id(self) -> str:
        return transaction_id(self.ref_account, self.ref_seq)


def payments(pairs: Iterable[PairLine], values: Mapping[str, PointValue]) -> list[Payment]:
    """Nets the pairs of a period into one payment per pair of companies.

    Each direction's debt is exact (net points used x the issuer's point value, in hundredths of a
    yen); the two directions are netted, and only the difference is rounded, once, to whole yen
    (half up). A company's own points used at its own stores owe nothing. A pair whose net rounds
    to 0 yen has no payment."""
    owed: dict[tuple[str, str], int] = defaultdict(int)
    for p in pairs:
        if p.issuer_id != p.company_id:
            owed[(p.issuer_id, p.company_id)] += values.get(p.issuer_id, DEFAULT_POINT_VALUE).hundredths(p.net)
    out = []
    for a, b in sorted({tuple(sorted(key)) for key in owed}):
        net = owed.get((a, b), 0) - owed.get((b, a), 0)
        payer, payee = (a, b) if net > 0 else (b, a)
        yen = yen_of_hundredths(abs(net))
        if yen:
            out.append(Payment(payer, payee, yen))
    return out


@dataclass
class Statement:
    """A period's settlement. `tie_out`: per TIE_OUTS name, [flows' points, journal's points]."""

    period: Period
    issuers: list[IssuerLine]
    pairs: list[PairLine]
    stores: list[PairLine]
    payments: list[Payment]
    adjustments: list[Adjustment]
    tie_out: dict[str, tuple[int, int]]
    flows: int
    """Flow rows the statement sums."""
    closed_at: datetime | None = None
    closed_by: str = ""

    @property
    def ties_out(self) -> bool:
        return all(flows == journal for flows, journal in self.tie_out.values())

    def mismatches(self) -> list[str]:
        return [
            f"{name}: flows {flows}, journal {journal}"
            for name, (flows, journal) in self.tie_out.items()
            if flows != journal
        ]

    def for_company(self, company_id: str) -> Statement:
        """The lines naming the company (as issuer, user, payer or payee)."""
        return Statement(
            period=self.period,
            issuers=[i for i in self.issuers if i.issuer_id == company_id],
            pairs=[p for p in self.pairs if company_id in (p.issuer_id, p.company_id)],
            stores=[p for p in self.stores if company_id in (p.issuer_id, p.company_id)],
            payments=[p for p in self.payments if company_id in (p.payer_id, p.payee_id)],
            adjustments=[a for a in self.adjustments if company_id in (a.issuer_id, a.company_id)],
            tie_out=self.tie_out,
            flows=self.flows,
            closed_at=self.closed_at,
            closed_by=self.closed_by,
        )
