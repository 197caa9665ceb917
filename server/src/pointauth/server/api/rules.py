"""RulesService: publishing and reading rule sets. Every field is checked before a rule set can
run; the proto's messages become domain/earning.py's plain data here, and back."""

from __future__ import annotations

from typing import Any

import grpc

from pointauth.server.api import convert
from pointauth.server.api.validation import CHANNELS, MAX_AMOUNT, Violations
from pointauth.server.domain.earning import (
    Campaign,
    Conditions,
    Effect,
    RankDowngrade,
    RankProgram,
    RankTier,
    Rate,
    ReceiptTemplates,
    RuleSet,
    VisitRule,
)
from pointauth.server.rules.receipt import PLACEHOLDERS, unknown_placeholders
from pointauth.server.services.rules import RulesService
from pointauth.v1 import common_pb2, rules_service_pb2_grpc
from pointauth.v1 import rules_service_pb2 as pb

Context = grpc.aio.ServicerContext[Any, Any]

MAX_BASE_RATES = 10_000
MAX_CAMPAIGNS = 200
MAX_RATE_POINTS = 10**6
MAX_PER_AMOUNT = 10**9
MAX_NAME = 100
MAX_EXPIRE_DAYS = 3650
MAX_RANKS = 20
MAX_VISIT_RULES = 50
MAX_TEMPLATE = 200
_KINDS = {common_pb2.LOT_KIND_UNSPECIFIED: "R", common_pb2.LOT_KIND_REGULAR: "R", common_pb2.LOT_KIND_LIMITED_TIME: "L"}
_KIND_OUT = {"R": common_pb2.LOT_KIND_REGULAR, "L": common_pb2.LOT_KIND_LIMITED_TIME}


def _ids(v: Violations, field: str, values: Any) -> frozenset[str]:
    for i, value in enumerate(values):
        v.identifier(f"{field}[{i}]", value)
    return frozenset(values)


def _labels(v: Violations, field: str, values: Any) -> frozenset[str]:
    for i, value in enumerate(values):
        if not 1 <= len(value) <= 64:
            v.add(f"{field}[{i}]", "must be 1 to 64 characters")
    return frozenset(values)


def _conditions(v: Violations, f: str, c: pb.CampaignConditions) -> Conditions:
    start_ms = v.timestamp(f"{f}.start_time", c.start_time) if c.HasField("start_time") else None
    end_ms = v.timestamp(f"{f}.end_time", c.end_time) if c.HasField("end_time") else None
    if start_ms is not None and end_ms is not None and end_ms <= start_ms:
        v.add(f"{f}.end_time", "must be after start_time")
    channels = frozenset(int(ch) for ch in c.channels)
    if not channels <= CHANNELS:
        v.add(f"{f}.channels", "must be channels other than CHANNEL_UNSPECIFIED")
    if any(not 1 <= day <= 7 for day in c.weekdays):
        v.add(f"{f}.weekdays", "must be 1 (Monday) to 7 (Sunday)")
    if any(not 1 <= day <= 31 for day in c.month_days):
        v.add(f"{f}.month_days", "must be 1 to 31")
    for name in ("start_minute", "end_minute"):
        if not 0 <= getattr(c, name) <= 1440:
            v.add(f"{f}.{name}", "must be 0 to 1440 minutes after midnight")
    if not 0 <= c.min_amount <= MAX_AMOUNT:
        v.add(f"{f}.min_amount", f"must be 0 to {MAX_AMOUNT}")
    return Conditions(
        start_ms=start_ms,
        end_ms=end_ms,
        company_ids=_ids(v, f"{f}.company_ids", c.company_ids),
        store_ids=_ids(v, f"{f}.store_ids", c.store_ids),
        region_ids=_ids(v, f"{f}.region_ids", c.region_ids),
        channels=channels,
        weekdays=frozenset(c.weekdays),
        month_days=frozenset(c.month_days),
        start_minute=c.start_minute,
        end_minute=c.end_minute,
        skus=_labels(v, f"{f}.skus", c.skus),
        categories=_labels(v, f"{f}.categories", c.categories),
        min_amount=c.min_amount,
        birthday_month=c.birthday_month,
        first_purchase=c.first_purchase,
        rank_ids=_ids(v, f"{f}.rank_ids", c.rank_ids),
    )


