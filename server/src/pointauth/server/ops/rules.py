"""Rule sets and campaign budgets in rehydrate and reconcile: restoring Redis's published rule
sets (Keyspace.rules) and each campaign's budget count (Keyspace.budget) from PostgreSQL, and
listing where the two differ.

A budget count is the points its campaign has given: the points of the earns' lines that drew on
its budget, less the refund shares given back to it (journal/rules.py, budget_counts: as the
lines say, EarnLineEntry.budgeted), plus, in Redis only, the reservations of earns in flight
(reserved before the account's script runs, settled after it: services/points.py). So:
- Redis below PostgreSQL is always a difference (once events in flight have settled): points
  were given back that had not been counted, and the campaign may give that many beyond its
  budget;
- Redis above PostgreSQL is what every earn in flight looks like, so it is reported only when
  Redis's count did not move for the whole comparison (reconcile looks twice at least, and
  again until settle_seconds have passed; no earn of the campaign meanwhile): then it is points
  reserved and never settled (a server that died between reserving and settling, or a refund's
  give-back lost), which the campaign will never give (a bounded under-spend).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import msgspec
from redis.asyncio import Redis

from pointauth.server.domain.earning import RuleSet
from pointauth.server.journal import rules as journaled
from pointauth.server.journal.pg import Connection
from pointauth.server.ledger import Keyspace, codec


@dataclass(frozen=True)
class RulesRestored:
    rule_sets: int
    """Versions restored (the highest is current)."""
    budgets: dict[str, int]
    """Each campaign that had a budget: its count as restored."""


async def restore(redis: Redis, conn: Connection, keyspace: Keyspace) -> RulesRestored:
    """Makes Redis's rule sets exactly PostgreSQL's, the highest version current (so the next
    publication gets the version after it), and each budgeted campaign's count PostgreSQL's.
    Running servers see the version and reload the rule set."""
    rule_sets = await journaled.read_rule_sets(conn)
    budgets = await journaled.budget_counts(conn)
    keys = keyspace.rules()
    async with redis.pipeline(transaction=True) as pipe:  # one slot: shard 0's
        pipe.delete(keys.sets, keys.version)
        if rule_sets:
            pipe.hset(keys.sets, mapping={str(v): codec.encode_rule_set(rs) for v, rs in rule_sets.items()})
            pipe.set(keys.version, max(rule_sets))
        await pipe.execute()
    async with redis.pipeline(transaction=False) as pipe:  # a slot per campaign
        for campaign, spent in budgets.items():
            if spent > 0:
                pipe.set(keyspace.budget(campaign), spent)
            else:
                pipe.delete(keyspace.budget(campaign))
        await pipe.execute()
    return RulesRestored(len(rule_sets), budgets)


@dataclass(frozen=True)
class RulesDifference:
    what: str
    """What differs: "rule set 3", "current rule set version", "budget of campaign <id>"."""
    redis: str
    postgres: str
    note: str = ""

    def __str__(self) -> str:
        said = f"rules: {self.what}: Redis {self.redis}, PostgreSQL {self.postgres}"
        return f"{said} ({self.note})" if self.note else said


@dataclass
class RulesComparison:
    differences: list[RulesDifference] = field(default_factory=list)
    redis_budgets: dict[str, int] = field(default_factory=dict)
    """Redis's budget counts as read (the first comparison's are the next ones' reference)."""
    settled: bool = True
    """Nothing differs, not even a count Redis has above PostgreSQL's (reservations in flight)."""


async def compare(
    redis: Redis, conn: Connection, keyspace: Keyspace, first_budgets: Mapping[str, int] | None = None
) -> RulesComparison:
    """Where Redis's rule sets, current version and budget counts differ from PostgreSQL's.
    `first_budgets`: Redis's counts at the first comparison (None: this is it); a count above
    PostgreSQL's is a difference only if it is still the same (see the module's docstring)."""
    keys = keyspace.rules()
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.sets)
        pipe.get(keys.version)
        replies: list[Any] = await pipe.execute()
    raw_sets, raw_version = replies
    in_redis: dict[int, RuleSet | str] = {}
    for version, raw in raw_sets.items():
        try:
            in_redis[int(version)] = codec.decode_rule_set(raw)
        except (ValueError, msgspec.DecodeError) as exc:
            in_redis[int(version) if version.isdigit() else -1] = f"undecodable ({exc})"
    async with conn.transaction():  # one snapshot of rule sets and campaign points
        in_postgres = await journaled.read_rule_sets(conn)
        pg_budgets = await journaled.budget_counts(conn)
    out = RulesComparison()
    for version in sorted(in_redis.keys() | in_postgres.keys()):
        r, p = in_redis.get(version), in_postgres.get(version)
        if r != p:
            what = f"rule set {version}"
            if isinstance(r, RuleSet) and p is not None:
                differing = [f.name for f in fields(RuleSet) if getattr(r, f.name) != getattr(p, f.name)]
                out.differences.append(RulesDifference(what, "differs", "differs", f"in {', '.join(differing)}"))
            else:
                out.differences.append(RulesDifference(what, _said(r), _said(p)))
    current, newest = (raw_version or b"0").decode(), str(max(in_postgres, default=0))
    if current != newest:
        out.differences.append(RulesDifference("current rule set version", current, newest))
    # Every campaign with a budget in a rule set of either side.
    campaigns = set(pg_budgets)
    for rule_set in in_redis.values():
        if isinstance(rule_set, RuleSet):
            campaigns.update(c.campaign_id for c in rule_set.campaigns if c.budget > 0)
    ordered = sorted(campaigns)
    async with redis.pipeline(transaction=False) as pipe:
        for campaign in ordered:
            pipe.get(keyspace.budget(campaign))
        counts: list[Any] = await pipe.execute() if ordered else []
    for campaign, raw in zip(ordered, counts, strict=True):
        rd, pg = int(raw or 0), pg_budgets.get(campaign, 0)
        out.redis_budgets[campaign] = rd
        what = f"budget of campaign {campaign}"
        if rd < pg:
            note = f"{pg - rd} points given back that were never counted: the campaign may give them beyond its budget"
            out.differences.append(RulesDifference(what, str(rd), str(pg), note))
        elif rd > pg:
            out.settled = False
            if first_budgets is None or first_budgets.get(campaign) == rd:
                note = f"{rd - pg} points reserved and never settled, or earns in flight"
                out.differences.append(RulesDifference(what, str(rd), str(pg), note))
    out.settled = out.settled and not out.differences
    return out


def _said(rule_set: RuleSet | str | None) -> str:
    if rule_set is None:
        return "missing"
    if isinstance(rule_set, str):
        return rule_set
    return f"published at {rule_set.published_ms} ({len(rule_set.campaigns)} campaigns)"
