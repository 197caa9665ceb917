"""The promotional receipt (販促レシート): ready-to-print lines from an earn's or a capture's answer,
the same on every vendor's till. Pure: the facts come from the account's script (ledger.lua,
receipt_facts), the words from the rule set's templates (domain/earning.py, ReceiptTemplates)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from string import Template
from typing import Literal
from zoneinfo import ZoneInfo

from pointauth.server.domain.earning import BASE_RULE, RankProgram, ReceiptTemplates, RuleSet

LineKind = Literal["earned", "balance", "expiring", "rank", "birthday", "coupon"]
PLACEHOLDERS: dict[str, frozenset[str]] = {
    "earned": frozenset({"name", "points"}),
    "balance": frozenset({"points"}),
    "expiring": frozenset({"points", "date"}),
    "rank": frozenset({"rank", "next", "remaining"}),
    "top_rank": frozenset({"rank"}),
    "birthday": frozenset(),
    "coupon": frozenset({"name", "coupon", "date"}),
}
"""What each template may say."""


@dataclass(frozen=True)
class ReceiptLine:
    kind: LineKind
    text: str


@dataclass(frozen=True)
class Facts:
    """What the lines are made of: the rules' points (rule, points), the balance, lots expiring
    soon (expiry ms, points), the member's birthday "MMDD", rank and qualifying spend."""

    earned: tuple[tuple[str, int], ...]
    available: int
    expiring: tuple[tuple[int, int], ...]
    birthday: str
    rank_id: str
    spend: int
    coupons: tuple[tuple[str, str, int], ...] = ()
    """Coupons issued: (coupon id, campaign, valid-before ms)."""


def unknown_placeholders(template: str, allowed: frozenset[str]) -> set[str]:
    """The $placeholders a template uses that its line does not offer (a malformed $ counts)."""
    found: set[str] = set()
    for match in Template.pattern.finditer(template):
        named = match.group("named") or match.group("braced")
        if named is not None:
            found.add(named)
        elif match.group("invalid") is not None:
            found.add("$")
    return found - allowed


def _say(template: str, **values: object) -> str:
    return Template(template).safe_substitute({k: str(v) for k, v in values.items()})


def names(rules: RuleSet) -> dict[str, str]:
    out = {c.campaign_id: c.name for c in rules.campaigns}
    out.update({v.rule_id: v.name for v in rules.visits})
    out[BASE_RULE] = rules.receipt.base_name
    return out


def lines(rules: RuleSet, facts: Facts, zone: ZoneInfo, now_ms: int) -> list[ReceiptLine]:
    t: ReceiptTemplates = rules.receipt
    named = names(rules)
    out = [
        ReceiptLine("earned", _say(t.earned, name=named.get(rule, rule), points=points))
        for rule, points in facts.earned
        if points
    ]
    out.append(ReceiptLine("balance", _say(t.balance, points=facts.available)))
    by_day: dict[str, int] = {}
    for expire_ms, points in facts.expiring:
        # An expiry is exclusive: the points are good through the millisecond before it.
        day = datetime.fromtimestamp((expire_ms - 1) / 1000, tz=zone).strftime("%Y-%m-%d")
        by_day[day] = by_day.get(day, 0) + points
    out += [ReceiptLine("expiring", _say(t.expiring, points=points, date=day)) for day, points in by_day.items()]
    if rules.ranks is not None and facts.rank_id:
        out.append(ReceiptLine("rank", _rank_line(rules.ranks, t, facts.rank_id, facts.spend)))
    offers = {c.campaign_id: c.effect.coupon_name for c in rules.campaigns}
    for coupon_id, campaign, expire_ms in facts.coupons:
        day = datetime.fromtimestamp((expire_ms - 1) / 1000, tz=zone).strftime("%Y-%m-%d")
        out.append(
            ReceiptLine("coupon", _say(t.coupon, name=offers.get(campaign, campaign), coupon=coupon_id, date=day))
        )
    month = datetime.fromtimestamp(now_ms / 1000, tz=zone).month
    if facts.birthday and int(facts.birthday[:2]) == month:
        out.append(ReceiptLine("birthday", _say(t.birthday)))
    return out


def _rank_line(program: RankProgram, t: ReceiptTemplates, rank_id: str, spend: int) -> str:
    ids = [tier.rank_id for tier in program.tiers]
    here = ids.index(rank_id) if rank_id in ids else 0
    tier = program.tiers[here]
    if here + 1 == len(ids):
        return _say(t.top_rank, rank=tier.name)
    upper = program.tiers[here + 1]
    return _say(t.rank, rank=tier.name, next=upper.name, remaining=max(upper.min_spend - spend, 0))
