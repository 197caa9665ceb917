"""The earn_rules scenario's rule set and baskets, checked without a server: the rule set passes
PublishRuleSet's checks, has every kind of campaign the scenario promises, and every campaign of
ALWAYS gives points at the load's point of sale whatever the basket, the day and the time."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from loadtest import earn_rules
from loadtest.driver import POS
from pointauth.server.api.rules import rule_set_from
from pointauth.server.api.validation import Violations
from pointauth.server.config import EarnSettings
from pointauth.server.domain.earning import BasketLine, Purchase, Rate
from pointauth.server.ops.seed_group import SeedGroup
from pointauth.server.rules.earn_policy import EarnPolicy
from pointauth.server.rules.engine import evaluate
from pointauth.v1 import common_pb2

NOW_S = int(datetime(2026, 4, 1, tzinfo=UTC).timestamp())


def test_the_rule_set_is_valid_and_has_every_kind_of_campaign() -> None:
    group = SeedGroup()
    message = earn_rules.rule_set(group, NOW_S)
    violations = Violations()
    rule_set_from(violations, message)
    assert violations.items == []
    assert len(message.campaigns) == 20
    assert {rate.company_id for rate in message.base_rates if not rate.store_id} == {
        group.company_id(c) for c in range(group.companies)
    }
    campaigns = list(message.campaigns)
    kinds = {c.effect.WhichOneof("effect") for c in campaigns}
    assert kinds == {"multiply_basis_points", "add_points", "add_per_amount"}
    assert sum(1 for c in campaigns if c.max_points_per_member) == 3
    assert [c.budget_points for c in campaigns if c.budget_points] == [10**12, 10**12]
    limited = [c for c in campaigns if c.lot_kind == common_pb2.LOT_KIND_LIMITED_TIME]
    assert len(limited) >= 2
    assert all(c.expire_days for c in limited)
    conditions = [c.conditions for c in campaigns]
    assert any(c.weekdays for c in conditions)
    assert any(c.categories for c in conditions)
    assert any(c.skus for c in conditions)
    assert any(c.min_amount for c in conditions)
    assert any(c.start_minute != c.end_minute for c in conditions)
    assert any(c.region_ids and c.channels for c in conditions)
    assert any(c.HasField("start_time") and c.HasField("end_time") for c in conditions)
    assert {c.campaign_id for c in campaigns} >= earn_rules.ALWAYS


def test_every_basket_has_five_lines_one_not_earning() -> None:
    rng = random.Random(1)
    for _ in range(500):
        basket = earn_rules.basket(rng)
        assert len(basket) == 5
        assert [line.non_earning for line in basket] == [False, False, False, False, True]
        assert all(line.quantity >= 1 and line.amount > 0 for line in basket)


def test_the_campaigns_that_always_apply_give_points_at_the_loads_store_at_any_time() -> None:
    group = SeedGroup()
    rules = rule_set_from(Violations(), earn_rules.rule_set(group, NOW_S))
    policy = EarnPolicy(EarnSettings())
    region = group.store(0).region_id
    assert (POS.company_id, POS.store_id) == (group.company_id(0), group.store(0).store_id)
    rng = random.Random(2)
    start = datetime.fromtimestamp(NOW_S, tz=UTC)
    seen: set[str] = set()
    for hour in range(0, 24 * 31, 5):  # every weekday, day of the month and time of day
        local = policy.local_time(int((start + timedelta(hours=hour, minutes=hour % 60)).timestamp() * 1000))
        basket = earn_rules.basket(rng)
        lines = tuple(BasketLine(b.sku, b.category, b.quantity, b.amount, earns=not b.non_earning) for b in basket)
        purchase = Purchase(
            amount=sum(b.amount for b in basket),
            lines=lines,
            company_id=POS.company_id,
            store_id=POS.store_id,
            region_id=region,
            channel=POS.channel,
            time_ms=int(local.timestamp() * 1000),
            month=local.month,
            month_day=local.day,
            weekday=local.isoweekday(),
            minute=local.hour * 60 + local.minute,
        )
        earned = evaluate(rules, purchase, Rate(1, 100), purchase.time_ms + 1)
        assert earned[0].rule == "base"
        assert earned[0].points == sum(b.amount for b in basket if not b.non_earning) // 100  # the flat rate
        given = {line.rule for line in earned[1:] if line.points > 0}
        assert given >= earn_rules.ALWAYS, sorted(earn_rules.ALWAYS - given)
        seen |= given
    # The others apply some of the time (weekdays, days, hours, the spend threshold), except the
    # app's campaign, which never does in store.
    names = {c.campaign_id for c in earn_rules.rule_set(group, NOW_S).campaigns}
    assert names - seen == {"app-only"}
