"""Base earn rate and lot expiry, until the rules engine takes over: integer arithmetic only."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from pointauth.server.config import EarnSettings


class EarnPolicy:
    def __init__(self, settings: EarnSettings) -> None:
        self._settings = settings
        self._zone = ZoneInfo(settings.timezone)
        self.purchase_time_skew_ms = settings.purchase_time_skew_seconds * 1000

    def points_for(self, purchase_amount: int) -> int:
        """rate_points per rate_amount, rounded down: 1 point per 100 yen gives 0 for 99 yen."""
        return purchase_amount * self._settings.rate_points // self._settings.rate_amount

    def expire_ms(self, earned_ms: int) -> int:
        """When a lot earned at `earned_ms` expires. The lot keeps it even if policy changes."""
        expiry = self._settings.expiry
        earned = datetime.fromtimestamp(earned_ms / 1000, tz=UTC).astimezone(self._zone)
        if expiry.policy == "days":
            return earned_ms + expiry.days * 86_400_000
        if expiry.policy == "end_of_month":
            month_index = earned.year * 12 + earned.month - 1 + expiry.months + 1
            end = datetime(month_index // 12, month_index % 12 + 1, 1, tzinfo=self._zone)
        else:
            end = datetime(earned.year + expiry.years + 1, 1, 1, tzinfo=self._zone)
        # Expiry is exclusive: the lot is spendable up to the last millisecond of the period.
        return int(end.timestamp()) * 1000
