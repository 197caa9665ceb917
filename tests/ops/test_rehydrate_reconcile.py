"""Redis lost: `rehydrate` rebuilds it from PostgreSQL, reconcile passes, and the tills carry on
(open holds resolve, refunds work, a retried request gets its first answer). And reconcile
names every account that differs."""

from __future__ import annotations

import asyncio
import io

import msgspec
import pytest
from redis.asyncio import Redis

from pointauth.server.clock import ManualClock
from pointauth.server.config import LedgerSettings, PostgresSettings, RedisSettings, Settings
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.ledger import Keyspace, Ledger, LedgerRefusal, codec
from pointauth.server.ops import RehydrateRefused, reconcile, reconcile_command, rehydrate
from pointauth.server.ops.progress import ProgressBar
from tests.helpers import account_state
from tests.journal.support import (
    TILL,
    Traffic,
    assert_balances_match,
    assert_journal_complete,
    fingerprint,
    running_worker,
    wait_until_applied,
)

ACCOUNTS = [f"member-{i}" for i in range(8)]
RETENTION_MS = 90 * 86_400_000


async def test_flushed_redis_is_rehydrated_and_holds_still_resolve(
    stack: EmbeddedStack, redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace, dsn: str
) -> None:
    traffic = Traffic(ledger, clock, ACCOUNTS)
    await traffic.open_accounts()
    await traffic.run(600)
    hold = await ledger.authorize(
        "member-0", points=25, ttl_ms=600_000, pos=TILL, request_id="keep", fingerprint="k" * 32
    )
    first_answer = await ledger.redeem("member-1", points=3, pos=TILL, request_id="retry-me", fingerprint="r" * 32)
    async with running_worker(stack.redis.url, dsn, keyspace):
        await wait_until_applied(redis, dsn, keyspace, ACCOUNTS)
    balances = {a: await ledger.balance(a) for a in ACCOUNTS}
    open_holds = traffic.open_holds()
    stored = await _stored(redis, keyspace, ACCOUNTS)

    await redis.flushall()  # Redis lost
    progress = io.StringIO()
    report = await rehydrate(
        redis, dsn, keyspace, now_ms=clock.now_ms(), transaction_retention_ms=RETENTION_MS,
        progress=ProgressBar("accounts", progress),
    )  # fmt: skip
    assert report.accounts == len(ACCOUNTS)
    assert f"{len(ACCOUNTS)}/{len(ACCOUNTS)} accounts" in progress.getvalue()
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).differences == []
    # Every record back as it was (all are within the refund window), every account hash too but
    # for x0, which may start later: pruning had not yet passed seqs that have no record.
    assert await _stored(redis, keyspace, ACCOUNTS) == stored
    assert {a: await ledger.balance(a) for a in ACCOUNTS} == balances
    assert await ledger.account_for_card("card-member-3-3") == "member-3"
    # The accounts' own card fields came back too: a call on the card passes the script's check.
    on_card = await ledger.on_card("card-member-3-3", lambda a: ledger.balance(a, card="card-member-3-3"))
    assert on_card == ("member-3", balances["member-3"])

    # The tills carry on: a retry gets its first answer; open holds capture and void.
    again = await ledger.redeem("member-1", points=3, pos=TILL, request_id="retry-me", fingerprint="r" * 32)
    assert again == first_answer
    captured = await ledger.capture("member-0", hold.tx, points=10, request_id="cap-keep", fingerprint="c" * 32)
    assert (captured.pts, captured.released) == (10, 15)
    for n, (account, seqs) in enumerate(open_holds.items()):
        for seq in seqs:
            await ledger.void(account, seq, request_id=f"void-{n}-{seq}", fingerprint="v" * 32)
    with pytest.raises(LedgerRefusal, match="HOLD_ALREADY_CAPTURED"):
        await ledger.void("member-0", hold.tx, request_id="late-void", fingerprint="v" * 32)
    refund = await ledger.refund(
        "member-0", captured.tx, points=4, pos=None, request_id="ref-keep", fingerprint="f" * 32
    )
    assert refund.pts == 4
    assert [(await ledger.balance(a)).held for a in ACCOUNTS] == [0] * len(ACCOUNTS)

    # The new events follow on in PostgreSQL without a gap.
    async with running_worker(stack.redis.url, dsn, keyspace):
        await wait_until_applied(redis, dsn, keyspace, ACCOUNTS)
    await assert_journal_complete(redis, dsn, keyspace, ACCOUNTS)
    await assert_balances_match(ledger, dsn, ACCOUNTS)
    assert (await reconcile(redis, dsn, keyspace, settle_seconds=0)).differences == []


