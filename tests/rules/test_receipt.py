"""The promotional receipt's lines, as pure functions: exact text for exact facts."""

from __future__ import annotations

from zoneinfo import ZoneInfo

from pointauth.server.domain.earning import (
    Campaign,
    Conditions,
    Effect,
    RankProgram,
    RankTier,
    ReceiptTemplates,
    RuleSet,
)
from pointauth.server.rules.receipt import PLACEHOLDERS, Facts, ReceiptLine, lines, unknown_placeholders

TOKYO = ZoneInfo("Asia/Tokyo")
NOW = 1_795_000_000_000  # 2026-11-18 in Tokyo
DEC_1_TOKYO = 1_796_050_800_000  # 2026-12-01 00:00 JST: points good through 2026-11-30
RANKS = RankProgram((RankTier("regular", "Regular", 0), RankTier("gold", "Gold", 200_000)))
RULES = RuleSet(
    version=3,
    campaigns=(Campaign("x2", "Double", 0, Conditions(), Effect("multiply", basis_points=10_000)),),
    ranks=RANKS,
)


def facts(**changes: object) -> Facts:
    base: dict[str, object] = {
        "earned": (("base", 12), ("x2", 12)),
        "available": 1_024,
        "expiring": ((DEC_1_TOKYO, 100), (DEC_1_TOKYO, 20), (DEC_1_TOKYO + 86_400_000, 5)),
        "birthday": "1103",
        "rank_id": "regular",
        "spend": 150_000,
    }
    base.update(changes)
    return Facts(**base)  # type: ignore[arg-type]


def test_every_line_with_the_default_words() -> None:
    assert lines(RULES, facts(), TOKYO, NOW) == [
        ReceiptLine("earned", "Points: 12 pt"),
        ReceiptLine("earned", "Double: 12 pt"),
        ReceiptLine("balance", "Balance: 1024 pt"),
        ReceiptLine("expiring", "120 pt expire on 2026-11-30"),
        ReceiptLine("expiring", "5 pt expire on 2026-12-01"),
        ReceiptLine("rank", "Regular: 50000 more to Gold"),
        ReceiptLine("birthday", "Happy birthday!"),
    ]


def test_a_rule_set_says_it_its_own_way() -> None:
    words = ReceiptTemplates(
        earned="$name $points ポイント",
        balance="残高 $points ポイント",
        expiring="$date まで $points ポイント",
        top_rank="$rank 会員",
        birthday="お誕生日おめでとうございます",
        base_name="通常ポイント",
    )
    rules = RuleSet(version=4, ranks=RANKS, receipt=words)
    assert lines(rules, facts(earned=(("base", 7),), expiring=(), rank_id="gold", birthday="0704"), TOKYO, NOW) == [
        ReceiptLine("earned", "通常ポイント 7 ポイント"),
        ReceiptLine("balance", "残高 1024 ポイント"),
        ReceiptLine("rank", "Gold 会員"),
    ]


def test_rules_that_gave_nothing_and_members_without_rank_print_nothing() -> None:
    assert lines(
        RuleSet(version=1), facts(earned=(("base", 0),), expiring=(), rank_id="", birthday=""), TOKYO, NOW
    ) == [
        ReceiptLine("balance", "Balance: 1024 pt"),
    ]


def test_templates_may_use_only_their_lines_placeholders() -> None:
    assert unknown_placeholders("$name: $points pt", PLACEHOLDERS["earned"]) == set()
    assert unknown_placeholders("${points} on $when", PLACEHOLDERS["expiring"]) == {"when"}
    assert unknown_placeholders("cost $5", PLACEHOLDERS["balance"]) == {"$"}
    assert unknown_placeholders("$$ saved", PLACEHOLDERS["birthday"]) == set()
