"""The rule set as one server process sees it, and what a purchase earns under it.

The process keeps the current rule set in memory (evaluating it costs no Redis round trip),
loads it at start, asks Redis for its version every `rules.refresh_seconds`, and takes in its
own publications at once. Until a rule set is published, earns use the configured base rate
(earn.rate_points per earn.rate_amount) as they always have.
"""

from __future__ import annotations

from pointauth.server.clock import Clock
from pointauth.server.config import RulesSettings
from pointauth.server.domain.earning import BasketLine, EarnLine, Purchase, RuleSet
from pointauth.server.domain.reasons import ErrorReason
from pointauth.server.ledger import PointOfSaleRef, RankArgs
from pointauth.server.ledger.rulebook import RuleBook
from pointauth.server.rules.earn_policy import EarnPolicy
from pointauth.server.rules.engine import evaluate
from pointauth.server.services.directory import DirectoryService
from pointauth.server.services.following import Follower
from pointauth.server.services.refusals import not_found


class RulesService:
    def __init__(
        self,
        book: RuleBook,
        settings: RulesSettings,
        policy: EarnPolicy,
        clock: Clock,
        directory: DirectoryService | None = None,
    ) -> None:
        self.book = book
        self.clock = clock
        self.settings = settings
        self.policy = policy
        self.directory = directory
        self.current = RuleSet(version=0)
        self._follower = Follower("rule set", settings.refresh_seconds, self.refresh)

    async def start(self) -> None:
        await self.refresh()
        self._follower.start()

    async def stop(self) -> None:
        await self._follower.stop()

    async def refresh(self) -> int:
        """Takes in the current rule set if its version moved (one GET when it has not)."""
        version = await self.book.version()
        if version != self.current.version:
            rule_set = await self.book.get(version)
            if rule_set is not None and rule_set.version != self.current.version:
                self.current = rule_set
        return self.current.version

    async def publish(self, rule_set: RuleSet) -> RuleSet:
        published = await self.book.publish(rule_set)
        if published.version > self.current.version:
            self.current = published
        return published

    async def get(self, version: int) -> RuleSet:
        rule_set = await self.book.get(version)
        if rule_set is None:
            what = f"version {version}" if version else "current version"
            raise not_found(ErrorReason.RULE_SET_NOT_FOUND, f"no rule set has been published as the {what}")
        return rule_set

    def purchase(self, pos: PointOfSaleRef, amount: int, basket: tuple[BasketLine, ...], purchase_ms: int) -> Purchase:
        """The purchase as the rules see it: its store's region, its local time."""
        local = self.policy.local_time(purchase_ms)
        store = self.directory.current.stores.get(pos.store_id) if self.directory is not None else None
        return Purchase(
            amount=amount,
            lines=basket,
            company_id=pos.company_id,
            store_id=pos.store_id,
            region_id=store.region_id if store is not None else "",
            channel=pos.channel,
            time_ms=purchase_ms,
            month=local.month,
            month_day=local.day,
            weekday=local.isoweekday(),
            minute=local.hour * 60 + local.minute,
        )

    def rank_args(self, rule_set: RuleSet) -> RankArgs | None:
        """The rule set's rank program with the current period (by the server's clock, in the
        program's time zone: a purchase counts in the period it is processed in)."""
        if rule_set.ranks is None:
            return None
        local = self.policy.local_time(self.clock.now_ms())
        return RankArgs(rule_set.ranks, rule_set.ranks.period_of(local.year, local.month))

    def lines(self, rule_set: RuleSet, purchase: Purchase) -> list[EarnLine]:
        return evaluate(rule_set, purchase, self.policy.rate, self.policy.expire_ms(purchase.time_ms))
