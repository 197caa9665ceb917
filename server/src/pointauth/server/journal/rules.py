"""Rule sets and campaign points in PostgreSQL (migrations 0004, 0005): the write-behind copies each
rule set publication shard 0's stream carries, and the points each campaign gave (and had
refunded) under each rule set version, those its lines say came from its budget apart;
rehydrate and reconcile read them back.

A version's rule set never changes once published (ledger/rulebook.py), so a publication applied
twice (a redelivery, a claimed entry) changes nothing. Rule sets are kept as JSON
(msgspec.to_builtins of domain/earning.py's RuleSet, sets sorted so that the same rule set is the
same text): readable by operators' SQL, and decoded back to the very RuleSet.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

import msgspec

from pointauth.server.domain.earning import RuleSet
from pointauth.server.journal.pg import Connection
from pointauth.server.journal.projection import CampaignPoints
from pointauth.server.ledger import codec

_decode_rule_set = msgspec.json.Decoder(RuleSet).decode


def rule_set_json(rule_set: RuleSet) -> str:
    """The rule_sets row's rule_set: the RuleSet as JSON, its sets sorted."""
    return msgspec.json.encode(rule_set, order="deterministic").decode()


def rule_set_from_json(raw: str) -> RuleSet:
    return _decode_rule_set(raw)


async def write_published(conn: Connection, published: Sequence[codec.RuleSetPublished]) -> None:
    """Copies the publications (in the caller's transaction); a version already there is kept."""
    newest = {p.version: p for p in published}
    if not newest:
        return
    versions = sorted(newest)
    await conn.execute(
        """
        INSERT INTO rule_sets (version, published_at, rule_set)
        SELECT version, published_at, rule_set::jsonb
        FROM unnest($1::bigint[], $2::timestamptz[], $3::text[]) AS t(version, published_at, rule_set)
        ON CONFLICT (version) DO NOTHING
        """,
        versions,
        [datetime.fromtimestamp(newest[v].time / 1000, tz=UTC) for v in versions],
        [rule_set_json(newest[v].rule_set) for v in versions],
    )


async def write_campaign_points(conn: Connection, points: Mapping[tuple[str, int], CampaignPoints]) -> None:
    """Adds a batch's points given and refunded per (campaign, rule set version), and those of
    its budget, in key order (two workers adding to the same rows lock them in the same order)."""
    rows = [
        (c, v, p.given, p.refunded, p.budget_given, p.budget_refunded)
        for (c, v), p in sorted(points.items())
        if p.given or p.refunded
    ]
    if not rows:
        return
    await conn.execute(
        """
        INSERT INTO campaign_points AS p (campaign_id, rules_version, given, refunded, budget_given, budget_refunded)
        SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[])
        ON CONFLICT (campaign_id, rules_version) DO UPDATE SET
            given = p.given + EXCLUDED.given, refunded = p.refunded + EXCLUDED.refunded,
            budget_given = p.budget_given + EXCLUDED.budget_given,
            budget_refunded = p.budget_refunded + EXCLUDED.budget_refunded
        """,
        *map(list, zip(*rows, strict=True)),
    )


async def read_rule_sets(conn: Connection) -> dict[int, RuleSet]:
    """Every rule set PostgreSQL has, by version."""
    rows = await conn.fetch("SELECT version, rule_set::text AS rule_set FROM rule_sets ORDER BY version")
    return {r["version"]: rule_set_from_json(r["rule_set"]) for r in rows}


# The campaigns that had a budget in some version (or gave points from one), and the points their
# lines drew on it less the refund shares given back to it (as the script said of each: the
# lines' budgeted): what each one's budget count in Redis holds, once every earn has settled its
# reservation.
_BUDGETS = """
WITH budgeted AS (
    SELECT c ->> 'campaign_id' AS campaign_id
    FROM rule_sets AS r, jsonb_array_elements(r.rule_set -> 'campaigns') AS c
    WHERE coalesce((c ->> 'budget')::bigint, 0) > 0
    UNION
    SELECT campaign_id FROM campaign_points WHERE budget_given > 0
)
SELECT b.campaign_id, coalesce(sum(p.budget_given - p.budget_refunded), 0)::bigint AS spent
FROM budgeted AS b
LEFT JOIN campaign_points AS p ON p.campaign_id = b.campaign_id
GROUP BY b.campaign_id
ORDER BY b.campaign_id
"""


async def budget_counts(conn: Connection) -> dict[str, int]:
    """Each campaign that had a budget: the points its earns' lines took from it, less the refund
    shares given back to it."""
    return {r["campaign_id"]: r["spent"] for r in await conn.fetch(_BUDGETS)}
