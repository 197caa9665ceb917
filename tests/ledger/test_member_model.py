"""Random sequences of merges, card moves and till operations on a few accounts, against a
plain model (hypothesis): every answer and every account's lots, cards and status match it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from pointauth.server.clock import ManualClock
from pointauth.server.config import LedgerSettings
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.ledger import Keyspace, Ledger, LedgerRefusal, OpResult, PointOfSaleRef
from tests.conftest import DAY_MS, START_MS
from tests.helpers import account_state

ACCOUNTS = ("a1", "a2", "a3")
CARDS = ("4000000000000011", "4000000000000012", "4000000000000013", "4000000000000014", "4000000000000015")
# Each issuer's lots have expiries of their own, so the spending order never rests on lot ids.
BUCKETS = ((START_MS + 10 * DAY_MS, "acme"), (START_MS + 20 * DAY_MS, "partner"), (START_MS + 30 * DAY_MS, "acme"))
Bucket = tuple[int, str]


@dataclass
class Account:
    merged_into: str | None = None
    buckets: dict[Bucket, int] = field(default_factory=dict)


@dataclass
class Redemption:
    account: str
    seq: int
    taken: list[tuple[Bucket, int]]
    refunded: bool = False


@dataclass
class Model:
    accounts: dict[str, Account]
    cards: dict[str, tuple[str, str]]
    """Linked cards: card -> (account, state "A" or "B")."""
    redemptions: list[Redemption] = field(default_factory=list)

    def final(self, account: str) -> str:
        while (target := self.accounts[account].merged_into) is not None:
            account = target
        return account

    def card_refusal(self, card: str) -> str | None:
        if card not in self.cards:
            return "CARD_NOT_FOUND"
        return "CARD_BLOCKED" if self.cards[card][1] == "B" else None


operations = st.lists(
    st.one_of(
        st.tuples(st.just("earn"), st.sampled_from(CARDS), st.integers(1, 300), st.sampled_from(BUCKETS)),
        st.tuples(st.just("redeem"), st.sampled_from(CARDS), st.integers(1, 400)),
        st.tuples(st.just("link"), st.sampled_from(ACCOUNTS), st.sampled_from(CARDS)),
        st.tuples(st.just("unlink"), st.sampled_from(ACCOUNTS), st.sampled_from(CARDS)),
        st.tuples(st.just("block"), st.sampled_from(CARDS), st.booleans()),
        st.tuples(st.just("merge"), st.sampled_from(ACCOUNTS), st.sampled_from(ACCOUNTS)),
        st.tuples(st.just("refund"), st.integers(0, 20)),
    ),
    min_size=1,
    max_size=40,
)


async def _run(redis_url: str, keyspace: Keyspace, ops: list[tuple[Any, ...]]) -> None:
    redis = Redis.from_url(redis_url)
    await redis.flushall()
    ledger = Ledger(redis, keyspace, ManualClock(START_MS), LedgerSettings(shards=keyspace.shards))
    counter = 0

    def rid() -> dict[str, Any]:
        nonlocal counter
        counter += 1
        return {"request_id": f"r-{counter}", "fingerprint": f"{counter:032d}"}

    async def outcome(call: Awaitable[Any]) -> tuple[str | None, Any]:
        try:
            return None, await call
        except LedgerRefusal as refusal:
            return refusal.result.reason, None

    model = Model({a: Account() for a in ACCOUNTS}, {})
    for i, account in enumerate(ACCOUNTS):
        await ledger.create_account(account, CARDS[i], **rid())
        model.cards[CARDS[i]] = (account, "A")

    for op in ops:
        kind = op[0]
        if kind == "earn":
            _, card, points, bucket = op
            expected = model.card_refusal(card)
            args = rid()

            def earn(
                a: str, c: str = card, p: int = points, b: Bucket = bucket, r: dict[str, Any] = args
            ) -> Awaitable[OpResult]:
                pos = PointOfSaleRef(b[1], "s", "t", 1)
                return ledger.earn(a, points=p, expire_ms=b[0], kind="R", pos=pos, grant=True, card=c, **r)

            reason, answer = await outcome(ledger.on_card(card, earn))
            assert reason == expected, op
            if answer is not None:
                owner = model.final(model.cards[card][0])
                assert answer[0] == owner
                model.accounts[owner].buckets[bucket] = model.accounts[owner].buckets.get(bucket, 0) + points
        elif kind == "redeem":
            _, card, points = op
            expected = model.card_refusal(card)
            holder = model.final(model.cards[card][0]) if card in model.cards else None
            if expected is None and holder is not None and sum(model.accounts[holder].buckets.values()) < points:
                expected = "INSUFFICIENT_POINTS"
            args = rid()

            def redeem(a: str, c: str = card, p: int = points, r: dict[str, Any] = args) -> Awaitable[OpResult]:
                return ledger.redeem(a, points=p, pos=PointOfSaleRef("acme", "s", "t", 1), card=c, **r)

            reason, answer = await outcome(ledger.on_card(card, redeem))
            assert reason == expected, op
            if answer is not None:
                assert holder is not None
                assert answer[0] == holder
                rest, taken = points, []
                buckets = model.accounts[holder].buckets
                for bucket in sorted(b for b, n in buckets.items() if n):
                    n = min(rest, buckets[bucket])
                    if n:
                        buckets[bucket] -= n
                        taken.append((bucket, n))
                        rest -= n
                model.redemptions.append(Redemption(holder, answer[1].tx, taken))
        elif kind == "link":
            _, account, card = op
            merged = model.accounts[account].merged_into
            # The card index is claimed before the account is asked.
            expected = "CARD_ALREADY_LINKED" if card in model.cards else "ACCOUNT_MERGED" if merged else None
            reason, _ = await outcome(ledger.link_card(account, card, "P", **rid()))
            assert reason == expected, op
            if reason is None:
                model.cards[card] = (account, "A")
        elif kind == "unlink":
            _, account, card = op
            merged = model.accounts[account].merged_into
            mine = model.cards.get(card, ("", ""))[0] == account
            expected = "ACCOUNT_MERGED" if merged else None if mine else "CARD_NOT_FOUND"
            reason, _ = await outcome(ledger.unlink_card(account, card, **rid()))
            assert reason == expected, op
            if reason is None:
                del model.cards[card]
        elif kind == "block":
            _, card, block = op
            expected = None if card in model.cards else "CARD_NOT_FOUND"
            reason, _ = await outcome(ledger.set_card_state(card, "B" if block else "A", **rid()))
            assert reason == expected, op
            if reason is None:
                model.cards[card] = (model.cards[card][0], "B" if block else "A")
        elif kind == "merge":
            _, source, target = op
            if source == target:
                continue
            s, t = model.accounts[source], model.accounts[target]
            expected = "ACCOUNT_MERGED" if t.merged_into or s.merged_into else None
            args = rid()
            reason, _ = await outcome(ledger.merge(source, target, actor="desk", why="model", **args))
            assert reason == expected, op
            if reason is None:
                for bucket, n in s.buckets.items():
                    t.buckets[bucket] = t.buckets.get(bucket, 0) + n
                s.buckets, s.merged_into = {}, target
                for card, (owner, state) in list(model.cards.items()):
                    if owner == source:
                        model.cards[card] = (target, state)
        elif kind == "refund":
            if not model.redemptions:
                continue
            redemption = model.redemptions[op[1] % len(model.redemptions)]
            expected = "REFUND_EXCEEDS_ORIGINAL" if redemption.refunded else None
            args = rid()
            reason, answer = await outcome(
                ledger.refund_following(redemption.account, redemption.seq, points=None, pos=None, **args)
            )
            assert reason == expected, op
            if answer is not None:
                lands = model.final(redemption.account)
                assert answer[0] == lands
                for bucket, n in redemption.taken:
                    model.accounts[lands].buckets[bucket] = model.accounts[lands].buckets.get(bucket, 0) + n
                redemption.refunded = True

        for account, expected_account in model.accounts.items():
            stored = await account_state(redis, keyspace, account)
            held: dict[Bucket, int] = {}
            for lot in stored.lots.values():
                held[(lot.expire_ms, lot.issuer_id)] = held.get((lot.expire_ms, lot.issuer_id), 0) + lot.points
            assert held == {b: n for b, n in expected_account.buckets.items() if n}, (op, account)
            assert stored.merged_into == expected_account.merged_into
            assert {c: link.state for c, link in stored.cards.items()} == {
                c: state for c, (owner, state) in model.cards.items() if owner == account
            }, (op, account)
        for card, (owner, _) in model.cards.items():
            assert await redis.hget(keyspace.card_bucket(card), card) == owner.encode()
    await redis.aclose()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_merges_card_moves_and_till_calls_match_the_model(
    stack: EmbeddedStack, keyspace: Keyspace, ops: list[tuple[Any, ...]]
) -> None:
    asyncio.run(_run(stack.redis.url, keyspace, ops))
