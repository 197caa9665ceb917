"""The earn rules as pure functions: a table of purchases and rule sets with the exact points
each rule gives."""

from __future__ import annotations

import pytest

from pointauth.server.domain.earning import (
    BasketLine,
    Campaign,
    Conditions,
    EarnLine,
    Effect,
    Purchase,
    Rate,
    RuleSet,
)
from pointauth.server.rules.engine import evaluate

T = 1_795_000_000_000  # the purchase's instant
DAY = 86_400_000
BASE_EXPIRY = T + 365 * DAY
DEFAULT = Rate(1, 100)


def purchase(amount: int = 12_345, lines: tuple[BasketLine, ...] = (), **where: object) -> Purchase:
    fields: dict[str, object] = {
        "company_id": "acme",
        "store_id": "store-1",
        "region_id": "kanto",
        "channel": 1,
        "time_ms": T,
        "month": 11,
        "month_day": 25,
        "weekday": 3,
        "minute": 10 * 60 + 30,
    }
    fields.update(where)
    return Purchase(amount=amount, lines=lines, **fields)  # type: ignore[arg-type]


def campaign(cid: str, effect: Effect, order: int = 0, **kw: object) -> Campaign:
    conditions = kw.pop("conditions", Conditions())
    return Campaign(cid, cid, order, conditions, effect, **kw)  # type: ignore[arg-type]


def rules(*campaigns: Campaign, rates: tuple[tuple[str, str, Rate], ...] = ()) -> RuleSet:
    return RuleSet(version=1, base_rates=rates, campaigns=campaigns)


def points(lines: list[EarnLine]) -> list[tuple[str, int]]:
    return [(line.rule, line.points) for line in lines]


BASKET = (
    BasketLine("sku-coffee", "drinks", 2, 600),
    BasketLine("sku-bread", "bakery", 1, 350),
    BasketLine("sku-gift", "gift-cards", 1, 5_000, earns=False),
    BasketLine("sku-tea", "drinks", 1, 4_050),
)

CASES = [
    # (name, rule set, purchase, expected (rule, points) lines)
    ("base rate rounds down once per purchase", rules(), purchase(12_399), [("base", 123)]),
    ("nothing below the rate's amount", rules(), purchase(99), [("base", 0)]),
    (
        "a store's rate beats its company's",
        rules(rates=(("acme", "", Rate(2, 100)), ("acme", "store-1", Rate(3, 100)))),
        purchase(1_000),
        [("base", 30)],
    ),
    (
        "a company's rate beats the program's",
        rules(rates=(("acme", "", Rate(2, 100)),)),
        purchase(1_000),
        [("base", 20)],
    ),
    ("non-earning lines earn nothing", rules(), purchase(10_000, BASKET), [("base", 50)]),
    (
        "double points: as many again as the base",
        rules(campaign("x2", Effect("multiply", basis_points=10_000))),
        purchase(12_399),
        [("base", 123), ("x2", 123)],
    ),
    (
        "a multiplier on a category counts only its lines' base points",
        rules(
            campaign(
                "drinks",
                Effect("multiply", basis_points=20_000),
                conditions=Conditions(categories=frozenset({"drinks"})),
            )
        ),
        purchase(10_000, BASKET),
        [("base", 50), ("drinks", 92)],  # (600 + 4,050) // 100 = 46 base points on drinks, × 2
    ),
    (
        "per amount on a sku",
        rules(
            campaign(
                "tea",
                Effect("per_amount", points=5, per_amount=1_000),
                conditions=Conditions(skus=frozenset({"sku-tea"})),
            )
        ),
        purchase(10_000, BASKET),
        [("base", 50), ("tea", 20)],  # 4,050 * 5 // 1,000
    ),
    (
        "multipliers first, then additions, each by order",
        rules(
            campaign("bonus", Effect("add", points=100), order=1),
            campaign("x3", Effect("multiply", basis_points=20_000), order=2),
            campaign("first", Effect("add", points=10), order=0),
        ),
        purchase(1_000),
        [("base", 10), ("x3", 20), ("first", 10), ("bonus", 100)],
    ),
    (
        "a per-purchase cap",
        rules(campaign("x10", Effect("multiply", basis_points=90_000), max_per_purchase=500)),
        purchase(100_000),
        [("base", 1000), ("x10", 500)],
    ),
    (
        "the 5th, 15th and 25th",
        rules(
            campaign(
                "days",
                Effect("multiply", basis_points=20_000),
                conditions=Conditions(month_days=frozenset({5, 15, 25})),
            )
        ),
        purchase(1_000),
        [("base", 10), ("days", 20)],
    ),
    (
        "not on another weekday",
        rules(campaign("sunday", Effect("add", points=50), conditions=Conditions(weekdays=frozenset({7})))),
        purchase(1_000),
        [("base", 10)],
    ),
    (
        "a time window that wraps past midnight",
        rules(
            campaign("night", Effect("add", points=5), conditions=Conditions(start_minute=22 * 60, end_minute=2 * 60))
        ),
        purchase(1_000, minute=23 * 60),
        [("base", 10), ("night", 5)],
    ),
    (
        "outside the time window",
        rules(
            campaign("morning", Effect("add", points=5), conditions=Conditions(start_minute=6 * 60, end_minute=10 * 60))
        ),
        purchase(1_000),
        [("base", 10)],
    ),
    (
        "region and channel",
        rules(
            campaign(
                "kanto-app",
                Effect("add", points=7),
                conditions=Conditions(region_ids=frozenset({"kanto"}), channels=frozenset({3})),
            )
        ),
        purchase(1_000, channel=3),
        [("base", 10), ("kanto-app", 7)],
    ),
    (
        "a spend threshold on the earning amount",
        rules(campaign("5000", Effect("add", points=100), conditions=Conditions(min_amount=5_000))),
        purchase(10_000, BASKET),  # earning amount 5,000 (the gift card does not count)
        [("base", 50), ("5000", 100)],
    ),
    (
        "before the campaign starts",
        rules(campaign("later", Effect("add", points=100), conditions=Conditions(start_ms=T + 1))),
        purchase(1_000),
        [("base", 10)],
    ),
    (
        "its end is exclusive",
        rules(campaign("over", Effect("add", points=100), conditions=Conditions(end_ms=T))),
        purchase(1_000),
        [("base", 10)],
    ),
]


