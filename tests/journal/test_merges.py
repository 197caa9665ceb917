"""Account merges reach PostgreSQL as Redis has them: the source's accounts row merged into the
target, the cards rows on the target with their states and link times, the lots where the moved
lots landed, a row in `merges` from both events, and a refund of the source's transaction after
the merge on the target (its REFUND naming the source) and on the original record, under the
source. Both accounts' streams may be applied in any order: the rows end the same."""

from __future__ import annotations

import json
from typing import Any

import pytest
from redis.asyncio import Redis

from pointauth.server.clock import ManualClock, to_time
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.journal.pg import Connection, connection
from pointauth.server.journal.writer import Delivered, JournalWriter
from pointauth.server.ledger import Keyspace, Ledger, codec
from pointauth.server.ops import reconcile
from tests.journal.support import DAY_MS, MERGED, deliveries, merged_pair, running_worker, wait_until_applied

EXTRA = codec.EXTRA_LOT_ID_STEP


_ROWS = {
    "accounts": ("account_id, last_seq, status, closed_at, merged_into, merge_id, merged_at", "accounts"),
    "cards": ("card_number, account_id, kind, state, linked_at, state_at, replaced_by, moved_at", "cards"),
    "lots": ("account_id, lot_id, points, expire_ms, kind, issuer_id", "lots"),
    "journal": ("account_id, seq, type, points, lots, merge_id, other_account, ref_account, ref_seq", "journal"),
    "records": (
        "account_id, seq, type, points, refunded, alloc, lots, ref_seq, ref_account",
        "transactions WHERE (account_id, seq) IN (('S', 6), ('T', 4))",
    ),
    "merges": (
        "merge_id, source_id, target_id, merged_at, actor, reason, lots, cards, foreign_refunds, landed_on, landed_at",
        "merges",
    ),
}


async def _rows(conn: Connection) -> dict[str, list[tuple[Any, ...]]]:
    """What a merge changes in PostgreSQL, as an operator would read it (JSON decoded), in the
    order of the first two columns."""
    out = {}
    for name, (columns, source) in _ROWS.items():
        n = columns.count(",") + 1
        rows = await conn.fetch(f"SELECT {columns} FROM {source} ORDER BY 1, 2")
        out[name] = [tuple(_json(r[i]) for i in range(n)) for r in rows]
    return out


def _json(value: Any) -> Any:
    """A jsonb column's value (asyncpg gives text) decoded."""
    return json.loads(value) if isinstance(value, str) and value[:1] in "[{" else value


def _expected(t0: int) -> dict[str, list[tuple[Any, ...]]]:
    """The rows of tests.journal.support.merged_pair."""

    def at(seconds: int) -> Any:
        return to_time(t0 + seconds * 1000)

    d10, d30, d60 = t0 + 10 * DAY_MS, t0 + 30 * DAY_MS, t0 + 60 * DAY_MS
    moved: list[list[Any]] = [[8, 40, d10, "L", "partner"], [2, 280, d30, "R", "acme"], [9, 25, d60, "R", "partner"]]
    journal = [
        ("S", 1, "ACCOUNT_OPENED", 0, [], None, None, None, None),
        ("S", 2, "EARN", 300, [[2, 300, d30, "R", "acme"]], None, None, None, None),
        ("S", 3, "GRANT", 100, [[3, 100, d10, "L", "acme"]], None, None, None, None),
        ("S", 4, "CARD_LINKED", 0, [], None, None, None, None),
        ("S", 5, "CARD_BLOCKED", 0, [], None, None, None, None),
        ("S", 6, "REDEEMED", 130, [[3, -100, d10, "L", "acme"], [2, -30, d30, "R", "acme"]], None, None, None, None),
        ("S", 7, "REFUNDED", 10, [[2, 10, d30, "R", "acme"]], None, None, None, 6),
        ("S", 8, "GRANT", 40, [[8, 40, d10, "L", "partner"]], None, None, None, None),
        ("S", 9, "GRANT", 25, [[9, 25, d60, "R", "partner"]], None, None, None, None),
        ("S", 10, "MERGED_OUT", 345, [[i, -p, e, k, s] for i, p, e, k, s in moved], "S:merge-1", "T", None, None),
        ("T", 1, "ACCOUNT_OPENED", 0, [], None, None, None, None),
        ("T", 2, "EARN", 50, [[2, 50, d30, "R", "acme"]], None, None, None, None),
        (
            "T", 3, "MERGED_IN", 345, [[3, 40, d10, "L", "partner"], [2, 280, d30, "R", "acme"],
            [3 + EXTRA, 25, d60, "R", "partner"]], "S:merge-1", "S", None, None,
        ),
        ("T", 4, "REFUNDED", 110, [[2, 20, d30, "R", "acme"], [4, 90, d10, "L", "acme"]], None, None, "S", 6),
        ("T", 5, "CARD_BLOCKED", 0, [], None, None, None, None),
    ]  # fmt: skip
    redemption = (
        "S", 6, "REDEMPTION", 130, 120, [[3, 100, d10, "L", "acme", 90], [2, 30, d30, "R", "acme", 30]],
        [[3, -100, d10, "L", "acme"], [2, -30, d30, "R", "acme"]], None, None,
    )  # fmt: skip
    refund = ("T", 4, "REFUND", 110, 0, None, [[2, 20, d30, "R", "acme"], [4, 90, d10, "L", "acme"]], 6, "S")
    cards = {"APP-S2": f"BA{t0 + 3000}:{t0 + 4000}", "S-CARD1": f"AP{t0}"}
    none: dict[str, str] = {}
    merge = ("S:merge-1", "S", "T", at(11), "desk-7", "same member, two cards", moved, cards, none, "T", at(11))
    return {
        "accounts": [
            ("S", 10, "M", None, "T", "S:merge-1", at(11)),
            ("T", 5, "A", None, None, None, None),
        ],
        # The source's cards on the target as they were (APP-S2 blocked, link times kept), moved
        # at the merge; S-CARD1 blocked on the target since.
        "cards": [
            ("APP-S2", "T", "A", "B", at(3), at(4), None, at(11)),
            ("S-CARD1", "T", "P", "B", at(0), at(13), None, at(11)),
            ("T-CARD1", "T", "P", "A", at(9), None, None, None),
        ],
        "lots": [
            ("T", 2, 350, d30, "R", "acme"),
            ("T", 3, 40, d10, "L", "partner"),
            ("T", 4, 90, d10, "L", "acme"),
            ("T", 3 + EXTRA, 25, d60, "R", "partner"),
        ],
        "journal": journal,
        # The redemption: 120 of 130 refunded, 10 on S and 110 on T (90 of lot 3's 100, all 30 of
        # lot 2's); T's refund names it.
        "records": [redemption, refund],
        "merges": [merge],
    }