def _effect(v: Violations, f: str, e: pb.CampaignEffect) -> Effect:
    which = e.WhichOneof("effect")
    if which == "multiply_basis_points":
        if not 1 <= e.multiply_basis_points <= 1_000_000:
            v.add(f"{f}.multiply_basis_points", "must be 1 to 1,000,000 (100 times the base points)")
        return Effect("multiply", basis_points=e.multiply_basis_points)
    if which == "add_points":
        if not 1 <= e.add_points <= MAX_RATE_POINTS:
            v.add(f"{f}.add_points", f"must be 1 to {MAX_RATE_POINTS}")
        return Effect("add", points=e.add_points)
    if which == "coupon":
        offer = e.coupon
        if not 1 <= len(offer.display_name) <= MAX_NAME:
            v.add(f"{f}.coupon.display_name", f"must be 1 to {MAX_NAME} characters")
        if not 1 <= offer.valid_days <= 365:
            v.add(f"{f}.coupon.valid_days", "must be 1 to 365")
        return Effect("coupon", coupon_name=offer.display_name, valid_days=offer.valid_days)
    if which == "add_per_amount":
        per = e.add_per_amount
        if not 1 <= per.points <= MAX_RATE_POINTS:
            v.add(f"{f}.add_per_amount.points", f"must be 1 to {MAX_RATE_POINTS}")
        if not 1 <= per.per_amount <= MAX_PER_AMOUNT:
            v.add(f"{f}.add_per_amount.per_amount", f"must be 1 to {MAX_PER_AMOUNT}")
        return Effect("per_amount", points=per.points, per_amount=max(per.per_amount, 1))
    v.add(f, "is required: multiply_basis_points, add_points, add_per_amount or coupon")
    return Effect("add")


def rule_set_from(v: Violations, message: pb.RuleSet) -> RuleSet:
    if len(message.base_rates) > MAX_BASE_RATES:
        v.add("rule_set.base_rates", f"at most {MAX_BASE_RATES}")
    rates: list[tuple[str, str, Rate]] = []
    seen_rates: set[tuple[str, str]] = set()
    for i, r in enumerate(message.base_rates):
        f = f"rule_set.base_rates[{i}]"
        v.identifier(f"{f}.company_id", r.company_id)
        if r.store_id:
            v.identifier(f"{f}.store_id", r.store_id)
        if not 1 <= r.points <= MAX_RATE_POINTS:
            v.add(f"{f}.points", f"must be 1 to {MAX_RATE_POINTS}")
        if not 1 <= r.per_amount <= MAX_PER_AMOUNT:
            v.add(f"{f}.per_amount", f"must be 1 to {MAX_PER_AMOUNT}")
        if (r.company_id, r.store_id) in seen_rates:
            v.add(f, "a second rate for the same company and store")
        seen_rates.add((r.company_id, r.store_id))
        rates.append((r.company_id, r.store_id, Rate(r.points, max(r.per_amount, 1))))
    if len(message.campaigns) > MAX_CAMPAIGNS:
        v.add("rule_set.campaigns", f"at most {MAX_CAMPAIGNS}")
    campaigns: list[Campaign] = []
    seen: set[str] = set()
    for i, c in enumerate(message.campaigns):
        f = f"rule_set.campaigns[{i}]"
        v.identifier(f"{f}.campaign_id", c.campaign_id)
        if c.campaign_id in seen or c.campaign_id == "base":
            v.add(f"{f}.campaign_id", "must be unique in the rule set, and not 'base'")
        seen.add(c.campaign_id)
        if not 1 <= len(c.display_name) <= MAX_NAME:
            v.add(f"{f}.display_name", f"must be 1 to {MAX_NAME} characters")
        if c.lot_kind not in _KINDS:
            v.add(f"{f}.lot_kind", "must be LOT_KIND_REGULAR or LOT_KIND_LIMITED_TIME")
        if not 0 <= c.expire_days <= MAX_EXPIRE_DAYS:
            v.add(f"{f}.expire_days", f"must be 0 to {MAX_EXPIRE_DAYS}")
        for name in ("max_points_per_purchase", "max_points_per_member", "budget_points"):
            if not 0 <= getattr(c, name) <= MAX_AMOUNT:
                v.add(f"{f}.{name}", f"must be 0 to {MAX_AMOUNT}")
        if c.effect.WhichOneof("effect") == "coupon" and (c.budget_points or c.max_points_per_purchase):
            v.add(f"{f}.budget_points", "a coupon campaign takes no budget or per-purchase cap")
        campaigns.append(
            Campaign(
                campaign_id=c.campaign_id,
                name=c.display_name,
                order=c.order,
                conditions=_conditions(v, f"{f}.conditions", c.conditions),
                effect=_effect(v, f"{f}.effect", c.effect),
                lot_kind="L" if _KINDS.get(c.lot_kind) == "L" else "R",
                expire_days=c.expire_days,
                max_per_purchase=c.max_points_per_purchase,
                max_per_member=c.max_points_per_member,
                budget=c.budget_points,
            )
        )
    ranks = _ranks(v, message.ranks) if message.HasField("ranks") else None
    visits = _visits(v, message.visits, seen)
    known = {tier.rank_id for tier in ranks.tiers} if ranks is not None else set()
    for i, made in enumerate(campaigns):
        if not made.conditions.rank_ids <= known:
            v.add(f"rule_set.campaigns[{i}].conditions.rank_ids", "must be ranks of rule_set.ranks")
    for i, visit in enumerate(visits):
        if not visit.conditions.rank_ids <= known:
            v.add(f"rule_set.visits[{i}].conditions.rank_ids", "must be ranks of rule_set.ranks")
    receipt = _receipt(v, message.receipt) if message.HasField("receipt") else ReceiptTemplates()
    return RuleSet(
        version=0,
        base_rates=tuple(rates),
        campaigns=tuple(campaigns),
        ranks=ranks,
        visits=visits,
        receipt=receipt,
    )


