"""The base earn rate and the three lot-expiry policies: pure arithmetic, no I/O. Every expected
expiry is worked out by hand and written as a literal instant."""

from __future__ import annotations

from datetime import datetime

import pytest

from pointauth.server.config import EarnSettings, ExpirySettings
from pointauth.server.rules.earn_policy import EarnPolicy


def ms(iso: str) -> int:
    """Milliseconds since the epoch of an ISO 8601 instant with its offset."""
    stamp = datetime.fromisoformat(iso)
    assert stamp.utcoffset() is not None, iso
    return int(stamp.timestamp()) * 1000 + stamp.microsecond // 1000


def policy(
    mode: str = "end_of_month", *, days: int = 365, months: int = 12, years: int = 1, timezone: str = "Asia/Tokyo"
) -> EarnPolicy:
    expiry = ExpirySettings(policy=mode, days=days, months=months, years=years)  # type: ignore[arg-type]
    return EarnPolicy(EarnSettings(expiry=expiry, timezone=timezone))


# --- points_for -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "points"),
    [(0, 0), (1, 0), (99, 0), (100, 1), (101, 1), (199, 1), (200, 2), (12_345, 123), (10**15, 10**13)],
)
def test_default_rate_is_one_point_per_100_rounded_down(amount: int, points: int) -> None:
    assert EarnPolicy(EarnSettings()).points_for(amount) == points


@pytest.mark.parametrize(
    ("rate_points", "rate_amount", "amount", "points"),
    [
        (3, 200, 66, 0),  # 198 / 200
        (3, 200, 67, 1),  # 201 / 200
        (3, 200, 199, 2),  # 597 / 200 = 2.985
        (3, 200, 200, 3),
        (5, 1, 7, 35),
        (1, 1, 10**15, 10**15),
        (7, 3, 10**15, 2_333_333_333_333_333),  # exact in integers; a double would round it
    ],
)
def test_configured_rate_rounds_down_in_exact_integers(
    rate_points: int, rate_amount: int, amount: int, points: int
) -> None:
    earn = EarnPolicy(EarnSettings(rate_points=rate_points, rate_amount=rate_amount))
    assert earn.points_for(amount) == points


def test_purchase_time_skew_is_in_milliseconds() -> None:
    assert EarnPolicy(EarnSettings()).purchase_time_skew_ms == 300_000
    assert EarnPolicy(EarnSettings(purchase_time_skew_seconds=0)).purchase_time_skew_ms == 0


# --- expire_ms: days --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("days", "earned", "expires"),
    [
        (1, "2026-05-10T08:15:30.123+00:00", "2026-05-11T08:15:30.123+00:00"),  # to the millisecond
        (30, "2026-12-31T15:30:00+00:00", "2027-01-30T15:30:00+00:00"),  # Dec -> Jan
        (1, "2028-02-28T12:00:00+00:00", "2028-02-29T12:00:00+00:00"),  # onto a leap day
        (365, "2027-03-01T00:00:00+00:00", "2028-02-29T00:00:00+00:00"),  # 366 days to 2028-03-01
        (365, "2028-02-28T00:00:00+00:00", "2029-02-27T00:00:00+00:00"),  # across 2028-02-29
        (366, "2028-01-01T00:00:00+00:00", "2029-01-01T00:00:00+00:00"),
        (36_500, "2026-01-01T00:00:00+00:00", "2125-12-08T00:00:00+00:00"),  # 24 leap days in between (2100 is none)
    ],
)
def test_days_policy_adds_whole_days_to_the_instant(days: int, earned: str, expires: str) -> None:
    assert policy("days", days=days).expire_ms(ms(earned)) == ms(expires)


def test_days_policy_ignores_the_time_zone() -> None:
    earned = ms("2026-12-31T15:30:00+00:00")  # 2027-01-01 00:30 in Tokyo
    assert policy("days", days=10, timezone="Asia/Tokyo").expire_ms(earned) == ms("2027-01-10T15:30:00+00:00")
    assert policy("days", days=10, timezone="UTC").expire_ms(earned) == ms("2027-01-10T15:30:00+00:00")


