"""What the write-behind tests drive and check: mixed till traffic through the ledger, and the
journal and balances as an operator would read them in PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypedDict

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from pointauth.server.clock import ManualClock
from pointauth.server.journal import WorkerConfig, WriteBehindWorker
from pointauth.server.journal.events import EntryId, StreamEntry
from pointauth.server.journal.pg import connection
from pointauth.server.journal.writer import Delivered
from pointauth.server.ledger import Keyspace, Ledger, LedgerRefusal, OpResult, PointOfSaleRef, ProfileChange, codec

DAY_MS = 86_400_000
TILL = PointOfSaleRef("acme", "store-7", "till-3", 1)


def fingerprint(request_id: str) -> str:
    return hashlib.sha256(request_id.encode()).hexdigest()[:32]


@dataclass
class Traffic:
    """Tills doing earn, hold, capture, void, redeem and refund on a few accounts.

    Each request keeps its request id across retries, so an operation interrupted by a Redis
    crash is retried until acknowledged, exactly as a till does; `acknowledged` holds the
    request ids of every operation the ledger answered OK.
    """

    ledger: Ledger
    clock: ManualClock
    accounts: list[str]
    seed: int = 7
    retry_connection_errors: bool = False
    acknowledged: set[str] = field(default_factory=set)
    # Account openings: their event carries no request id (the ledger does not pass it on).
    openings: set[str] = field(default_factory=set)
    refused: int = 0
    _holds: dict[str, list[int]] = field(default_factory=dict)
    _spends: dict[str, list[int]] = field(default_factory=dict)
    _counter: int = 0

    async def open_accounts(self) -> None:
        for i, account in enumerate(self.accounts):
            rid = self._rid()
            self.openings.add(rid)
            card = f"card-{account}-{i}"
            await self._call(rid, partial(self.ledger.create_account, account, card, rid, fingerprint(rid)))
            await self._earn(account, 500)

    def _rid(self) -> str:
        self._counter += 1
        return f"req-{self.seed}-{self._counter}"

    async def _call(self, rid: str, op: Callable[[], Awaitable[OpResult]]) -> OpResult | None:
        while True:
            try:
                result = await op()
            except LedgerRefusal:
                self.refused += 1
                return None
            except (RedisConnectionError, OSError):
                if not self.retry_connection_errors:
                    raise
                await asyncio.sleep(0.05)
                continue
            self.acknowledged.add(rid)
            return result

    async def _earn(self, account: str, points: int) -> None:
        rid = self._rid()
        exp = self.clock.now_ms() + 30 * DAY_MS
        result = await self._call(
            rid,
            lambda: self.ledger.earn(
                account, points=points, expire_ms=exp, kind="R", pos=TILL, request_id=rid, fingerprint=fingerprint(rid)
            ),
        )
        if result is not None:
            self._spends.setdefault(account, []).append(result.tx)

    async def run(self, operations: int, tills: int = 4) -> None:
        rng = random.Random(self.seed)
        per_till = operations // tills

        async def till(n: int) -> None:
            local = random.Random(rng.random() + n)
            for _ in range(per_till):
                await self.one(local)

        await asyncio.gather(*(till(n) for n in range(tills)))

    async def one(self, rng: random.Random) -> None:
        account = rng.choice(self.accounts)
        holds = self._holds.setdefault(account, [])
        kind = rng.choice(["earn", "earn", "hold", "hold", "capture", "void", "redeem", "refund"])
        rid = self._rid()
        fp = fingerprint(rid)
        if kind == "earn":
            await self._earn(account, rng.randint(1, 200))
        elif kind == "hold":
            pts = rng.randint(1, 60)
            r = await self._call(
                rid,
                lambda: self.ledger.authorize(
                    account, points=pts, ttl_ms=600_000, pos=TILL, request_id=rid, fingerprint=fp
                ),
            )
            if r is not None:
                holds.append(r.tx)
        elif kind in ("capture", "void") and holds:
            hold = holds.pop(rng.randrange(len(holds)))
            if kind == "capture":
                part = rng.choice([None, 1])
                r = await self._call(
                    rid, lambda: self.ledger.capture(account, hold, points=part, request_id=rid, fingerprint=fp)
                )
                if r is not None:
                    self._spends.setdefault(account, []).append(r.tx)
            else:
                await self._call(rid, lambda: self.ledger.void(account, hold, request_id=rid, fingerprint=fp))
        elif kind == "redeem":
            pts = rng.randint(1, 40)
            r = await self._call(
                rid, lambda: self.ledger.redeem(account, points=pts, pos=TILL, request_id=rid, fingerprint=fp)
            )
            if r is not None:
                self._spends.setdefault(account, []).append(r.tx)
        elif kind == "refund" and self._spends.get(account):
            orig = rng.choice(self._spends[account])
            await self._call(
                rid,
                lambda: self.ledger.refund(account, orig, points=1, pos=None, request_id=rid, fingerprint=fp),
            )

    def open_holds(self) -> dict[str, list[int]]:
        return {a: list(h) for a, h in self._holds.items() if h}


async def every_kind(ledger: Ledger, clock: ManualClock, account: str) -> dict[str, OpResult]:
    """One account through every operation, record type, hold state and event type, with known
    figures (see the comments: lot 2 regular, lot 3 limited-time and expiring first); returns
    each call's answer by the request id it used (a refusal's as well)."""
    t0 = clock.now_ms()
    answers: dict[str, OpResult] = {}

    async def call(rid: str, op: Callable[..., Awaitable[OpResult]], *args: Any, **kwargs: Any) -> None:
        try:
            answers[rid] = await op(*args, request_id=rid, fingerprint=fingerprint(rid), **kwargs)
        except LedgerRefusal as refusal:
            answers[rid] = refusal.result

    await call("open", lambda **kw: ledger.create_account(account, f"card-{account}", **kw))  # seq 1
    earn = {"pos": TILL, "kind": "R", "purchase_amount": 30_000, "purchase_ms": t0}
    await call("earn", ledger.earn, account, points=300, expire_ms=t0 + 30 * DAY_MS, **earn)  # 2: lot 2 = 300
    await call("grant", ledger.earn, account, points=100, expire_ms=t0 + DAY_MS, kind="L", pos=TILL, grant=True)  # 3
    hold = {"pos": TILL, "ttl_ms": 600_000}
    await call("hold-captured", ledger.authorize, account, points=150, **hold)  # 4: lot 3 100, lot 2 50
    await call("capture", ledger.capture, account, 4, points=120)  # 5: uses lot 3 100, lot 2 20; 30 back to lot 2
    await call("hold-voided", ledger.authorize, account, points=10, **hold)  # 6: lot 2 10
    await call("void", ledger.void, account, 6)  # 7
    await call("redeem", ledger.redeem, account, points=50, pos=TILL)  # 8: lot 2 50
    await call("refund-capture", ledger.refund, account, 5, points=30, pos=None)  # 9: lot 2 +20, lot 3 +10
    await call("refund-redemption", ledger.refund, account, 8, points=None, pos=None)  # 10: lot 2 +50
    await call("refund-earn", ledger.refund, account, 2, points=40, pos=None)  # 11: lot 2 -40
    await call("refused", ledger.redeem, account, points=1_000_000, pos=TILL)  # no event: a note
    await call("hold-expired", ledger.authorize, account, points=20, pos=TILL, ttl_ms=60_000)  # 12: lot 3 10, lot 2 10
    clock.advance(60_000)
    answers["expire-hold"] = await ledger.balance(account)  # 13: HOLD_EXPIRED
    clock.set(t0 + DAY_MS)
    answers["expire-lot"] = await ledger.balance(account)  # 14: LOTS_EXPIRED, lot 3's 10
    await call("hold-held", ledger.authorize, account, points=5, **hold)  # 15: lot 2 5, left open
    return answers


MEMBERS = ["alice", "bob", "carol"]


class RequestIds(TypedDict):
    request_id: str
    fingerprint: str


def request_ids(name: str) -> RequestIds:
    """A request's id, and a fingerprint of its own, as the ledger's mutations take them."""
    return {"request_id": name, "fingerprint": fingerprint(name)}


async def members_and_cards(ledger: Ledger, clock: ManualClock) -> None:
    """Every member and card event, a second apart from the clock's time t0 (see the comments):
    alice's cards linked, blocked, unblocked, reissued, one unlinked (and then linked to carol),
    her profile changed; bob's account closed with points in two lots, its card unlinked after."""
    t0 = clock.now_ms()

    rid = request_ids

    def at(seconds: int) -> None:
        clock.set(t0 + seconds * 1000)

    profile = ProfileChange(bd="0415", hc="acme", set_attrs={"tier": "gold", "lang": "en"})
    await ledger.create_account("alice", "CARD-A1", "open-alice", fingerprint("open-alice"), profile=profile)  # 1
    at(1)
    await ledger.earn("alice", points=300, expire_ms=t0 + 30 * DAY_MS, kind="R", pos=TILL, **rid("earn-alice"))  # 2
    at(2)
    await ledger.link_card("alice", "APP-A2", "A", **rid("link-a2"))  # 3
    at(3)
    await ledger.set_card_state("CARD-A1", "B", **rid("block-a1"))  # 4
    at(4)
    await ledger.set_card_state("CARD-A1", "A", **rid("unblock-a1"))  # 5
    at(5)
    await ledger.reissue_card("CARD-A1", "CARD-A3", "P", **rid("reissue-a1"))  # 6
    at(6)
    await ledger.link_card("alice", "CARD-X", "P", **rid("link-x-alice"))  # 7
    at(7)
    await ledger.unlink_card("alice", "CARD-X", **rid("unlink-x-alice"))  # 8
    at(8)
    change = ProfileChange(bd="0416", hc="", set_attrs={"vip": "y"}, drop_attrs=("lang",))
    await ledger.update_profile("alice", change, **rid("profile-alice"))  # 9
    at(9)
    await ledger.set_card_state("APP-A2", "B", **rid("block-a2"))  # 10

    at(10)
    joined = ProfileChange(jt=t0 - 365 * DAY_MS)
    await ledger.create_account("bob", "CARD-B1", "open-bob", fingerprint("open-bob"), kind="A", profile=joined)  # 1
    at(11)
    await ledger.earn("bob", points=200, expire_ms=t0 + 30 * DAY_MS, kind="R", pos=TILL, **rid("earn-bob"))  # 2: lot 2
    await ledger.earn(
        "bob", points=50, expire_ms=t0 + 10 * DAY_MS, kind="L", pos=TILL, grant=True, **rid("grant-bob")
    )  # 3: lot 3
    at(12)
    await ledger.redeem("bob", points=20, pos=TILL, **rid("redeem-bob"))  # 4: lot 3, expiring first
    at(13)
    await ledger.close("bob", **rid("close-bob"))  # 5: forfeits lot 3's 30 and lot 2's 200
    at(14)
    await ledger.unlink_card("bob", "CARD-B1", **rid("unlink-b1"))  # 6

    at(15)
    await ledger.create_account("carol", "CARD-C1", "open-carol", fingerprint("open-carol"))  # 1
    at(16)
    await ledger.link_card("carol", "CARD-X", "P", **rid("link-x-carol"))  # 2


