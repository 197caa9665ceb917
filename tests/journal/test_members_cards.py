"""The member and card events reach PostgreSQL as the account hash has them: the accounts row's
status, closing time and profile, a cards row per card of the account with its kind, state and
times (none for a card unlinked), and a journal row per event saying what the event said. A card
that moved between accounts lands on the account that has it now, whichever account's events
are applied first."""

from __future__ import annotations

import json
from typing import Any

import pytest
from redis.asyncio import Redis

from pointauth.server.clock import ManualClock, to_time
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.journal.pg import Connection, Record, connection
from pointauth.server.journal.writer import JournalWriter
from pointauth.server.ledger import Keyspace, Ledger
from pointauth.server.ops import reconcile
from tests.journal.support import (
    DAY_MS,
    MEMBERS,
    deliveries,
    fingerprint,
    members_and_cards,
    request_ids,
    running_worker,
    wait_until_applied,
)


def _tuples(rows: list[Record], columns: int) -> list[tuple[Any, ...]]:
    return [tuple(r[i] for i in range(columns)) for r in rows]


async def _cards(conn: Connection) -> list[tuple[Any, ...]]:
    rows = await conn.fetch(
        "SELECT card_number, account_id, kind, state, linked_at, state_at, replaced_by FROM cards ORDER BY card_number"
    )
    return _tuples(rows, 7)


async def test_member_and_card_events_are_projected_as_the_account_hash_has_them(
    stack: EmbeddedStack, redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace, dsn: str
) -> None:
    t0 = clock.now_ms()

    def at(seconds: int) -> int:
        return t0 + seconds * 1000

    await members_and_cards(ledger, clock)
    async with running_worker(stack.redis.url, dsn, keyspace):
        await wait_until_applied(redis, dsn, keyspace, MEMBERS)

    async with connection(dsn) as conn:
        accounts = await conn.fetch(
            "SELECT account_id, card_number, last_seq, opened_at, status, closed_at, profile FROM accounts"
            " ORDER BY account_id"
        )
        cards = await _cards(conn)
        journal = await conn.fetch(
            "SELECT account_id, seq, type, points, lots, card_number, card_kind, new_card, profile, request_id,"
            " event_time FROM journal ORDER BY account_id, seq"
        )
        lots = await conn.fetch("SELECT account_id, lot_id, points FROM lots ORDER BY account_id, lot_id")

    alice_opened = {"bd": "0415", "jt": t0, "hc": "acme", "attrs": {"tier": "gold", "lang": "en"}}
    alice_now = {"bd": "0416", "jt": t0, "attrs": {"tier": "gold", "vip": "y"}}
    assert [(*row[:6], json.loads(row[6])) for row in _tuples(accounts, 7)] == [
        ("alice", "CARD-A1", 10, to_time(t0), "A", None, alice_now),
        ("bob", "CARD-B1", 6, to_time(at(10)), "C", to_time(at(13)), {"jt": t0 - 365 * DAY_MS}),
        ("carol", "CARD-C1", 2, to_time(at(15)), "A", None, {"jt": at(15)}),
    ]
    assert cards == [
        ("APP-A2", "alice", "A", "B", to_time(at(2)), to_time(at(9)), None),
        ("CARD-A1", "alice", "P", "R", to_time(t0), to_time(at(5)), "CARD-A3"),
        ("CARD-A3", "alice", "P", "A", to_time(at(5)), None, None),
        ("CARD-C1", "carol", "P", "A", to_time(at(15)), None, None),
        ("CARD-X", "carol", "P", "A", to_time(at(16)), None, None),
    ]
    closed_lots = [[3, -30, t0 + 10 * DAY_MS, "L", "acme"], [2, -200, t0 + 30 * DAY_MS, "R", "acme"]]
    seen = [
        (r["account_id"], r["seq"], r["type"], r["points"], r["card_number"], r["card_kind"], r["new_card"],
         None if r["profile"] is None else json.loads(r["profile"]), r["request_id"], r["event_time"])
        for r in journal
    ]  # fmt: skip
    assert seen == [
        ("alice", 1, "ACCOUNT_OPENED", 0, "CARD-A1", "P", None, alice_opened, "open-alice", to_time(t0)),
        ("alice", 2, "EARN", 300, None, None, None, None, "earn-alice", to_time(at(1))),
        ("alice", 3, "CARD_LINKED", 0, "APP-A2", "A", None, None, "link-a2", to_time(at(2))),
        ("alice", 4, "CARD_BLOCKED", 0, "CARD-A1", None, None, None, "block-a1", to_time(at(3))),
        ("alice", 5, "CARD_UNBLOCKED", 0, "CARD-A1", None, None, None, "unblock-a1", to_time(at(4))),
        ("alice", 6, "CARD_REISSUED", 0, "CARD-A1", "P", "CARD-A3", None, "reissue-a1", to_time(at(5))),
        ("alice", 7, "CARD_LINKED", 0, "CARD-X", "P", None, None, "link-x-alice", to_time(at(6))),
        ("alice", 8, "CARD_UNLINKED", 0, "CARD-X", None, None, None, "unlink-x-alice", to_time(at(7))),
        ("alice", 9, "PROFILE_UPDATED", 0, None, None, None, alice_now, "profile-alice", to_time(at(8))),
        ("alice", 10, "CARD_BLOCKED", 0, "APP-A2", None, None, None, "block-a2", to_time(at(9))),
        ("bob", 1, "ACCOUNT_OPENED", 0, "CARD-B1", "A", None, {"jt": t0 - 365 * DAY_MS}, "open-bob", to_time(at(10))),
        ("bob", 2, "EARN", 200, None, None, None, None, "earn-bob", to_time(at(11))),
        ("bob", 3, "GRANT", 50, None, None, None, None, "grant-bob", to_time(at(11))),
        ("bob", 4, "REDEEMED", 20, None, None, None, None, "redeem-bob", to_time(at(12))),
        ("bob", 5, "ACCOUNT_CLOSED", 230, None, None, None, None, "close-bob", to_time(at(13))),
        ("bob", 6, "CARD_UNLINKED", 0, "CARD-B1", None, None, None, "unlink-b1", to_time(at(14))),
        ("carol", 1, "ACCOUNT_OPENED", 0, "CARD-C1", "P", None, {"jt": at(15)}, "open-carol", to_time(at(15))),
        ("carol", 2, "CARD_LINKED", 0, "CARD-X", "P", None, None, "link-x-carol", to_time(at(16))),
    ]
    # Closing forfeited every lot's points: the event's lot effects, and no lots left.
    assert json.loads(journal[14]["lots"]) == closed_lots
    assert _tuples(lots, 3) == [("alice", 2, 300)]
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).differences == []


