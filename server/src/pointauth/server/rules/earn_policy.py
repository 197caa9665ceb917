"""The program's base earn rate and lot expiry: integer arithmetic only. Rule sets (rules/engine.py)
build on them."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from pointauth.server.config import EarnSettings
from pointauth.server.domain.earning import Rate


class EarnPolicy:
    def __init__(self, settings: EarnSettings) -> None:
        self._settings = settings
        self.zone = ZoneInfo(settings.timezone)
        self.purchase_time_skew_ms = settings.purchase_time_skew_seconds * 1000

    @property
    def rate(self) -> Rate:
        """The program's base rate (rule sets may set others per company or store)."""
        return Rate(self._settings.rate_points, self._settings.rate_amount)

    def local_time(self, ms: int) -> datetime:
        """An instant in the program's time zone (weekdays, days and time windows of rules)."""
        return datetime.fromtimestamp(ms / 1000, tz=UTC).astimezone(self.zone)

    def points_for(self, purchase_amount: int) -> int:
        """rate_points per rate_amount, rounded down: 1 point per 100 yen gives 0 for 99 yen."""
        return purchase_amount * self._settings.rate_points // self._settings.rate_amount

    def expire_ms(self, earned_ms: int) -> int:
        """When a lot earned at `earned_ms` expires. The lot keeps it even if policy changes."""
        expiry = self._settings.expiry
        earned = datetime.fromtimestamp(earned_ms / 1000, tz=UTC).astimezone(self.zone)
        if expiry.policy == "days":
            return earned_ms + expiry.days * 86_400_000
        if expiry.policy == "end_of_month":
            month_index = earned.year * 12 + earned.month - 1 + expiry.months + 1
            end = datetime(month_index // 12, month_index % 12 + 1, 1, tzinfo=self.zone)
        else:
            end = datetime(earned.year + expiry.years + 1, 1, 1, tzinfo=self.zone)
        # Expiry is exclusive: the lot is spendable up to the last millisecond of the period.
        return int(end.timestamp()) * 1000