MERGED = ["S", "T"]
KIOSK = PointOfSaleRef("partner", "store-9", "kiosk-1", 4)
"""A point of sale of another company: its lots have issuer "partner"."""


async def merged_pair(ledger: Ledger, clock: ManualClock) -> None:
    """Account S merged into T (request "merge-1", merge "S:merge-1"), a second apart from the clock's time t0 (see the
    comments): S with three lots in three buckets, two cards (one blocked) and a redemption
    partly refunded before the merge; after it, the rest of that redemption refunded on T (but
    10 points), and S's card blocked on T."""
    t0 = clock.now_ms()
    rid = request_ids

    def at(seconds: int) -> None:
        clock.set(t0 + seconds * 1000)

    await ledger.create_account("S", "S-CARD1", "open-s", fingerprint("open-s"))  # S 1
    at(1)
    await ledger.earn("S", points=300, expire_ms=t0 + 30 * DAY_MS, kind="R", pos=TILL, **rid("earn-s"))  # 2: lot 2
    at(2)
    limited = t0 + 10 * DAY_MS
    await ledger.earn("S", points=100, expire_ms=limited, kind="L", pos=TILL, grant=True, **rid("grant-s"))  # 3: lot 3
    at(3)
    await ledger.link_card("S", "APP-S2", "A", **rid("link-s2"))  # 4
    at(4)
    await ledger.set_card_state("APP-S2", "B", **rid("block-s2"))  # 5
    at(5)
    await ledger.redeem("S", points=130, pos=TILL, **rid("redeem-s"))  # 6: lot 3's 100, then lot 2's 30
    at(6)
    await ledger.refund("S", 6, points=10, pos=None, **rid("refund-s"))  # 7: 10 back to lot 2 (280)
    at(7)
    await ledger.earn("S", points=40, expire_ms=limited, kind="L", pos=KIOSK, grant=True, **rid("grant-s8"))  # 8: lot 8
    at(8)
    later = t0 + 60 * DAY_MS
    await ledger.earn("S", points=25, expire_ms=later, kind="R", pos=KIOSK, grant=True, **rid("grant-s9"))  # 9: lot 9
    at(9)
    await ledger.create_account("T", "T-CARD1", "open-t", fingerprint("open-t"))  # T 1
    at(10)
    await ledger.earn("T", points=50, expire_ms=t0 + 30 * DAY_MS, kind="R", pos=TILL, **rid("earn-t"))  # T 2: lot 2
    at(11)
    # S 10 MERGED_OUT; T 3 MERGED_IN: S's lot 8 becomes T's lot 3 (the event's seq), lot 2 joins
    # T's lot 2 (330), lot 9 becomes T's lot 3 + 2^40.
    await ledger.merge("S", "T", actor="desk-7", why="same member, two cards", **rid("merge-1"))
    at(12)
    # T 4: 110 of S's redemption (of 120 left): 20 back to T's lot 2 (350), 90 to a new lot 4 (the
    # bucket of S's lot 3, which T does not have).
    await ledger.refund_following("S", 6, points=110, pos=None, **rid("refund-after-merge"))
    at(13)
    await ledger.set_card_state("S-CARD1", "B", **rid("block-s1"))  # T 5