@pytest.mark.parametrize("carol_first", [False, True], ids=["alice-link-then-carol", "carol-then-alice"])
async def test_a_moved_card_stays_on_its_new_account_whichever_account_is_applied_first(
    redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace, dsn: str, carol_first: bool
) -> None:
    t0 = clock.now_ms()

    rid = request_ids
    await ledger.create_account("alice", "CARD-A1", "open-alice", fingerprint("open-alice"))  # 1
    clock.set(t0 + 1000)
    await ledger.link_card("alice", "CARD-X", "P", **rid("link-x-alice"))  # 2
    clock.set(t0 + 2000)
    await ledger.set_card_state("CARD-X", "B", **rid("block-x"))  # 3
    clock.set(t0 + 3000)
    await ledger.unlink_card("alice", "CARD-X", **rid("unlink-x"))  # 4
    clock.set(t0 + 4000)
    await ledger.create_account("carol", "CARD-C1", "open-carol", fingerprint("open-carol"))  # 1
    clock.set(t0 + 5000)
    await ledger.link_card("carol", "CARD-X", "A", **rid("link-x-carol"))  # 2
    alice, carol = await deliveries(redis, keyspace, "alice"), await deliveries(redis, keyspace, "carol")
    assert [d.event.type for d in alice] == ["ACCOUNT_OPENED", "CARD_LINKED", "CARD_BLOCKED", "CARD_UNLINKED"]

    # Alice's stream is behind: carol's events (a batch of their own) are applied after alice's
    # link, or before it; alice's block and unlink, which she made before carol's link, come last.
    batches = [carol, alice[:2], alice[2:]] if carol_first else [alice[:2], carol, alice[2:]]
    x_on_carol = ("CARD-X", "carol", "A", "A", to_time(t0 + 5000), None, None)
    writer = JournalWriter(keyspace)
    async with connection(dsn) as conn:
        await conn.execute("SELECT journal_create_partitions(to_timestamp($1::bigint / 1000.0), 1)", t0)
        await writer.prepare(conn)
        for n, batch in enumerate(batches):
            assert len((await writer.apply(conn, batch)).applied) == len(batch)
            if n >= batches.index(carol):  # from carol's link on, the card is hers
                assert (await _cards(conn))[-1] == x_on_carol
        assert await _cards(conn) == [
            ("CARD-A1", "alice", "P", "A", to_time(t0), None, None),
            ("CARD-C1", "carol", "P", "A", to_time(t0 + 4000), None, None),
            x_on_carol,
        ]
        last_seqs = await conn.fetch("SELECT account_id, last_seq FROM accounts ORDER BY account_id")
    assert _tuples(last_seqs, 2) == [("alice", 4), ("carol", 2)]
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).differences == []


async def test_a_card_moved_within_one_batch_ends_on_its_new_account(
    redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace, dsn: str
) -> None:
    t0 = clock.now_ms()
    await ledger.create_account("alice", "CARD-X", "open-alice", fingerprint("open-alice"))  # 1
    clock.set(t0 + 1000)
    await ledger.link_card("alice", "CARD-A2", "P", request_id="link-a2", fingerprint=fingerprint("link-a2"))  # 2
    await ledger.unlink_card("alice", "CARD-X", request_id="unlink-x", fingerprint=fingerprint("unlink-x"))  # 3
    clock.set(t0 + 2000)
    await ledger.create_account("carol", "CARD-X", "open-carol", fingerprint("open-carol"))  # 1
    writer = JournalWriter(keyspace)
    async with connection(dsn) as conn:
        await conn.execute("SELECT journal_create_partitions(to_timestamp($1::bigint / 1000.0), 1)", t0)
        await writer.prepare(conn)
        alice = await deliveries(redis, keyspace, "alice")
        assert len((await writer.apply(conn, alice[:2])).applied) == 2
        # Carol's opening with the card and alice's unlink of it in one batch, carol's first.
        batch = [*await deliveries(redis, keyspace, "carol"), *alice[2:]]
        assert [d.event.type for d in batch] == ["ACCOUNT_OPENED", "CARD_UNLINKED"]
        assert len((await writer.apply(conn, batch)).applied) == 2
        assert await _cards(conn) == [
            ("CARD-A2", "alice", "P", "A", to_time(t0 + 1000), None, None),
            ("CARD-X", "carol", "P", "A", to_time(t0 + 2000), None, None),
        ]
        accounts = await conn.fetch("SELECT account_id, card_number FROM accounts ORDER BY account_id")
    # accounts.card_number stays the card the account was opened with.
    assert _tuples(accounts, 2) == [("alice", "CARD-X"), ("carol", "CARD-X")]
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).differences == []
