"""Coupons on their way to PostgreSQL: the write-behind copies what the events say of coupons
(issued by earns, used, moved by a merge) into the journal, the coupons table and the merges row,
which stay what the account hashes' q: fields keep."""

from __future__ import annotations

from typing import Any

import msgspec
from redis.asyncio import Redis

from pointauth.client import PointsClient
from pointauth.server.app import PointauthServer
from pointauth.server.clock import ManualClock, to_time
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.journal.pg import connection
from pointauth.server.journal.writer import account_coupons
from pointauth.server.ledger import Keyspace, codec
from pointauth.v1 import rules_service_pb2 as rpb
from tests.conftest import STORE, at
from tests.helpers import account_state
from tests.journal.coupons_story import CARDS, MEMBERS, THANKS, coupons_story, ms
from tests.journal.support import running_worker, wait_until_applied


def _json(raw: str | None) -> Any:
    return None if raw is None else msgspec.json.decode(raw)


async def test_the_worker_copies_coupons_issued_used_and_moved_by_a_merge(
    stack: EmbeddedStack,
    redis: Redis,
    keyspace: Keyspace,
    client: PointsClient,
    server: PointauthServer,
    clock: ManualClock,
    dsn: str,
) -> None:
    story = await coupons_story(client, clock)
    async with running_worker(stack.redis.url, dsn, keyspace):
        await wait_until_applied(redis, dsn, keyspace, MEMBERS)

    async with connection(dsn) as conn:
        journal = await conn.fetch(
            "SELECT account_id, seq, type, points, coupons::text FROM journal ORDER BY account_id, seq"
        )
        rows = await conn.fetch("SELECT * FROM coupons ORDER BY account_id, coupon_id")
        merge = await conn.fetchrow("SELECT coupons::text FROM merges")
        stored = await account_coupons(conn, MEMBERS)

    first, other, kept = (ms(c) for c in (story.first, story.other, story.kept))
    issued_other = ["q-2.2.2", "thanks", other[0], other[1], 0]
    issued_kept = ["q-2.3.2", "thanks", kept[0], kept[1], 0]
    used_other = ["q-2.2.2", "thanks", other[0], other[1], story.at(6)]
    assert [(r[0], r[1], r[2], r[3], _json(r[4])) for r in journal] == [
        ("q-1", 1, "ACCOUNT_OPENED", 0, None),
        ("q-1", 2, "EARN", 60, [["q-1.2.2", "thanks", first[0], first[1], 0]]),
        ("q-1", 3, "COUPON_USED", 0, [["q-1.2.2", "thanks", first[0], first[1], story.at(4)]]),
        # In the order of their ids, each under the id it left with: q-2.2.2, then q-2.3.2.
        ("q-1", 4, "MERGED_IN", 120, [used_other, issued_kept]),
        ("q-1", 5, "COUPON_USED", 0, [["q-2.3.2", "thanks", kept[0], kept[1], story.at(8)]]),
        ("q-2", 1, "ACCOUNT_OPENED", 0, None),
        ("q-2", 2, "EARN", 60, [issued_other]),
        ("q-2", 3, "EARN", 60, [issued_kept]),
        ("q-2", 4, "COUPON_USED", 0, [used_other]),
        ("q-2", 5, "MERGED_OUT", 120, [used_other, issued_kept]),
    ]
    # One row per coupon, on the account that has it: q-2's moved to q-1 under their ids.
    assert [tuple(r[i] for i in range(6)) for r in rows] == [
        ("q-1", "q-1.2.2", "thanks", to_time(first[0]), to_time(first[1]), to_time(story.at(4))),
        ("q-1", "q-2.2.2", "thanks", to_time(other[0]), to_time(other[1]), to_time(story.at(6))),
        ("q-1", "q-2.3.2", "thanks", to_time(kept[0]), to_time(kept[1]), to_time(story.at(8))),
    ]
    # The merges row keeps the move's coupons as they left q-2 (its move record's).
    assert merge is not None
    assert _json(merge[0]) == {
        "q-2.2.2": f"thanks|{other[0]}|{other[1]}|{story.at(6)}",
        "q-2.3.2": f"thanks|{kept[0]}|{kept[1]}|0",
    }
    # And the table is what the account hashes' q: fields say.
    for member in MEMBERS:
        in_redis = (await account_state(redis, keyspace, member)).coupons
        assert stored.get(member, {}) == in_redis, member
    assert set(stored) == {"q-1"}
    assert stored["q-1"]["q-2.2.2"] == codec.CouponEntry("q-2.2.2", "thanks", other[0], other[1], story.at(6))


async def test_a_moved_coupon_keeps_its_id_beside_the_targets_own_from_the_same_seq_and_line(
    stack: EmbeddedStack,
    redis: Redis,
    keyspace: Keyspace,
    client: PointsClient,
    server: PointauthServer,
    clock: ManualClock,
    dsn: str,
) -> None:
    """q-2's coupon from its earn at seq 5 (line 2) lands on q-1 (at seq 1) as q-2.5.2, and q-1's
    own earn at seq 5 later issues q-1.5.2: the ids name the issuing account, so both coexist."""
    for member, card in CARDS.items():
        await client.create_account(member, card)
    await client.publish_rule_set(rpb.RuleSet(campaigns=[THANKS]))
    for _ in range(3):
        await client.earn_points(CARDS["q-2"], STORE, 100, at(clock.now_ms()))
    [moved] = (await client.earn_points(CARDS["q-2"], STORE, 6_000, at(clock.now_ms()))).coupons
    await client.merge_accounts("q-2", "q-1", operator_id="op-1", reason="same member")
    for _ in range(2):
        await client.earn_points(CARDS["q-1"], STORE, 100, at(clock.now_ms()))
    [own] = (await client.earn_points(CARDS["q-1"], STORE, 6_000, at(clock.now_ms()))).coupons
    assert (moved.coupon_id, own.coupon_id) == ("q-2.5.2", "q-1.5.2")
    shown = sorted(c.coupon_id for c in (await client.get_account(account_id="q-1")).coupons)
    assert shown == ["q-1.5.2", "q-2.5.2"]
    async with running_worker(stack.redis.url, dsn, keyspace):
        await wait_until_applied(redis, dsn, keyspace, MEMBERS)
    async with connection(dsn) as conn:
        rows = await conn.fetch("SELECT account_id, coupon_id, issued_at FROM coupons ORDER BY 1, 2")
    assert [tuple(r[i] for i in range(3)) for r in rows] == [
        ("q-1", "q-1.5.2", to_time(ms(own)[0])),
        ("q-1", "q-2.5.2", to_time(ms(moved)[0])),
    ]