async def deliveries(redis: Redis, keyspace: Keyspace, account: str) -> list[Delivered]:
    """The account's events as the worker receives them from its shard's stream."""
    stream = keyspace.account(account).events
    entries: list[tuple[bytes, dict[bytes, bytes]]] = await redis.xrange(stream)  # type: ignore[assignment]
    out = []
    for entry_id, fields in entries:
        event = codec.decode_stream_entry(fields)
        if isinstance(event, codec.Event) and event.account == account:
            entry = StreamEntry(stream, keyspace.shard_of(account), EntryId.parse(entry_id), fields)
            out.append(Delivered(entry, event))
    return out


async def redis_seqs(redis: Redis, keyspace: Keyspace, accounts: list[str]) -> dict[str, int]:
    async with redis.pipeline(transaction=False) as pipe:
        for account in accounts:
            pipe.hget(keyspace.account(account).account, codec.SEQ_FIELD)
        replies: list[Any] = await pipe.execute()
    return {a: int(r) for a, r in zip(accounts, replies, strict=True) if r is not None}


async def wait_until_applied(
    redis: Redis, dsn: str, keyspace: Keyspace, accounts: list[str], within_s: float = 30.0
) -> None:
    """Until PostgreSQL's last applied sequence of every account equals Redis's."""
    deadline = time.monotonic() + within_s
    while True:
        expected = await redis_seqs(redis, keyspace, accounts)
        async with connection(dsn) as conn:
            rows = await conn.fetch("SELECT account_id, last_seq FROM accounts")
        applied = {r["account_id"]: r["last_seq"] for r in rows}
        if applied == expected:
            return
        if time.monotonic() > deadline:
            behind = {a: (s, applied.get(a)) for a, s in expected.items() if applied.get(a) != s}
            raise AssertionError(f"PostgreSQL did not catch up: (Redis seq, PostgreSQL seq) {behind}")
        await asyncio.sleep(0.1)