async def test_a_merge_and_a_refund_after_it_are_projected_as_redis_has_them(
    stack: EmbeddedStack, redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace, dsn: str
) -> None:
    t0 = clock.now_ms()
    await merged_pair(ledger, clock)
    async with running_worker(stack.redis.url, dsn, keyspace):
        await wait_until_applied(redis, dsn, keyspace, MERGED)
    async with connection(dsn) as conn:
        assert await _rows(conn) == _expected(t0)
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).differences == []


@pytest.mark.parametrize("order", ["source-first", "target-first", "target-first-source-in-two", "source-behind"])
async def test_the_rows_end_the_same_whichever_account_is_applied_first(
    redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace, dsn: str, order: str
) -> None:
    t0 = clock.now_ms()
    await merged_pair(ledger, clock)
    s, t = await deliveries(redis, keyspace, "S"), await deliveries(redis, keyspace, "T")
    assert [d.event.type for d in t] == ["ACCOUNT_OPENED", "EARN", "MERGED_IN", "REFUNDED", "CARD_BLOCKED"]
    waiting = "waiting: event T.4 refunds S.6, not in PostgreSQL yet"
    # (batch, events applied, reasons of those held back)
    plans: dict[str, list[tuple[list[Delivered], int, list[str]]]] = {
        "source-first": [(s, 10, []), (t, 5, [])],
        # The target's refund of S.6 waits for the record (its stream is held back from there
        # on); S's cards, linked and blocked before the merge, come after the target has them.
        "target-first": [(t, 3, [waiting, waiting]), (s, 10, []), (t[3:], 2, [])],
        # As above, S's link of its cards in a batch before its MERGED_OUT: the link, as old as the
        # target's, does not take the card back (the target's came by a later merge).
        "target-first-source-in-two": [(t, 3, [waiting, waiting]), (s[:6], 6, []), (t[3:], 2, []), (s[6:], 4, [])],
        # S's own refund of S.6 (10 of it) comes after T's (up to 120): the record stays at 120.
        "source-behind": [(s[:6], 6, []), (t, 5, []), (s[6:], 4, [])],
    }
    writer = JournalWriter(keyspace)
    async with connection(dsn) as conn:
        await conn.execute("SELECT journal_create_partitions(to_timestamp($1::bigint / 1000.0), 1)", t0)
        await writer.prepare(conn)
        for batch, applied, held in plans[order]:
            outcome = await writer.apply(conn, batch)
            assert (len(outcome.applied), [why for _, why in outcome.held]) == (applied, held)
        assert await _rows(conn) == _expected(t0)
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).differences == []
