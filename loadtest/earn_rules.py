"""The `earn_rules` scenario's rule set and baskets: EarnPoints as a chain runs it, with base rates
for the seeded group's companies (and a few flagship stores) and 20 live campaigns of every kind,
on a 5-line basket (four earning lines the campaigns pick, one that never earns).

The campaigns, by kind (`ALWAYS` names those in every earn_rules answer's breakdown):
- multipliers by weekday (weekend, Tuesday), by day of the month (5, 10, ..., 30), by category
  (drinks, deli) and on the whole purchase at the seeded issuer's company (with a budget);
- additions per SKU (drinks, household) and per amount (snacks, household);
- a spend threshold, two local time windows (afternoon, late night, past midnight);
- region and channel: one for the load's store's region in store, one for the app only;
- limited-time lots with their own expiry, two of them with a campaign period;
- 3 with a per-member cap (a capped member's line stays, at 0 points, noted "member_cap"), 2 with
  a budget (10^12 points: never runs out in a bench);
- a birthday-month one and a welcome one (first purchase), which the member decides: their lines
  are always there, at 0 points with a note when the member does not qualify.
"""

from __future__ import annotations

import random

from google.protobuf.timestamp_pb2 import Timestamp

from pointauth.server.ops.seed_group import REGIONS, SeedGroup
from pointauth.v1 import common_pb2
from pointauth.v1 import points_service_pb2 as pb
from pointauth.v1 import rules_service_pb2 as rpb

BUDGET = 10**12
"""Each budget campaign's points: far more than any bench gives."""
DAY_S = 86_400

# (sku, unit price in yen): prices keep every campaign in ALWAYS above 0 points at 1 point per
# 100 yen (the load's store's rate), however few of each the basket holds.
DRINKS = (("sku-coffee", 150), ("sku-green-tea", 140), ("sku-water", 110))
SNACKS = (("sku-rice-cracker", 220), ("sku-chocolate", 180))
DELI = (("sku-bento", 520), ("sku-onigiri-set", 240))
HOUSEHOLD = (("sku-detergent", 380), ("sku-tissues", 300))
NON_EARNING = (("sku-gift-card-1000", "gift-cards", 1000), ("sku-stamp-110", "postage", 110))

ALWAYS = frozenset(
    {
        "drinks-x2",
        "deli-half-again",
        "anniversary-x1_5",
        "drinks-sku-bonus",
        "household-sku-bonus",
        "snacks-per-amount",
        "household-per-amount",
        "region-in-store",
        "spring-limited",
        "snacks-limited-x2",
        "grand-opening",
        "birthday-month",
        "welcome",
    }
)
"""The campaigns in every answer's breakdown at the load's point of sale (driver.POS), whatever
the day, the time and the basket: the driver counts an answer without one of them as an error."""


def _campaign(campaign_id: str, name: str, order: int, **fields: object) -> rpb.Campaign:
    return rpb.Campaign(campaign_id=campaign_id, display_name=name, order=order, **fields)  # type: ignore[arg-type]


def _when(**fields: object) -> rpb.CampaignConditions:
    return rpb.CampaignConditions(**fields)  # type: ignore[arg-type]


def _multiply(basis_points: int) -> rpb.CampaignEffect:
    return rpb.CampaignEffect(multiply_basis_points=basis_points)


def _add(points: int) -> rpb.CampaignEffect:
    return rpb.CampaignEffect(add_points=points)


def _per_amount(points: int, per_amount: int) -> rpb.CampaignEffect:
    return rpb.CampaignEffect(add_per_amount=rpb.PerAmount(points=points, per_amount=per_amount))