async def test_rehydrate_refuses_while_events_wait_in_the_streams(
    redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace, dsn: str
) -> None:
    await ledger.create_account("carol", "card-carol", "open-carol", fingerprint("open-carol"))
    with pytest.raises(RehydrateRefused, match="1 events in 1 streams"):
        await rehydrate(redis, dsn, keyspace, now_ms=clock.now_ms(), transaction_retention_ms=RETENTION_MS)
    assert (await account_state(redis, keyspace, "carol")).seq == 1  # untouched


async def test_reconcile_lists_every_difference_and_exits_non_zero(
    stack: EmbeddedStack, redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace, dsn: str
) -> None:
    traffic = Traffic(ledger, clock, ACCOUNTS[:4])
    await traffic.open_accounts()
    async with running_worker(stack.redis.url, dsn, keyspace):
        await wait_until_applied(redis, dsn, keyspace, ACCOUNTS[:4])
    settings = Settings(
        redis=RedisSettings(url=stack.redis.url),
        postgres=PostgresSettings(dsn=dsn),
        ledger=LedgerSettings(shards=keyspace.shards),
    )
    out = io.StringIO()
    assert await _reconcile_cli(settings, out) == 0
    assert "4 accounts compared" in out.getvalue()

    # Damage Redis four ways: a changed lot, a lost account, an account PostgreSQL never saw, and
    # an account that lost its card (the field the ledger script checks for every card call).
    member_0 = await account_state(redis, keyspace, "member-0")
    lot = member_0.lots[min(member_0.lots)]
    changed = msgspec.structs.replace(lot, points=1, expire_ms=1, kind="R")
    await redis.zrem(keyspace.account("member-0").lots, codec.lot_member(lot))
    await redis.zadd(keyspace.account("member-0").lots, {codec.lot_member(changed): codec.lot_score(1, "R")})
    await redis.hincrby(
        keyspace.account("member-0").account, codec.LOT_POINTS_FIELD, 1 - lot.points
    )  # totals still agree
    await redis.delete(keyspace.account("member-1").account)
    ghost = codec.encode_account(codec.StoredAccount(seq=3, x0=1))
    await redis.hset(keyspace.account("ghost").account, mapping=ghost.fields)  # type: ignore[arg-type]
    [card] = (await account_state(redis, keyspace, "member-2")).cards
    await redis.hdel(keyspace.account("member-2").account, codec.card_field(card))
    out = io.StringIO()
    assert await _reconcile_cli(settings, out) == 1
    listing = out.getvalue()
    assert f"member-2: cards on the account: Redis none, PostgreSQL {card}" in listing
    assert f"member-0: lot {lot.lot_id}: Redis 1:1:R:acme" in listing
    assert "member-1: account: Redis missing, PostgreSQL at seq 2" in listing
    assert "ghost: account: Redis at seq 3, PostgreSQL missing" in listing
    assert "DIFFER for 4 accounts" in listing


async def _stored(
    redis: Redis, keyspace: Keyspace, accounts: list[str]
) -> dict[str, tuple[codec.StoredAccount, dict[int, codec.TransactionRecord]]]:
    """Per account: its hash (x0 left out) and its transaction records, decoded."""
    out = {}
    for account in accounts:
        state = msgspec.structs.replace(await account_state(redis, keyspace, account), x0=None)
        raw: dict[bytes, bytes] = await redis.hgetall(keyspace.account(account).transactions)  # type: ignore[assignment]
        out[account] = (state, {int(seq): codec.decode_record(packed) for seq, packed in raw.items()})
    return out


async def _reconcile_cli(settings: Settings, out: io.StringIO) -> int:
    """The CLI command runs its own event loop: call it from a thread, as the CLI's process would."""
    return await asyncio.to_thread(reconcile_command, settings, 0.0, out)
