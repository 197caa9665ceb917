"""`pointauth ranks review`: the rank period's review of every account (down one rank, or to
what the period's spend supports, per the rule set's rank program). Each account's review is one
call of its script, which also reviews a member lazily on their first earn of a new period: the
command brings the members who do not come back in line, and changes nothing twice."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from redis.asyncio import Redis

from pointauth.server.clock import Clock
from pointauth.server.config import Settings
from pointauth.server.domain.reasons import ErrorReason, name
from pointauth.server.ledger import Keyspace, Ledger, LedgerRefusal, RankArgs
from pointauth.server.ledger.rulebook import RuleBook
from pointauth.server.rules.earn_policy import EarnPolicy

IN_FLIGHT = 64
_NOT_REVIEWED = {name(ErrorReason.ACCOUNT_CLOSED), name(ErrorReason.ACCOUNT_MERGED)}


@dataclass
class ReviewReport:
    reviewed: int = 0
    changed: int = 0
    skipped: int = 0
    """Closed or merged accounts."""


async def review_ranks(redis: Redis, settings: Settings, clock: Clock) -> ReviewReport | None:
    """Reviews every account under the current rule set's rank program; None if it has none."""
    keyspace = Keyspace(settings.ledger.shards)
    rule_set = await RuleBook(redis, keyspace, clock).get()
    if rule_set is None or rule_set.ranks is None:
        return None
    local = EarnPolicy(settings.earn).local_time(clock.now_ms())
    ranks = RankArgs(rule_set.ranks, rule_set.ranks.period_of(local.year, local.month))
    ledger = Ledger(redis, keyspace, clock, settings.ledger)
    report = ReviewReport()
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def review(account: str) -> None:
        async with gate:
            try:
                result = await ledger.rank_review(account, ranks)
            except LedgerRefusal as refusal:
                if refusal.result.reason not in _NOT_REVIEWED:
                    raise
                report.skipped += 1
                return
            report.reviewed += 1
            report.changed += bool(result.was) and result.was != result.rank

    batch: list[asyncio.Task[None]] = []
    async for key in redis.scan_iter(match=keyspace.account_hash_pattern(), count=1000):
        batch.append(asyncio.create_task(review(keyspace.account_of_hash(key))))
        if len(batch) >= 1000:
            await asyncio.gather(*batch)
            batch = []
    await asyncio.gather(*batch)
    return report