_TEMPLATES = {
    "earned_template": "earned",
    "balance_template": "balance",
    "expiring_template": "expiring",
    "rank_template": "rank",
    "top_rank_template": "top_rank",
    "birthday_template": "birthday",
    "coupon_template": "coupon",
}


def _receipt(v: Violations, message: pb.ReceiptSettings) -> ReceiptTemplates:
    f = "rule_set.receipt"
    default = ReceiptTemplates()
    if not 0 <= message.expiring_within_days <= 365:
        v.add(f"{f}.expiring_within_days", "must be 0 (30) to 365")
    chosen: dict[str, str] = {}
    for proto_name, line in _TEMPLATES.items():
        template = getattr(message, proto_name)
        if not template:
            continue
        if len(template) > MAX_TEMPLATE:
            v.add(f"{f}.{proto_name}", f"must be at most {MAX_TEMPLATE} characters")
        unknown = unknown_placeholders(template, PLACEHOLDERS[line])
        if unknown:
            offered = ", ".join(f"${name}" for name in sorted(PLACEHOLDERS[line])) or "none"
            v.add(f"{f}.{proto_name}", f"unknown placeholders {sorted(unknown)}; this line offers {offered}")
        chosen[line] = template
    if len(message.base_name) > MAX_NAME:
        v.add(f"{f}.base_name", f"must be at most {MAX_NAME} characters")
    return ReceiptTemplates(
        expiring_within_days=message.expiring_within_days or default.expiring_within_days,
        earned=chosen.get("earned", default.earned),
        balance=chosen.get("balance", default.balance),
        expiring=chosen.get("expiring", default.expiring),
        rank=chosen.get("rank", default.rank),
        top_rank=chosen.get("top_rank", default.top_rank),
        birthday=chosen.get("birthday", default.birthday),
        coupon=chosen.get("coupon", default.coupon),
        base_name=message.base_name or default.base_name,
    )


