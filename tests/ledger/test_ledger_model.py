"""Random operation sequences against a small in-memory model of the ledger (hypothesis)."""

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
from tests.conftest import START_MS

POS = PointOfSaleRef("acme", "store-1", "till-1", 1)
ACCOUNT = "model-1"


@dataclass
class Lot:
    points: int
    expire_ms: int
    kind: str


@dataclass
class Model:
    """The ledger's rules in their plainest form: lots spent soonest-expiring first."""

    lots: dict[int, Lot] = field(default_factory=dict)
    holds: dict[int, tuple[int, int, list[tuple[int, int]]]] = field(default_factory=dict)  # pts, exp, alloc
    spent: dict[int, list[tuple[int, int]]] = field(default_factory=dict)

    def bucket_lot(self, expire_ms: int, kind: str) -> int | None:
        """The lot with points of this expiry and kind (one issuer here), if there is one: lots
        of one expiry, kind and issuer are one lot."""
        return next(
            (i for i, lot in self.lots.items() if lot.points and (lot.expire_ms, lot.kind) == (expire_ms, kind)), None
        )

    def give_back(self, lot_id: int, points: int) -> None:
        """To the lot itself if it still has points, else to its bucket's lot, else to itself again."""
        lot = self.lots[lot_id]
        target = lot_id if lot.points else self.bucket_lot(lot.expire_ms, lot.kind)
        self.lots[lot_id if target is None else target].points += points

    def available(self, now: int) -> int:
        return sum(lot.points for lot in self.lots.values() if lot.expire_ms > now)

    def take(self, points: int, now: int) -> list[tuple[int, int]]:
        order = sorted(
            (i for i, lot in self.lots.items() if lot.points > 0 and lot.expire_ms > now),
            key=lambda i: (self.lots[i].expire_ms, self.lots[i].kind != "L", i),
        )
        alloc, rest = [], points
        for lot_id in order:
            n = min(rest, self.lots[lot_id].points)
            if n:
                self.lots[lot_id].points -= n
                alloc.append((lot_id, n))
                rest -= n
        return alloc

    def expire_holds(self, now: int) -> None:
        for seq, (_, exp, alloc) in list(self.holds.items()):
            if exp <= now:
                for lot_id, n in alloc:
                    self.give_back(lot_id, n)
                del self.holds[seq]

    def view(self, now: int) -> list[tuple[int, int]]:
        return sorted((i, lot.points) for i, lot in self.lots.items() if lot.points > 0 and lot.expire_ms > now)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("grant"), st.integers(1, 500), st.integers(1, 20), st.sampled_from(["R", "L"])),
        st.tuples(st.just("hold"), st.integers(1, 400), st.integers(1, 10)),
        st.tuples(st.just("capture"), st.integers(0, 30), st.integers(0, 400)),
        st.tuples(st.just("void"), st.integers(0, 30)),
        st.tuples(st.just("redeem"), st.integers(1, 400)),
        st.tuples(st.just("refund"), st.integers(0, 30), st.integers(0, 400)),
        st.tuples(st.just("tick"), st.integers(1, 10)),
    ),
    min_size=1,
    max_size=40,
)


