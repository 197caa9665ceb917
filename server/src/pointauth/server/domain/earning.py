"""The vocabulary of earning under rules, shared by the rules (rules/engine.py evaluates it), the
ledger (which stores rule sets and gives the lines atomically) and the API (which converts it):
rule sets, purchases as the rules see them, and the lines an earn gives."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

LotKindCode = Literal["R", "L"]
EffectKind = Literal["multiply", "add", "per_amount", "coupon"]
BASE_RULE = "base"
"""The rule name of the base points' line."""

# Why a line gave fewer points than its rule says (RulePoints.note). ledger.lua, which decides
# the member's, spells them too.
NOTE_MEMBER_CAP = "member_cap"
NOTE_BUDGET = "budget"
NOTE_NOT_BIRTHDAY_MONTH = "not_birthday_month"
NOTE_NOT_FIRST_PURCHASE = "not_first_purchase"
NOTE_NOT_RANK = "not_rank"
NOTE_ALREADY_CHECKED_IN = "already_checked_in"


@dataclass(frozen=True)
class Rate:
    """`points` points per `per_amount` of earning amount."""

    points: int
    per_amount: int


@dataclass(frozen=True)
class BasketLine:
    sku: str
    category: str
    quantity: int
    amount: int
    earns: bool = True
    """False for what never earns (gift cards, tobacco, stamps)."""


@dataclass(frozen=True)
class Purchase:
    """A purchase as the rules see it: where, when (in the program's time zone) and what."""

    amount: int
    """The purchase's total; with basket lines, the sum of their amounts."""
    lines: tuple[BasketLine, ...]
    company_id: str
    store_id: str
    region_id: str
    channel: int
    time_ms: int
    month: int
    month_day: int
    weekday: int
    """1 (Monday) to 7 (Sunday)."""
    minute: int
    """Minutes after local midnight."""


@dataclass(frozen=True)
class Conditions:
    """When a campaign applies: each set is "any of", empty meaning any."""

    start_ms: int | None = None
    end_ms: int | None = None
    company_ids: frozenset[str] = frozenset()
    store_ids: frozenset[str] = frozenset()
    region_ids: frozenset[str] = frozenset()
    channels: frozenset[int] = frozenset()
    weekdays: frozenset[int] = frozenset()
    month_days: frozenset[int] = frozenset()
    start_minute: int = 0
    end_minute: int = 0
    skus: frozenset[str] = frozenset()
    categories: frozenset[str] = frozenset()
    min_amount: int = 0
    birthday_month: bool = False
    first_purchase: bool = False
    rank_ids: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Effect:
    kind: EffectKind
    basis_points: int = 0
    points: int = 0
    per_amount: int = 0
    coupon_name: str = ""
    valid_days: int = 0
    """A coupon's: valid for this many days from the purchase."""


@dataclass(frozen=True)
class Campaign:
    campaign_id: str
    name: str
    order: int
    conditions: Conditions
    effect: Effect
    lot_kind: LotKindCode = "R"
    expire_days: int = 0
    """0: the base points' expiry."""
    max_per_purchase: int = 0
    max_per_member: int = 0
    budget: int = 0


@dataclass(frozen=True)
class RankTier:
    rank_id: str
    name: str
    min_spend: int


RankDowngrade = Literal["one_step", "to_spend"]


@dataclass(frozen=True)
class RankProgram:
    """Ranks by qualifying spend over periods of `period_months` calendar months (from January):
    up at once when a purchase reaches a tier, down only at a period's review."""

    tiers: tuple[RankTier, ...]
    """Lowest first; the first's min_spend is 0."""
    period_months: int = 12
    downgrade: RankDowngrade = "one_step"

    def period_of(self, year: int, month: int) -> int:
        """The index of the period that month falls in (months counted from year 0)."""
        return (year * 12 + month - 1) // self.period_months


VisitLimit = Literal["store_day", "day"]


@dataclass(frozen=True)
class VisitRule:
    """Points for a visit (CheckIn), once per store per day or once per day."""

    rule_id: str
    name: str
    points: int
    conditions: Conditions
    limit: VisitLimit = "store_day"
    lot_kind: LotKindCode = "R"
    expire_days: int = 0


@dataclass(frozen=True)
class ReceiptTemplates:
    """What receipt lines say (string.Template: $placeholders)."""

    expiring_within_days: int = 30
    earned: str = "$name: $points pt"
    balance: str = "Balance: $points pt"
    expiring: str = "$points pt expire on $date"
    rank: str = "$rank: $remaining more to $next"
    top_rank: str = "$rank"
    birthday: str = "Happy birthday!"
    coupon: str = "Coupon $name ($coupon) valid until $date"
    base_name: str = "Points"


@dataclass(frozen=True)
class RuleSet:
    version: int
    published_ms: int = 0
    base_rates: tuple[tuple[str, str, Rate], ...] = ()
    """(company, store, rate); store "" is the company's rate."""
    campaigns: tuple[Campaign, ...] = ()
    ranks: RankProgram | None = None
    visits: tuple[VisitRule, ...] = ()
    receipt: ReceiptTemplates = ReceiptTemplates()

    @cached_property
    def rates(self) -> dict[tuple[str, str], Rate]:
        """base_rates by (company, store), for lookups."""
        return {(company, store): rate for company, store, rate in self.base_rates}


@dataclass(frozen=True)
class EarnLine:
    """Points one rule gives, into a lot of its kind and expiry, and what the account's script
    and the budget must still allow."""

    rule: str
    points: int
    kind: LotKindCode
    expire_ms: int
    birthday_month: int = 0
    """Only if the member's birthday is in this month (0: no such condition)."""
    first_purchase: bool = False
    """Only if the member has never earned."""
    member_cap: int = 0
    budget: int = 0
    """The campaign's budget, if it has one (0: none)."""
    ranks: frozenset[str] = frozenset()
    """Only if the member's rank (after this purchase's spend) is one of these (empty: any)."""
    limit_key: str = ""
    """A visit rule's: once per day per this key ("<rule>:<store>" or "<rule>:*")."""
    short: int = 0
    """Points its campaign's budget could not give (the line's note says "budget")."""
    coupon: bool = False
    """A coupon campaign's line: `points` is 1 (one coupon), valid until `expire_ms`."""