async def assert_journal_complete(redis: Redis, dsn: str, keyspace: Keyspace, accounts: list[str]) -> int:
    """Every account's journal is 1..seq (Redis's seq), each event once; returns the row count."""
    expected = await redis_seqs(redis, keyspace, accounts)
    async with connection(dsn) as conn:
        rows = await conn.fetch(
            "SELECT account_id, count(*) AS n, count(DISTINCT seq) AS distinct_seqs, min(seq) AS lo, max(seq) AS hi"
            " FROM journal GROUP BY account_id"
        )
        doubled = await conn.fetch("SELECT event_id FROM journal GROUP BY event_id HAVING count(*) > 1")
    assert doubled == []
    found = {r["account_id"]: (r["n"], r["distinct_seqs"], r["lo"], r["hi"]) for r in rows}
    assert found == {a: (seq, seq, 1, seq) for a, seq in expected.items()}
    return sum(expected.values())


async def assert_acknowledged_journaled(traffic: Traffic, dsn: str) -> None:
    """Every request the ledger acknowledged is in the journal (by its request id)."""
    async with connection(dsn) as conn:
        opened = await conn.fetchval("SELECT count(*) FROM journal WHERE type = 'ACCOUNT_OPENED'")
    assert opened == len(traffic.accounts)
    missing = traffic.acknowledged - traffic.openings - await journal_request_ids(dsn)
    assert missing == set()