def rule_set(group: SeedGroup, now_s: int) -> rpb.RuleSet:
    """The rule set the bench publishes: `group`'s companies and stores; campaign periods run from
    a day before `now_s` (epoch seconds) to a year after it."""
    company, store = group.company_id(0), group.store(0)  # the load's point of sale (driver.POS)
    period = {"start_time": Timestamp(seconds=now_s - DAY_S), "end_time": Timestamp(seconds=now_s + 365 * DAY_S)}
    limited = common_pb2.LOT_KIND_LIMITED_TIME
    # Company c earns 1 point per 100 yen (c even) or per 200 (c odd); the first stores after the
    # load's own (flagships) 2 per 100. The load's store keeps its company's rate, the flat earn's.
    base_rates = [
        rpb.BaseRate(company_id=group.company_id(c), points=1, per_amount=100 if c % 2 == 0 else 200)
        for c in range(group.companies)
    ]
    base_rates += [
        rpb.BaseRate(company_id=s.company_id, store_id=s.store_id, points=2, per_amount=100)
        for s in (group.store(n) for n in range(1, min(group.stores, 6)))
    ]
    other_region = REGIONS[(REGIONS.index(store.region_id) + 1) % len(REGIONS)]
    campaigns = [
        # Multipliers: extra points on the base points of what they cover.
        _campaign(
            "weekend-x2", "Weekend double points", 10, conditions=_when(weekdays=[6, 7]), effect=_multiply(10_000)
        ),
        _campaign(
            "tuesday-x3",
            "Tuesday market triple points",
            11,
            conditions=_when(weekdays=[2]),
            effect=_multiply(20_000),
            max_points_per_purchase=500,
        ),
        _campaign(
            "five-ten-days",
            "Days of 5 and 0: double points",
            12,
            conditions=_when(month_days=[5, 10, 15, 20, 25, 30]),
            effect=_multiply(10_000),
        ),
        _campaign(
            "drinks-x2",
            "Drinks double points",
            20,
            conditions=_when(categories=["drinks"]),
            effect=_multiply(10_000),
            max_points_per_member=1_000,
        ),
        _campaign(
            "deli-half-again", "Deli 1.5x points", 21, conditions=_when(categories=["deli"]), effect=_multiply(5_000)
        ),
        _campaign(
            "snacks-limited-x2",
            "Snacks double points (limited-time)",
            22,
            conditions=_when(categories=["snacks"]),
            effect=_multiply(10_000),
            lot_kind=limited,
            expire_days=30,
            max_points_per_member=300,
        ),
        _campaign(
            "anniversary-x1_5",
            "Anniversary 1.5x points",
            30,
            conditions=_when(company_ids=[company], **period),
            effect=_multiply(5_000),
            budget_points=BUDGET,
        ),
        # Additions: fixed points, or points per amount of what they cover.
        _campaign(
            "drinks-sku-bonus",
            "Featured drinks bonus",
            40,
            conditions=_when(skus=[sku for sku, _ in DRINKS]),
            effect=_add(20),
        ),
        _campaign(
            "household-sku-bonus",
            "Household essentials bonus",
            41,
            conditions=_when(skus=[sku for sku, _ in HOUSEHOLD]),
            effect=_add(50),
            max_points_per_member=500,
        ),
        _campaign(
            "snacks-per-amount",
            "Snacks +3 per 100 yen",
            42,
            conditions=_when(categories=["snacks"]),
            effect=_per_amount(3, 100),
        ),
        _campaign(
            "household-per-amount",
            "Household +1 per 100 yen",
            43,
            conditions=_when(categories=["household"]),
            effect=_per_amount(1, 100),
        ),
        _campaign(
            "spend-2000", "Spend 2,000 yen: 100 points", 50, conditions=_when(min_amount=2_000), effect=_add(100)
        ),
        _campaign(
            "afternoon",
            "Afternoon +1 per 100 yen",
            51,
            conditions=_when(start_minute=15 * 60, end_minute=18 * 60),
            effect=_per_amount(1, 100),
        ),
        _campaign(
            "late-night",
            "Late night bonus",
            52,
            conditions=_when(start_minute=22 * 60, end_minute=5 * 60),
            effect=_add(10),
        ),
        _campaign(
            "region-in-store",
            "Regional fair, in store",
            60,
            conditions=_when(region_ids=[store.region_id, other_region], channels=[common_pb2.CHANNEL_STORE]),
            effect=_add(15),
        ),
        _campaign(
            "app-only", "App orders bonus", 61, conditions=_when(channels=[common_pb2.CHANNEL_APP]), effect=_add(30)
        ),
        _campaign(
            "spring-limited",
            "Spring limited-time points",
            70,
            conditions=_when(**period),
            effect=_add(100),
            lot_kind=limited,
            expire_days=60,
        ),
        _campaign(
            "grand-opening",
            "Grand opening (limited-time)",
            71,
            conditions=_when(store_ids=[group.store(n).store_id for n in range(min(group.stores, 10))], **period),
            effect=_add(30),
            lot_kind=limited,
            expire_days=90,
            budget_points=BUDGET,
        ),
        _campaign("birthday-month", "Birthday month", 80, conditions=_when(birthday_month=True), effect=_add(200)),
        _campaign("welcome", "Welcome: first purchase", 81, conditions=_when(first_purchase=True), effect=_add(500)),
    ]
    return rpb.RuleSet(base_rates=base_rates, campaigns=campaigns)


def basket(rng: random.Random) -> list[pb.BasketLine]:
    """Drinks, snacks, a deli item and a household item, and a gift card or stamps, which never
    earn: 5 lines, 940 to 3,530 yen in all (830 to 2,530 of it earning)."""
    lines = []
    for category, products, most in (("drinks", DRINKS, 3), ("snacks", SNACKS, 3), ("deli", DELI, 2)):
        sku, price = rng.choice(products)
        quantity = rng.randint(1, most)
        lines.append(pb.BasketLine(sku=sku, category=category, quantity=quantity, amount=price * quantity))
    sku, price = rng.choice(HOUSEHOLD)
    lines.append(pb.BasketLine(sku=sku, category="household", quantity=1, amount=price))
    sku, category, price = rng.choice(NON_EARNING)
    quantity = 1 if price >= 1000 else rng.randint(1, 5)
    lines.append(
        pb.BasketLine(sku=sku, category=category, quantity=quantity, amount=price * quantity, non_earning=True)
    )
    return lines


def check(answer: pb.EarnPointsResponse) -> str:
    """Why an earn_rules answer is wrong ("" if it is not): it must come under a rule set, with
    the base line first, every campaign of ALWAYS, and a breakdown that adds up."""
    if answer.rule_set_version <= 0:
        return "EarnPoints answered without a rule set (rule_set_version 0)"
    rules = [line.rule_id for line in answer.breakdown]
    if not rules or rules[0] != "base":
        return f"the breakdown does not start with the base line: {rules}"
    missing = ALWAYS.difference(rules)
    if missing:
        return f"the breakdown lacks campaigns that always apply: {sorted(missing)}"
    if sum(line.points for line in answer.breakdown) != answer.earned_points:
        return f"the breakdown does not add up to the {answer.earned_points} points earned"
    return ""
