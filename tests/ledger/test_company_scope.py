"""The ledger script's company check (ledger.lua, CO_SCOPED): a capture, void or refund made for
a caller bound to a company (`company=`) acts only on holds and transactions of that company's
points of sale; another company's is answered exactly as an unknown id, before the replay check,
writing nothing (no idempotency record, no stream entry); no company is no check."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from pointauth.server.ledger import Keyspace, Ledger, LedgerRefusal, PointOfSaleRef, codec
from tests.helpers import account_state
from tests.journal.support import fingerprint

ACME = PointOfSaleRef("acme", "store-1", "till-1", 1)
PARTNER = PointOfSaleRef("partner", "store-9", "kiosk-1", 1)
ACCOUNT = "member-co"
DAY_MS = 86_400_000


@pytest.fixture
async def opened(ledger: Ledger) -> str:
    await ledger.create_account(ACCOUNT, "4000000000008001", "open", fingerprint("open"))
    await ledger.earn(
        ACCOUNT, points=1000, expire_ms=ledger.clock.now_ms() + 30 * DAY_MS, kind="R", pos=ACME,
        request_id="grant", fingerprint=fingerprint("grant"), grant=True,
    )  # fmt: skip
    return ACCOUNT


async def hold(ledger: Ledger, pos: PointOfSaleRef, rid: str) -> int:
    result = await ledger.authorize(ACCOUNT, points=100, ttl_ms=60_000, pos=pos, request_id=rid, fingerprint=rid)
    return result.tx


async def refusal(call: Any) -> codec.OpResult:
    with pytest.raises(LedgerRefusal) as raised:
        await call
    return raised.value.result


class Untouched:
    """The account, its shard's whole stream (idempotency notes too) and the named request ids'
    records are the same after the block."""

    def __init__(self, redis: Redis, keyspace: Keyspace, *request_ids: str) -> None:
        self.redis, self.keyspace, self.request_ids = redis, keyspace, request_ids

    async def snapshot(self) -> tuple[Any, ...]:
        keys = self.keyspace.account(ACCOUNT)
        records = [await self.redis.get(self.keyspace.idempotency(ACCOUNT, r)) for r in self.request_ids]
        return (
            await account_state(self.redis, self.keyspace, ACCOUNT),
            await self.redis.hgetall(keys.transactions),
            await self.redis.xrange(keys.events),
            records,
        )

    async def __aenter__(self) -> None:
        self.before = await self.snapshot()

    async def __aexit__(self, *exc: object) -> None:
        if exc[0] is None:
            assert await self.snapshot() == self.before


def shape(result: codec.OpResult, seq: int) -> tuple[str, str, str, dict[str, str]]:
    """What the caller is told (code, reason, message with the id's seq left out, metadata)."""
    return result.code, result.reason, result.message.replace(f".{seq}", ".<seq>"), result.meta


async def test_another_companys_hold_and_transaction_are_unknown_ids_and_nothing_changes(
    ledger: Ledger, redis: Redis, keyspace: Keyspace, opened: str
) -> None:
    theirs = await hold(ledger, PARTNER, "partner-hold")
    sold = await ledger.redeem(ACCOUNT, points=50, pos=PARTNER, request_id="partner-redeem", fingerprint="r" * 32)
    unknown = 9999
    async with Untouched(redis, keyspace, "acme-capture", "acme-void", "acme-refund"):
        refused = {
            "capture": await refusal(
                ledger.capture(
                    ACCOUNT, theirs, points=10, request_id="acme-capture", fingerprint="c" * 32, company="acme"
                )
            ),
            "void": await refusal(
                ledger.void(ACCOUNT, theirs, request_id="acme-void", fingerprint="v" * 32, company="acme")
            ),
            "refund": await refusal(
                ledger.refund(
                    ACCOUNT,
                    sold.tx,
                    points=None,
                    pos=None,
                    request_id="acme-refund",
                    fingerprint="f" * 32,
                    company="acme",
                )
            ),
        }
    # An unknown id, asked the same way (these refusals are remembered, as always).
    unknown_hold = await refusal(
        ledger.capture(ACCOUNT, unknown, points=10, request_id="u1", fingerprint="c" * 32, company="acme")
    )
    unknown_tx = await refusal(
        ledger.refund(ACCOUNT, unknown, points=None, pos=None, request_id="u2", fingerprint="f" * 32, company="acme")
    )
    assert shape(refused["capture"], theirs) == shape(unknown_hold, unknown)
    assert shape(refused["void"], theirs) == shape(unknown_hold, unknown)
    assert shape(refused["refund"], sold.tx) == shape(unknown_tx, unknown)
    assert shape(unknown_hold, unknown) == ("NOT_FOUND", "HOLD_NOT_FOUND", f"no hold {ACCOUNT}.<seq>", {})
    assert shape(unknown_tx, unknown)[:2] == ("NOT_FOUND", "TRANSACTION_NOT_FOUND")

    # The owner's company, and a caller bound to none, act as before.
    captured = await ledger.capture(
        ACCOUNT, theirs, points=10, request_id="partner-capture", fingerprint="p" * 32, company="partner"
    )
    assert (captured.pts, captured.released) == (10, 90)
    refunded = await ledger.refund(
        ACCOUNT, sold.tx, points=None, pos=None, request_id="operator-refund", fingerprint="o" * 32
    )
    assert refunded.pts == 50
    ours = await hold(ledger, ACME, "acme-hold")
    assert (await ledger.void(ACCOUNT, ours, request_id="acme-void-2", fingerprint="w" * 32, company="acme")).released


async def test_another_companys_replay_of_a_request_id_learns_nothing(
    ledger: Ledger, redis: Redis, keyspace: Keyspace, opened: str
) -> None:
    theirs = await hold(ledger, PARTNER, "partner-hold")
    first = await ledger.capture(
        ACCOUNT, theirs, points=30, request_id="partner-capture", fingerprint="p" * 32, company="partner"
    )
    async with Untouched(redis, keyspace, "partner-capture"):
        # The owner's very request (its answer would be replayed), and another body under its id
        # (IDEMPOTENCY_KEY_REUSED would say the id is taken): both an unknown hold.
        for points, fp in ((30, "p" * 32), (31, "q" * 32)):
            replayed = await refusal(
                ledger.capture(ACCOUNT, theirs, points=points, request_id="partner-capture", fingerprint=fp,
                               company="acme")
            )  # fmt: skip
            assert (replayed.code, replayed.reason) == ("NOT_FOUND", "HOLD_NOT_FOUND")
    again = await ledger.capture(
        ACCOUNT, theirs, points=30, request_id="partner-capture", fingerprint="p" * 32, company="partner"
    )
    assert again == first


async def test_a_merged_accounts_transaction_is_checked_on_the_record_the_call_brings(
    ledger: Ledger, redis: Redis, keyspace: Keyspace, opened: str
) -> None:
    """A refund of a transaction of an account merged into this one checks the record passed with
    the call (the merged account's), and tells it apart from an unknown one no more."""
    sold = await ledger.redeem(ACCOUNT, points=50, pos=PARTNER, request_id="partner-redeem", fingerprint="r" * 32)
    raw = await redis.hget(keyspace.account(ACCOUNT).transactions, codec.record_field(sold.tx))
    assert isinstance(raw, bytes)
    await ledger.create_account("target", "4000000000008002", "open-target", fingerprint("open-target"))

    def refund(company: str) -> Any:
        return ledger.refund(
            "target", sold.tx, points=None, pos=None, request_id=f"refund-{company}", fingerprint="f" * 32,
            foreign=(ACCOUNT, raw), company=company,
        )  # fmt: skip

    theirs = await refusal(refund("acme"))
    assert shape(theirs, sold.tx) == (
        "NOT_FOUND",
        "TRANSACTION_NOT_FOUND",
        f"no refundable transaction {ACCOUNT}.<seq>",
        {},
    )
    assert await redis.exists(keyspace.idempotency("target", "refund-acme")) == 0
    assert (await refund("partner")).pts == 50