async def journal_request_ids(dsn: str) -> set[str]:
    async with connection(dsn) as conn:
        rows = await conn.fetch("SELECT request_id FROM journal WHERE request_id IS NOT NULL")
    return {r["request_id"] for r in rows}


async def assert_balances_match(ledger: Ledger, dsn: str, accounts: list[str]) -> None:
    """The balance the ledger answers equals the one PostgreSQL holds (no lot has expired)."""
    async with connection(dsn) as conn:
        lots = await conn.fetch("SELECT account_id, sum(points) AS pts FROM lots GROUP BY account_id")
        holds = await conn.fetch(
            "SELECT account_id, sum(points) AS pts FROM holds WHERE state = 'HELD' GROUP BY account_id"
        )
    available = {r["account_id"]: int(r["pts"]) for r in lots}
    held = {r["account_id"]: int(r["pts"]) for r in holds}
    for account in accounts:
        balance = await ledger.balance(account)
        assert (balance.available, balance.held) == (available.get(account, 0), held.get(account, 0)), account


FAST = WorkerConfig(
    consumer="test-worker",
    batch_size=200,
    poll_ms=10,
    claim_idle_ms=500,
    housekeeping_s=0.2,
    trim_s=0.2,
    backoff_initial_s=0.05,
    backoff_max_s=0.5,
)


@contextlib.asynccontextmanager
async def running_worker(
    redis_url: str, dsn: str, keyspace: Keyspace, config: WorkerConfig = FAST
) -> AsyncIterator[WriteBehindWorker]:
    """A worker in this process, on its own Redis client; stopped (and its errors raised) at exit."""
    async with worker_task(redis_url, dsn, keyspace, config) as (worker, _):
        yield worker


@contextlib.asynccontextmanager
async def worker_task(
    redis_url: str, dsn: str, keyspace: Keyspace, config: WorkerConfig = FAST
) -> AsyncIterator[tuple[WriteBehindWorker, asyncio.Task[None]]]:
    """`running_worker`, with the task running it: a test can see whether the worker is still alive."""
    redis = Redis.from_url(redis_url)
    worker = WriteBehindWorker(redis, dsn, keyspace, config)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield worker, task
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, 30)
        finally:
            await redis.aclose()