async def _run(redis_url: str, keyspace: Keyspace, ops: list[tuple[Any, ...]]) -> None:
    redis = Redis.from_url(redis_url)
    await redis.flushall()
    clock = ManualClock(START_MS)
    ledger = Ledger(redis, keyspace, clock, LedgerSettings(shards=keyspace.shards))
    model = Model()
    ids = iter(range(1, 10_000))

    async def attempt(call: Awaitable[OpResult]) -> OpResult | None:
        try:
            return await call
        except LedgerRefusal:
            return None

    def rid() -> str:
        return f"00000000-0000-4000-8000-{next(ids):012d}"

    await ledger.create_account(ACCOUNT, "card-model", rid(), "0" * 32)
    try:
        for op in ops:
            now = clock.now_ms()
            model.expire_holds(now)
            kind = op[0]
            if kind == "tick":
                clock.advance(int(op[1]) * 1000)
                continue
            if kind == "grant":
                _, points, days, lot_kind = op
                result = await attempt(
                    ledger.earn(ACCOUNT, points=int(points), expire_ms=now + int(days) * 1000,
                                kind=lot_kind, pos=POS, request_id=rid(), fingerprint="g" * 32, grant=True)
                )  # fmt: skip
                assert result is not None
                merged = model.bucket_lot(now + int(days) * 1000, str(lot_kind))
                assert [lot.lot_id for lot in result.lots] == [result.tx if merged is None else merged]
                if merged is None:
                    model.lots[result.tx] = Lot(int(points), now + int(days) * 1000, str(lot_kind))
                else:
                    model.lots[merged].points += int(points)
            elif kind in ("hold", "redeem"):
                points = int(op[1])
                enough = model.available(now) >= points
                if kind == "hold":
                    call = ledger.authorize(ACCOUNT, points=points, ttl_ms=int(op[2]) * 1000, pos=POS,
                                            request_id=rid(), fingerprint="h" * 32)  # fmt: skip
                else:
                    call = ledger.redeem(ACCOUNT, points=points, pos=POS, request_id=rid(), fingerprint="r" * 32)
                result = await attempt(call)
                assert (result is not None) == enough, (op, model)
                if result is not None:
                    alloc = model.take(points, now)
                    if kind == "hold":
                        model.holds[result.tx] = (points, now + int(op[2]) * 1000, alloc)
                    else:
                        model.spent[result.tx] = alloc
            elif kind in ("capture", "void"):
                holds = sorted(model.holds)
                target = holds[int(op[1]) % len(holds)] if holds else 999
                want = int(op[2]) if kind == "capture" and int(op[2]) > 0 else None
                if kind == "capture":
                    call = ledger.capture(ACCOUNT, target, points=want, request_id=rid(), fingerprint="c" * 32)
                else:
                    call = ledger.void(ACCOUNT, target, request_id=rid(), fingerprint="v" * 32)
                result = await attempt(call)
                open_hold = model.holds.get(target)
                ok = open_hold is not None and (want is None or want <= open_hold[0])
                assert (result is not None) == ok, (op, model)
                if result is not None and open_hold is not None:
                    take = 0 if kind == "void" else (open_hold[0] if want is None else want)
                    used: list[tuple[int, int]] = []
                    for lot_id, n in open_hold[2]:
                        spend = min(n, take)
                        take -= spend
                        model.give_back(lot_id, n - spend)
                        if spend:
                            used.append((lot_id, spend))
                    del model.holds[target]
                    if kind == "capture":
                        model.spent[result.tx] = used
            elif kind == "refund":
                spent = sorted(model.spent)
                target = spent[int(op[1]) % len(spent)] if spent else 999
                want = int(op[2]) or None
                result = await attempt(
                    ledger.refund(ACCOUNT, target, points=want, pos=None, request_id=rid(), fingerprint="f" * 32)
                )
                left = sum(n for _, n in model.spent.get(target, []))
                ok = target in model.spent and left > 0 and (want is None or want <= left)
                assert (result is not None) == ok, (op, model)
                if result is not None:
                    rest = left if want is None else want
                    alloc = model.spent[target]
                    for i in range(len(alloc) - 1, -1, -1):
                        lot_id, n = alloc[i]
                        give = min(n, rest)
                        rest -= give
                        alloc[i] = (lot_id, n - give)
                        model.give_back(lot_id, give)
            balance = await ledger.balance(ACCOUNT)
            now = clock.now_ms()
            model.expire_holds(now)
            assert [(lot.lot_id, lot.points) for lot in balance.lots] == sorted(
                model.view(now),
                key=lambda item: (model.lots[item[0]].expire_ms, model.lots[item[0]].kind != "L", item[0]),
            ), (op, model)
            assert balance.available == model.available(now)
            assert balance.held == sum(h[0] for h in model.holds.values())
    finally:
        await redis.aclose()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_random_operations_match_the_model(
    stack: EmbeddedStack, keyspace: Keyspace, ops: list[tuple[Any, ...]]
) -> None:
    asyncio.run(_run(stack.redis.url, keyspace, ops))
