"""Concurrent openings of accounts that share a card: one winner, and both stores agree on it."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from pointauth.server.clock import ManualClock
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.journal.pg import connection
from pointauth.server.ledger import Keyspace, Ledger, LedgerRefusal
from pointauth.server.ops import reconcile
from tests.journal.support import fingerprint, running_worker, wait_until_applied

RACES = 30


async def test_racing_openings_of_one_card_agree_in_redis_and_postgresql(
    stack: EmbeddedStack, redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace, dsn: str
) -> None:
    winners: dict[str, str] = {}
    for race in range(RACES):
        card = f"40000000007{race:05d}"
        rids = [f"open-{race}-a", f"open-{race}-b"]
        accounts = [f"racer-{race}-a", f"racer-{race}-b"]
        results = await asyncio.gather(
            *(
                ledger.create_account(account, card, rid, fingerprint(rid))
                for account, rid in zip(accounts, rids, strict=True)
            ),
            return_exceptions=True,
        )
        won = [a for a, r in zip(accounts, results, strict=True) if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, BaseException)]
        assert len(won) == 1
        assert [(type(r), r.result.reason) for r in refused if isinstance(r, LedgerRefusal)] == [
            (LedgerRefusal, "CARD_ALREADY_LINKED")
        ]
        winners[card] = won[0]
    async with running_worker(stack.redis.url, dsn, keyspace):
        await wait_until_applied(redis, dsn, keyspace, sorted(winners.values()))
    async with connection(dsn) as conn:
        cards = {
            r["card_number"]: r["account_id"] for r in await conn.fetch("SELECT card_number, account_id FROM cards")
        }
        opened = await conn.fetchval("SELECT count(*) FROM journal WHERE type = 'ACCOUNT_OPENED'")
        opened_accounts = {r["account_id"] for r in await conn.fetch("SELECT account_id FROM accounts")}
    assert cards == winners
    assert opened == RACES
    assert opened_accounts == set(winners.values())
    report = await reconcile(redis, dsn, keyspace, settle_seconds=0)
    assert report.differences == []
    assert report.accounts == RACES