def _visits(v: Violations, messages: Any, seen: set[str]) -> tuple[VisitRule, ...]:
    if len(messages) > MAX_VISIT_RULES:
        v.add("rule_set.visits", f"at most {MAX_VISIT_RULES}")
    rules: list[VisitRule] = []
    for i, r in enumerate(messages):
        f = f"rule_set.visits[{i}]"
        v.identifier(f"{f}.rule_id", r.rule_id)
        if r.rule_id in seen or r.rule_id == "base":
            v.add(f"{f}.rule_id", "must be unique among campaigns and visit rules, and not 'base'")
        seen.add(r.rule_id)
        if not 1 <= len(r.display_name) <= MAX_NAME:
            v.add(f"{f}.display_name", f"must be 1 to {MAX_NAME} characters")
        if not 1 <= r.points <= MAX_RATE_POINTS:
            v.add(f"{f}.points", f"must be 1 to {MAX_RATE_POINTS}")
        if not 0 <= r.expire_days <= MAX_EXPIRE_DAYS:
            v.add(f"{f}.expire_days", f"must be 0 to {MAX_EXPIRE_DAYS}")
        if r.lot_kind not in _KINDS:
            v.add(f"{f}.lot_kind", "must be LOT_KIND_REGULAR or LOT_KIND_LIMITED_TIME")
        if r.limit not in pb.VisitLimit.values():
            v.add(f"{f}.limit", "must be VISIT_LIMIT_PER_STORE_PER_DAY or VISIT_LIMIT_PER_DAY")
        c = r.conditions
        if c.skus or c.categories or c.min_amount or c.first_purchase:
            v.add(f"{f}.conditions", "a visit has no basket, amount or first purchase")
        rules.append(
            VisitRule(
                rule_id=r.rule_id,
                name=r.display_name,
                points=r.points,
                conditions=_conditions(v, f"{f}.conditions", c),
                limit="day" if r.limit == pb.VISIT_LIMIT_PER_DAY else "store_day",
                lot_kind="L" if _KINDS.get(r.lot_kind) == "L" else "R",
                expire_days=r.expire_days,
            )
        )
    return tuple(rules)


def _ranks(v: Violations, message: pb.RankProgram) -> RankProgram:
    f = "rule_set.ranks"
    if not 1 <= len(message.tiers) <= MAX_RANKS:
        v.add(f"{f}.tiers", f"1 to {MAX_RANKS} ranks")
    tiers: list[RankTier] = []
    for i, t in enumerate(message.tiers):
        v.identifier(f"{f}.tiers[{i}].rank_id", t.rank_id)
        if not 1 <= len(t.display_name) <= MAX_NAME:
            v.add(f"{f}.tiers[{i}].display_name", f"must be 1 to {MAX_NAME} characters")
        floor = tiers[-1].min_spend + 1 if tiers else 0
        if (i == 0 and t.min_spend != 0) or (i > 0 and not floor <= t.min_spend <= MAX_AMOUNT):
            v.add(f"{f}.tiers[{i}].min_spend", "must be 0 for the first rank, then ascending")
        if t.rank_id in {tier.rank_id for tier in tiers}:
            v.add(f"{f}.tiers[{i}].rank_id", "must be unique")
        tiers.append(RankTier(t.rank_id, t.display_name, t.min_spend))
    if not 1 <= message.period_months <= 36:
        v.add(f"{f}.period_months", "must be 1 to 36")
    downgrade: RankDowngrade = "to_spend" if message.downgrade == pb.RANK_DOWNGRADE_TO_SPEND else "one_step"
    return RankProgram(tuple(tiers), max(message.period_months, 1), downgrade)


