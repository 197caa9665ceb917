"""Settlement's pure rules: periods in the program's time zone, point values, and netting with
its one rounding."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from pointauth.server.domain.settlement import PairLine, Payment, Period, PointValue, payments, yen_of_hundredths

TOKYO = "Asia/Tokyo"


@pytest.mark.parametrize(
    ("name", "starts", "ends"),
    [
        ("2026-11", "2026-10-31T15:00:00+00:00", "2026-11-30T15:00:00+00:00"),
        ("2026-12", "2026-11-30T15:00:00+00:00", "2026-12-31T15:00:00+00:00"),
        ("2028-02", "2028-01-31T15:00:00+00:00", "2028-02-29T15:00:00+00:00"),  # a leap year
    ],
)
def test_a_period_is_a_calendar_month_in_the_programs_time_zone(name: str, starts: str, ends: str) -> None:
    period = Period.parse(name, TOKYO)
    assert period.starts.astimezone(UTC).isoformat() == starts
    assert period.ends.astimezone(UTC).isoformat() == ends


def test_a_time_belongs_to_the_period_of_its_local_date() -> None:
    # 15:00 UTC on November 30 is already December 1 in Tokyo.
    assert Period.of(datetime(2026, 11, 30, 14, 59, 59, tzinfo=UTC), TOKYO).name == "2026-11"
    assert Period.of(datetime(2026, 11, 30, 15, 0, 0, tzinfo=UTC), TOKYO).name == "2026-12"
    assert Period.of(datetime(2026, 11, 30, 15, 0, 0, tzinfo=UTC), "UTC").name == "2026-11"


@pytest.mark.parametrize("name", ["2026-13", "2026-00", "2026-1", "26-11", "2026/11", "", "1999-12", " 2026-11"])
def test_a_period_must_be_a_month_as_yyyy_mm(name: str) -> None:
    with pytest.raises(ValueError, match="YYYY-MM"):
        Period.parse(name, TOKYO)


def test_point_values_are_yen_per_point_or_per_100_points() -> None:
    assert PointValue(1, 1).hundredths(7) == 700
    assert PointValue(50, 100).hundredths(151) == 7550
    assert str(PointValue(50, 100)) == "50 yen per 100 points"
    for bad in ((1, 10), (-1, 1), (1_000_001, 1)):
        with pytest.raises(ValueError, match="point value"):
            PointValue(*bad)


def test_rounding_is_half_up_to_whole_yen() -> None:
    assert [yen_of_hundredths(h) for h in (0, 49, 50, 149, 150, 7550)] == [0, 0, 1, 1, 2, 76]


def pair(issuer: str, company: str, used: int, refunded: int = 0) -> PairLine:
    return PairLine(issuer, company, used, refunded)


def test_each_pair_of_companies_nets_into_one_payment() -> None:
    # The domain's example: A's points spent for 300 at B, B's for 120 at A: A pays B 180.
    assert payments([pair("A", "B", 300), pair("B", "A", 120)], {}) == [Payment("A", "B", 180)]
    # Refunds lower a direction; a direction may go below zero (refunds of an earlier period).
    assert payments([pair("A", "B", 300, 50), pair("B", "A", 0, 400)], {}) == [Payment("A", "B", 650)]
    # Equal debts, and a company's own points used at its own stores, owe nothing.
    assert payments([pair("A", "B", 100), pair("B", "A", 100), pair("C", "C", 500)], {}) == []
    # Three companies: one payment per pair, in order.
    assert payments([pair("A", "B", 10), pair("C", "A", 20), pair("B", "C", 5)], {}) == [
        Payment("A", "B", 10),
        Payment("C", "A", 20),
        Payment("B", "C", 5),
    ]


def test_directions_are_valued_at_their_issuers_point_value_netted_then_rounded_once() -> None:
    values = {"A": PointValue(1, 1), "C": PointValue(50, 100), "D": PointValue(3, 100)}
    # C owes A 151 x 0.5 = 75.5 yen: rounded half up, 76.
    assert payments([pair("C", "A", 151)], values) == [Payment("C", "A", 76)]
    # C owes A 75.5, A owes C 75: netted first (0.5 yen), then rounded: 1 yen, not 76 - 75.
    assert payments([pair("C", "A", 151), pair("A", "C", 75)], values) == [Payment("C", "A", 1)]
    # D's 49 points at 3 yen per 100 are 1.47 yen: 1 yen; 16 points are 0.48 yen: no payment.
    assert payments([pair("D", "A", 49)], values) == [Payment("D", "A", 1)]
    assert payments([pair("D", "A", 16)], values) == []