# --- expire_ms: end_of_month ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("months", "earned", "expires"),
    [
        # The default: the end of the month 12 months after the purchase's month.
        (12, "2026-01-15T03:00:00+00:00", "2027-02-01T00:00:00+09:00"),
        # The last millisecond of January in Tokyo, then the first of February.
        (12, "2026-01-31T14:59:59.999+00:00", "2027-02-01T00:00:00+09:00"),
        (12, "2026-01-31T15:00:00+00:00", "2027-03-01T00:00:00+09:00"),
        # Month arithmetic across the year end.
        (1, "2026-11-20T00:00:00+00:00", "2027-01-01T00:00:00+09:00"),  # Nov + 1 = Dec
        (1, "2026-12-10T00:00:00+00:00", "2027-02-01T00:00:00+09:00"),  # Dec + 1 = Jan
        (12, "2026-12-10T00:00:00+00:00", "2028-01-01T00:00:00+09:00"),  # Dec + 12 = Dec
        (13, "2026-12-10T00:00:00+00:00", "2028-02-01T00:00:00+09:00"),
        (11, "2026-02-10T00:00:00+00:00", "2027-02-01T00:00:00+09:00"),  # Feb + 11 = Jan
        # Leap years: February 2028 has 29 days, all of them spendable.
        (12, "2027-02-10T00:00:00+00:00", "2028-03-01T00:00:00+09:00"),
        (12, "2028-02-29T03:00:00+00:00", "2029-03-01T00:00:00+09:00"),
        (1, "2028-01-31T00:00:00+00:00", "2028-03-01T00:00:00+09:00"),
        # The upper bound of the setting.
        (1_200, "2026-05-20T00:00:00+00:00", "2126-06-01T00:00:00+09:00"),
    ],
)
def test_end_of_month_policy(months: int, earned: str, expires: str) -> None:
    assert policy("end_of_month", months=months).expire_ms(ms(earned)) == ms(expires)


def test_end_of_month_is_reckoned_in_the_configured_zone() -> None:
    # 2026-12-31T15:30Z is still December in UTC but already 2027-01-01 00:30 in Tokyo.
    earned = ms("2026-12-31T15:30:00+00:00")
    assert policy("end_of_month", months=12).expire_ms(earned) == ms("2028-02-01T00:00:00+09:00")
    assert policy("end_of_month", months=12, timezone="UTC").expire_ms(earned) == ms("2028-01-01T00:00:00+00:00")


def test_end_of_month_takes_the_offset_in_force_at_the_expiry() -> None:
    # Berlin is +01:00 in February and +02:00 from 2026-03-29: the month ends at local midnight.
    berlin = policy("end_of_month", months=1, timezone="Europe/Berlin")
    assert berlin.expire_ms(ms("2026-02-10T12:00:00+00:00")) == ms("2026-04-01T00:00:00+02:00")
    assert berlin.expire_ms(ms("2026-09-10T12:00:00+00:00")) == ms("2026-11-01T00:00:00+01:00")


def test_the_default_policy_is_end_of_month_a_year_later_in_tokyo() -> None:
    earned = ms("2026-07-04T10:00:00+00:00")
    assert EarnPolicy(EarnSettings()).expire_ms(earned) == ms("2027-08-01T00:00:00+09:00")


# --- expire_ms: end_of_year -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("years", "earned", "expires"),
    [
        (1, "2026-06-15T00:00:00+00:00", "2028-01-01T00:00:00+09:00"),
        (1, "2026-01-01T00:00:00+09:00", "2028-01-01T00:00:00+09:00"),  # the first instant of 2026
        (1, "2026-12-31T14:59:59.999+00:00", "2028-01-01T00:00:00+09:00"),  # the last of 2026 in Tokyo
        (1, "2026-12-31T15:00:00+00:00", "2029-01-01T00:00:00+09:00"),  # already 2027 in Tokyo
        (3, "2028-02-29T03:00:00+00:00", "2032-01-01T00:00:00+09:00"),
        (100, "2026-03-01T00:00:00+00:00", "2127-01-01T00:00:00+09:00"),
    ],
)
def test_end_of_year_policy(years: int, earned: str, expires: str) -> None:
    assert policy("end_of_year", years=years).expire_ms(ms(earned)) == ms(expires)


def test_end_of_year_is_reckoned_in_the_configured_zone() -> None:
    earned = ms("2026-12-31T15:30:00+00:00")  # 2027-01-01 00:30 in Tokyo
    assert policy("end_of_year").expire_ms(earned) == ms("2029-01-01T00:00:00+09:00")
    assert policy("end_of_year", timezone="UTC").expire_ms(earned) == ms("2028-01-01T00:00:00+00:00")


def test_expiry_is_an_exact_integer_instant() -> None:
    expires = policy("end_of_month").expire_ms(ms("2026-01-15T03:00:00+00:00"))
    assert type(expires) is int
    assert expires == 1_801_407_600_000  # 2027-01-31T15:00:00Z