def rule_set_message(rule_set: RuleSet) -> pb.RuleSet:
    message = pb.RuleSet(version=rule_set.version, publish_time=convert.timestamp(rule_set.published_ms))
    if rule_set.ranks is not None:
        program = rule_set.ranks
        message.ranks.period_months = program.period_months
        message.ranks.downgrade = (
            pb.RANK_DOWNGRADE_TO_SPEND if program.downgrade == "to_spend" else pb.RANK_DOWNGRADE_ONE_STEP
        )
        for tier in program.tiers:
            message.ranks.tiers.add(rank_id=tier.rank_id, display_name=tier.name, min_spend=tier.min_spend)
    t = rule_set.receipt
    message.receipt.CopyFrom(
        pb.ReceiptSettings(
            expiring_within_days=t.expiring_within_days,
            earned_template=t.earned,
            balance_template=t.balance,
            expiring_template=t.expiring,
            rank_template=t.rank,
            top_rank_template=t.top_rank,
            birthday_template=t.birthday,
            coupon_template=t.coupon,
            base_name=t.base_name,
        )
    )
    for visit in rule_set.visits:
        out_visit = message.visits.add(
            rule_id=visit.rule_id,
            display_name=visit.name,
            points=visit.points,
            limit=pb.VISIT_LIMIT_PER_DAY if visit.limit == "day" else pb.VISIT_LIMIT_PER_STORE_PER_DAY,
            lot_kind=_KIND_OUT[visit.lot_kind],
            expire_days=visit.expire_days,
        )
        _conditions_message(out_visit.conditions, visit.conditions)
    for company, store, rate in rule_set.base_rates:
        message.base_rates.add(company_id=company, store_id=store, points=rate.points, per_amount=rate.per_amount)
    for c in rule_set.campaigns:
        out = message.campaigns.add(
            campaign_id=c.campaign_id,
            display_name=c.name,
            order=c.order,
            lot_kind=_KIND_OUT[c.lot_kind],
            expire_days=c.expire_days,
            max_points_per_purchase=c.max_per_purchase,
            max_points_per_member=c.max_per_member,
            budget_points=c.budget,
        )
        _conditions_message(out.conditions, c.conditions)
        e = c.effect
        if e.kind == "coupon":
            out.effect.coupon.display_name, out.effect.coupon.valid_days = e.coupon_name, e.valid_days
        elif e.kind == "multiply":
            out.effect.multiply_basis_points = e.basis_points
        elif e.kind == "add":
            out.effect.add_points = e.points
        else:
            out.effect.add_per_amount.points, out.effect.add_per_amount.per_amount = e.points, e.per_amount
    return message


def _conditions_message(oc: pb.CampaignConditions, cond: Conditions) -> None:
    if cond.start_ms is not None:
        oc.start_time.CopyFrom(convert.timestamp(cond.start_ms))
    if cond.end_ms is not None:
        oc.end_time.CopyFrom(convert.timestamp(cond.end_ms))
    oc.company_ids.extend(sorted(cond.company_ids))
    oc.store_ids.extend(sorted(cond.store_ids))
    oc.region_ids.extend(sorted(cond.region_ids))
    oc.channels.extend(sorted(common_pb2.Channel.ValueType(ch) for ch in cond.channels))
    oc.weekdays.extend(sorted(cond.weekdays))
    oc.month_days.extend(sorted(cond.month_days))
    oc.start_minute, oc.end_minute, oc.min_amount = cond.start_minute, cond.end_minute, cond.min_amount
    oc.skus.extend(sorted(cond.skus))
    oc.categories.extend(sorted(cond.categories))
    oc.birthday_month, oc.first_purchase = cond.birthday_month, cond.first_purchase
    oc.rank_ids.extend(sorted(cond.rank_ids))


class RulesServicer(rules_service_pb2_grpc.RulesServiceServicer):
    def __init__(self, rules: RulesService) -> None:
        self.rules = rules

    async def PublishRuleSet(self, request: pb.PublishRuleSetRequest, context: Context) -> pb.PublishRuleSetResponse:
        v = Violations()
        rule_set = rule_set_from(v, request.rule_set)
        v.raise_if_any()
        return pb.PublishRuleSetResponse(rule_set=rule_set_message(await self.rules.publish(rule_set)))

    async def GetRuleSet(self, request: pb.GetRuleSetRequest, context: Context) -> pb.GetRuleSetResponse:
        v = Violations()
        if request.version < 0:
            v.add("version", "must be 0 (the current one) or a published version")
        v.raise_if_any()
        return pb.GetRuleSetResponse(rule_set=rule_set_message(await self.rules.get(request.version)))