@pytest.mark.parametrize(("name", "rule_set", "bought", "expected"), CASES, ids=[c[0] for c in CASES])
def test_rule_scenarios(name: str, rule_set: RuleSet, bought: Purchase, expected: list[tuple[str, int]]) -> None:
    assert points(evaluate(rule_set, bought, DEFAULT, BASE_EXPIRY)) == expected


def test_each_line_says_where_its_points_go_and_what_the_member_must_allow() -> None:
    rule_set = rules(
        campaign(
            "birthday",
            Effect("add", points=300),
            conditions=Conditions(birthday_month=True),
            lot_kind="L",
            expire_days=30,
            max_per_member=600,
            budget=10_000,
        ),
        campaign("welcome", Effect("add", points=500), conditions=Conditions(first_purchase=True)),
    )
    base, birthday, welcome = evaluate(rule_set, purchase(1_000), DEFAULT, BASE_EXPIRY)
    assert base == EarnLine("base", 10, "R", BASE_EXPIRY)
    assert birthday == EarnLine("birthday", 300, "L", T + 30 * DAY, birthday_month=11, member_cap=600, budget=10_000)
    assert welcome == EarnLine("welcome", 500, "R", BASE_EXPIRY, first_purchase=True)


def test_a_coupon_campaign_gives_one_coupon_valid_for_its_days_and_no_points() -> None:
    offer = Effect("coupon", coupon_name="10% off", valid_days=30)
    rule_set = rules(campaign("thanks", offer, max_per_member=2, conditions=Conditions(min_amount=5_000)))
    assert evaluate(rule_set, purchase(4_999), DEFAULT, BASE_EXPIRY) == [EarnLine("base", 49, "R", BASE_EXPIRY)]
    assert evaluate(rule_set, purchase(5_000), DEFAULT, BASE_EXPIRY) == [
        EarnLine("base", 50, "R", BASE_EXPIRY),
        EarnLine("thanks", 1, "R", T + 30 * DAY, member_cap=2, coupon=True),
    ]
