"""Proves Redis and PostgreSQL agree: per account, the state Redis stores (sequence, lots, open
holds, card link, hold index) equals the PostgreSQL projection of the journal.

Both sides are compared as stored, not as of a "now": Redis keeps an expired lot or hold until
the next script call on the account, and so does the projection, which changes only by events.
An account whose Redis sequence is ahead of PostgreSQL's has events still on their way; it is
compared again until it catches up or `settle_seconds` have passed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from pointauth.server.ledger import Keyspace
from pointauth.server.writebehind.pg import Connection, connection

PAGE = 2000

# (points, expiry ms, kind, issuer) per lot id; (points, expiry ms) per open hold seq.
Lots = dict[int, tuple[int, int, str, str]]
Holds = dict[int, tuple[int, int]]


@dataclass(frozen=True)
class Difference:
    account_id: str
    what: str
    redis: str
    postgres: str

    def __str__(self) -> str:
        return f"{self.account_id}: {self.what}: Redis {self.redis}, PostgreSQL {self.postgres}"


@dataclass
class ReconcileReport:
    accounts: int = 0
    differences: list[Difference] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.differences

    @property
    def accounts_per_second(self) -> float:
        return self.accounts / self.seconds if self.seconds else 0.0


@dataclass
class _Side:
    seq: int = 0
    lots: Lots = field(default_factory=dict)
    holds: Holds = field(default_factory=dict)
    card: str | None = None


async def reconcile(
    redis: Redis, dsn: str, keyspace: Keyspace, *, settle_seconds: float = 5.0, page: int = PAGE
) -> ReconcileReport:
    started = time.perf_counter()
    report = ReconcileReport()
    suspects: dict[str, list[Difference]] = {}
    async with connection(dsn) as conn:
        seen: set[str] = set()
        after = ""
        while True:
            rows = await conn.fetch(
                "SELECT account_id FROM accounts WHERE account_id > $1 ORDER BY account_id LIMIT $2", after, page
            )
            if not rows:
                break
            accounts = [r["account_id"] for r in rows]
            after = accounts[-1]
            seen.update(accounts)
            suspects.update(await _compare(redis, conn, keyspace, accounts))
            report.accounts += len(accounts)
        # Accounts Redis has and PostgreSQL does not (not yet, or never).
        only_redis: list[str] = []
        async for key in redis.scan_iter(match=f"{keyspace.prefix}:{{s*}}:a:*", count=1000):
            account = (key.decode() if isinstance(key, bytes) else str(key)).split(":a:", 1)[1]
            if account not in seen:
                only_redis.append(account)
        for i in range(0, len(only_redis), page):
            suspects.update(await _compare(redis, conn, keyspace, only_redis[i : i + page]))
        report.accounts += len(only_redis)
        # Differences may be events in flight: look again until they settle.
        deadline = time.monotonic() + settle_seconds
        while suspects and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            suspects = await _compare(redis, conn, keyspace, sorted(suspects))
    report.differences = [d for diffs in suspects.values() for d in diffs]
    report.seconds = time.perf_counter() - started
    return report


async def _compare(
    redis: Redis, conn: Connection, keyspace: Keyspace, accounts: list[str]
) -> dict[str, list[Difference]]:
    pg = await _postgres_sides(conn, accounts)
    rd = await _redis_sides(redis, keyspace, accounts, pg)
    out: dict[str, list[Difference]] = {}
    for account in accounts:
        diffs = list(_differences(account, rd.get(account), pg.get(account)))
        if diffs:
            out[account] = diffs
    return out


async def _postgres_sides(conn: Connection, accounts: list[str]) -> dict[str, _Side]:
    sides = {
        r["account_id"]: _Side(seq=r["last_seq"], card=r["card_number"])
        for r in await conn.fetch(
            "SELECT a.account_id, a.last_seq, c.card_number FROM accounts a"
            " LEFT JOIN cards c ON c.account_id = a.account_id AND c.card_number = a.card_number"
            " WHERE a.account_id = ANY($1::text[])",
            accounts,
        )
    }
    for r in await conn.fetch(
        "SELECT account_id, lot_id, points, expire_ms, kind, issuer_id FROM lots WHERE account_id = ANY($1::text[])",
        accounts,
    ):
        sides[r["account_id"]].lots[r["lot_id"]] = (r["points"], r["expire_ms"], r["kind"], r["issuer_id"])
    for r in await conn.fetch(
        "SELECT account_id, seq, points, expire_ms FROM transactions"
        " WHERE account_id = ANY($1::text[]) AND type = 'HOLD' AND state = 'HELD'",
        accounts,
    ):
        sides[r["account_id"]].holds[r["seq"]] = (r["points"], r["expire_ms"])
    return sides


async def _redis_sides(redis: Redis, keyspace: Keyspace, accounts: list[str], pg: dict[str, _Side]) -> dict[str, _Side]:
    async with redis.pipeline(transaction=False) as pipe:
        for account in accounts:
            pipe.hgetall(keyspace.account(account).account)
        for account in accounts:
            side = pg.get(account)
            if side is not None and side.card is not None:
                pipe.hget(keyspace.card_bucket(side.card), side.card)
            for seq in sorted(side.holds) if side is not None else ():
                pipe.zscore(keyspace.account(account).holds, f"{account}.{seq}")
        replies: list[Any] = await pipe.execute()
    sides: dict[str, _Side] = {}
    for account, stored in zip(accounts, replies, strict=False):
        if stored:
            sides[account] = _parse_account_hash(stored)
    rest = iter(replies[len(accounts) :])
    for account in accounts:
        side = pg.get(account)
        if side is None:
            continue
        found = sides.get(account)
        if side.card is not None:
            owner = next(rest)
            if found is not None and owner is not None and owner.decode() == account:
                found.card = side.card
        for seq in sorted(side.holds):
            score = next(rest)
            # The hold index entry is what lets the sweeper expire the hold: it must be there.
            if found is not None and seq in found.holds and score is None:
                found.holds[seq] = (found.holds[seq][0], -1)
    return sides


def _parse_account_hash(stored: dict[bytes, bytes]) -> _Side:
    side = _Side()
    for raw_field, raw_value in stored.items():
        name, value = raw_field.decode(), raw_value.decode()
        if name == "seq":
            side.seq = int(value)
        elif name.startswith("l:"):
            pts, exp, kind, issuer = value.split(":", 3)
            side.lots[int(name[2:])] = (int(pts), int(exp), kind, issuer)
        elif name.startswith("h:"):
            pts, exp = value.split(":")
            side.holds[int(name[2:])] = (int(pts), int(exp))
    return side


def _differences(account: str, rd: _Side | None, pg: _Side | None) -> Iterable[Difference]:
    if rd is None and pg is None:
        return
    if rd is None:
        yield Difference(account, "account", "missing", f"at seq {pg.seq}" if pg else "")
        return
    if pg is None:
        yield Difference(account, "account", f"at seq {rd.seq}", "missing")
        return
    if rd.seq != pg.seq:
        yield Difference(account, "seq", str(rd.seq), str(pg.seq))
    for lot_id in sorted(rd.lots.keys() | pg.lots.keys()):
        if rd.lots.get(lot_id) != pg.lots.get(lot_id):
            yield Difference(account, f"lot {lot_id}", _fmt(rd.lots.get(lot_id)), _fmt(pg.lots.get(lot_id)))
    for seq in sorted(rd.holds.keys() | pg.holds.keys()):
        r, p = rd.holds.get(seq), pg.holds.get(seq)
        if r != p:
            what = f"hold {seq}" + (" (not in the hold index)" if r is not None and r[1] == -1 else "")
            yield Difference(account, what, _fmt(r), _fmt(p))
    if pg.card is not None and rd.card != pg.card:
        yield Difference(account, "card", "not linked", pg.card)


def _fmt(value: tuple[Any, ...] | None) -> str:
    return "absent" if value is None else ":".join(str(v) for v in value)
