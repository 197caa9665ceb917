"""The earn rules: what a purchase earns under a rule set (domain/earning.py), as pure functions.

Everything here is integer arithmetic, rounded down where a division happens:
- base points = earning amount × rate points ÷ rate amount, once per purchase;
- a multiplier's extra points = base points of the lines it covers × basis points ÷ 10,000,
  where the covered lines' base points are their amount × rate points ÷ rate amount;
- an addition per amount = covered amount × points ÷ per amount; a fixed addition is its points;
- then the campaign's per-purchase cap.

What depends on the member (birthday month, first purchase) and what must hold across
purchases (per-member caps, budgets) is not decided here: each line carries it, for the account's
script (guards, caps) and the budget's reservation to enforce atomically.
"""

from __future__ import annotations

from pointauth.server.domain.earning import (
    BASE_RULE,
    BasketLine,
    Campaign,
    Conditions,
    EarnLine,
    Purchase,
    RankProgram,
    Rate,
    RuleSet,
)

BASIS_POINTS = 10_000
DAY_MS = 86_400_000
MAX_LINE_POINTS = 10**15
"""A line's points at most (the balance cap): the script refuses more as BALANCE_LIMIT_EXCEEDED."""


def earning_amount(purchase: Purchase) -> int:
    """What earns: the lines that earn, or the total when the till sent no lines."""
    if not purchase.lines:
        return purchase.amount
    return sum(line.amount for line in purchase.lines if line.earns)


def rate_for(rules: RuleSet, company_id: str, store_id: str, default: Rate) -> Rate:
    """The most specific base rate: the store's, the company's, the program's."""
    return rules.rates.get((company_id, store_id)) or rules.rates.get((company_id, "")) or default


def apply_rate(rate: Rate, amount: int) -> int:
    return amount * rate.points // rate.per_amount


def stacking(rules: RuleSet) -> list[Campaign]:
    """Multipliers first, then additions, each by order (then id)."""
    return sorted(rules.campaigns, key=lambda c: (c.effect.kind != "multiply", c.order, c.campaign_id))


def picks_lines(cond: Conditions) -> bool:
    return bool(cond.skus or cond.categories)


def covers(cond: Conditions, line: BasketLine) -> bool:
    return line.earns and (line.sku in cond.skus or line.category in cond.categories)


def _any_of(allowed: frozenset[str] | frozenset[int], value: str | int) -> bool:
    return not allowed or value in allowed


def _in_window(cond: Conditions, minute: int) -> bool:
    """[start, end) in minutes after midnight; may wrap past midnight; start == end: all day."""
    start, end = cond.start_minute, cond.end_minute
    if start == end:
        return True
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end


def holds(cond: Conditions, p: Purchase) -> bool:
    """Whether the purchase meets every condition that does not depend on the member."""
    return (
        (cond.start_ms is None or p.time_ms >= cond.start_ms)
        and (cond.end_ms is None or p.time_ms < cond.end_ms)
        and _any_of(cond.company_ids, p.company_id)
        and _any_of(cond.store_ids, p.store_id)
        and _any_of(cond.region_ids, p.region_id)
        and _any_of(cond.channels, p.channel)
        and _any_of(cond.weekdays, p.weekday)
        and _any_of(cond.month_days, p.month_day)
        and _in_window(cond, p.minute)
        and earning_amount(p) >= cond.min_amount
        and (not picks_lines(cond) or any(covers(cond, line) for line in p.lines))
    )


def evaluate(rules: RuleSet, purchase: Purchase, default_rate: Rate, base_expire_ms: int) -> list[EarnLine]:
    """The lines a purchase earns: the base line first (always there, even at 0 points), then
    each campaign that applies and gives points, in stacking order."""
    rate = rate_for(rules, purchase.company_id, purchase.store_id, default_rate)
    amount = earning_amount(purchase)
    base = min(apply_rate(rate, amount), MAX_LINE_POINTS)
    lines = [EarnLine(BASE_RULE, base, "R", base_expire_ms)]
    for campaign in stacking(rules):
        cond = campaign.conditions
        if not holds(cond, purchase):
            continue
        covered = sum(line.amount for line in purchase.lines if covers(cond, line)) if picks_lines(cond) else amount
        effect = campaign.effect
        if effect.kind == "coupon":
            lines.append(
                EarnLine(
                    campaign.campaign_id,
                    1,
                    campaign.lot_kind,
                    purchase.time_ms + effect.valid_days * DAY_MS,
                    birthday_month=purchase.month if cond.birthday_month else 0,
                    first_purchase=cond.first_purchase,
                    ranks=cond.rank_ids,
                    member_cap=campaign.max_per_member,
                    coupon=True,
                )
            )
            continue
        if effect.kind == "multiply":
            covered_base = apply_rate(rate, covered) if picks_lines(cond) else base
            points = covered_base * effect.basis_points // BASIS_POINTS
        elif effect.kind == "per_amount":
            points = covered * effect.points // effect.per_amount
        else:
            points = effect.points
        points = min(points, campaign.max_per_purchase or MAX_LINE_POINTS)
        if points <= 0:
            continue
        expire_ms = purchase.time_ms + campaign.expire_days * DAY_MS if campaign.expire_days else base_expire_ms
        lines.append(
            EarnLine(
                campaign.campaign_id,
                points,
                campaign.lot_kind,
                expire_ms,
                birthday_month=purchase.month if cond.birthday_month else 0,
                first_purchase=cond.first_purchase,
                ranks=cond.rank_ids,
                member_cap=campaign.max_per_member,
                budget=campaign.budget,
            )
        )
    return lines


def visit_lines(rules: RuleSet, visit: Purchase, base_expire_ms: int) -> list[EarnLine]:
    """The lines a visit earns: each visit rule whose conditions hold, with its limit's key."""
    lines = []
    for rule in sorted(rules.visits, key=lambda r: r.rule_id):
        if not holds(rule.conditions, visit):
            continue
        expire_ms = visit.time_ms + rule.expire_days * DAY_MS if rule.expire_days else base_expire_ms
        key = f"{rule.rule_id}:{visit.store_id if rule.limit == 'store_day' else '*'}"
        lines.append(
            EarnLine(
                rule.rule_id,
                rule.points,
                rule.lot_kind,
                expire_ms,
                birthday_month=visit.month if rule.conditions.birthday_month else 0,
                ranks=rule.conditions.rank_ids,
                limit_key=key,
            )
        )
    return lines


def supported_rank(program: RankProgram, spend: int) -> int:
    """The index of the highest tier the spend reaches (0: the lowest)."""
    return max(i for i, tier in enumerate(program.tiers) if spend >= tier.min_spend or i == 0)


def rank_after(
    program: RankProgram, rank_id: str | None, spend: int, period: int | None, now_period: int, amount: int
) -> str:
    """The member's rank once a purchase of qualifying `amount` is counted now: the period's
    review first if a period has begun since theirs, then up to what the spend reaches. The
    account's script decides it (ledger.lua, review_rank and OPS.earn); this is its twin for
    SimulateEarn."""
    ids = [tier.rank_id for tier in program.tiers]
    current = ids.index(rank_id) if rank_id in ids else -1
    if period != now_period:
        spent = spend if period == now_period - 1 else 0
        if current < 0:
            current = 0
        elif program.downgrade == "to_spend":
            current = min(current, supported_rank(program, spent))
        elif spent < program.tiers[current].min_spend:
            current = max(current - 1, 0)
        spend = 0
    return ids[max(current, supported_rank(program, spend + amount))]
