"""A merge's process killed (SIGKILL) between the saga's steps: a server starting afterwards
finishes it (the recovery pass), and no point is lost or doubled, no lot loses its expiry, kind
or issuer, and every card resolves to the target."""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap

import pytest
from redis.asyncio import Redis

from pointauth.server.app import PointauthServer
from pointauth.server.clock import ManualClock
from pointauth.server.config import Settings
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.ledger import Keyspace, Ledger, LotEntry, PointOfSaleRef, codec
from pointauth.server.ops.reconcile import reconcile
from tests.conftest import DAY_MS, START_MS
from tests.helpers import account_state, stream_events
from tests.journal.support import assert_journal_complete, running_worker, wait_until_applied

ACME = PointOfSaleRef("acme", "store-1", "till-1", 1)
PARTNER = PointOfSaleRef("partner", "store-9", "kiosk-1", 4)
CARDS = ("4000000000000101", "4000000000000102", "4000000000000103")

# Runs one merge in its own process and kills that process (SIGKILL) at the named point.
MERGER = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from redis.asyncio import Redis
    from pointauth.server.clock import ManualClock
    from pointauth.server.config import LedgerSettings
    from pointauth.server.ledger import Keyspace, Ledger

    url, point, now = sys.argv[1], sys.argv[2], int(sys.argv[3])

    async def main() -> None:
        ledger = Ledger(Redis.from_url(url), Keyspace(16), ManualClock(now), LedgerSettings(shards=16))
        moved = 0
        if point == "after step 1":
            async def die(source: str) -> bool:
                os.kill(os.getpid(), signal.SIGKILL)
                return False
            ledger.finish_merge = die
        else:
            fcall = ledger._fcall
            async def counting(function, keys, args):
                nonlocal moved
                if function == ledger.library.move_card_function:
                    if point == "after step 2" or moved == 1:
                        os.kill(os.getpid(), signal.SIGKILL)
                    moved += 1
                return await fcall(function, keys, args)
            ledger._fcall = counting
        await ledger.merge("source", "target", request_id="merge-1", fingerprint="f" * 32, actor="desk", why="test")

    asyncio.run(main())
    """
)


async def open_pair(ledger: Ledger) -> None:
    await ledger.create_account("source", CARDS[0], "open-s", "f" * 32)
    await ledger.create_account("target", CARDS[2], "open-t", "f" * 32)
    await ledger.link_card("source", CARDS[1], "A", request_id="link", fingerprint="f" * 32)
    for account, points, expire_ms, pos, rid in (
        ("source", 100, START_MS + 10 * DAY_MS, ACME, "g1"),
        ("source", 40, START_MS + 20 * DAY_MS, PARTNER, "g2"),
        ("target", 30, START_MS + 10 * DAY_MS, ACME, "g3"),
    ):
        await ledger.earn(
            account, points=points, expire_ms=expire_ms, kind="R", pos=pos, request_id=rid, fingerprint="f" * 32,
            grant=True,
        )  # fmt: skip


@pytest.mark.parametrize("point", ["after step 1", "after step 2", "between two cards"])
async def test_a_merge_killed_midway_is_finished_by_the_next_server_start(
    point: str,
    stack: EmbeddedStack,
    ledger: Ledger,
    redis: Redis,
    keyspace: Keyspace,
    settings: Settings,
    clock: ManualClock,
    dsn: str,
) -> None:
    await open_pair(ledger)
    merger = await asyncio.create_subprocess_exec(
        sys.executable, "-c", MERGER, stack.redis.url, point, str(clock.now_ms()), stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await merger.communicate()
    assert merger.returncode == -signal.SIGKILL, stderr.decode()
    # Step 1 is durable: the source is merged out and its merge is on the shard's list.
    source = await account_state(redis, keyspace, "source")
    assert (source.status, source.merged_into, source.lots) == ("M", "target", {})
    assert await redis.zrange(keyspace.account("source").merges, 0, -1) == [b"source"]

    async with PointauthServer(settings, clock, sweeper=False):
        pass  # its start runs the recovery pass

    target = await account_state(redis, keyspace, "target")
    # The acme lot joined the target's lot of its expiry, kind and issuer (seq 2, its grant); the
    # partner lot is new, its id the MERGED_IN event's seq (3).
    assert target.lots == {
        2: LotEntry(2, 130, START_MS + 10 * DAY_MS, "R", "acme"),
        3: LotEntry(3, 40, START_MS + 20 * DAY_MS, "R", "partner"),
    }
    assert (target.lot_points, target.held_points) == (170, 0)
    assert set(target.cards) == set(CARDS)
    assert target.cards[CARDS[1]].kind == "A"
    for card in CARDS:
        assert codec.decode_card_owner(await redis.hget(keyspace.card_bucket(card), card)) == "target"
    assert await redis.zcard(keyspace.account("source").merges) == 0
    merged_in = [e for e in await stream_events(redis, keyspace, "target") if e.type == "MERGED_IN"]
    assert [(e.merge, e.pts) for e in merged_in] == [("source:merge-1", 140)]  # applied once
    # Recovery again, and the merge's retry, change nothing.
    assert await ledger.finish_merges() == 0
    retried = await ledger.merge(
        "source", "target", request_id="merge-1", fingerprint="f" * 32, actor="desk", why="test"
    )
    assert retried.pts == 140
    assert await account_state(redis, keyspace, "target") == target
    # The journal: both accounts' events, each once and without a gap; reconcile finds nothing.
    async with running_worker(stack.redis.url, dsn, keyspace):
        await wait_until_applied(redis, dsn, keyspace, ["source", "target"])
    assert await assert_journal_complete(redis, dsn, keyspace, ["source", "target"]) == 5 + 3
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).differences == []
