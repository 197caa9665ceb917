"""Proves Redis and PostgreSQL agree, per account: the state Redis stores (sequence, lots, open
holds, cards and their states, status, profile, merge, merge history, refund states of merged
accounts' transactions, rule counts and first earn, rank and visit limits, coupons, hold index,
card index) equals the PostgreSQL
projection of the journal; and the journal itself is complete, holding the account's events
1..last_seq once each, which add up to the points Redis holds. And beside the accounts: the group
directory, the published rule sets (and the current version) and the campaigns' budget counts
(ops/rules.py says when a budget count differs).

Both sides are compared as stored, not as of a "now": Redis keeps an expired lot or hold until
the next script call on the account, and so does the projection, which changes only by events.
An account whose Redis sequence is ahead of PostgreSQL's has events still on their way; it is
compared again until it catches up or `settle_seconds` have passed.

The journal is read in one aggregate pass, a row per account beside its accounts row: account by
account, a journal laid out by time would cost a random read per event.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from redis.asyncio import Redis

from pointauth.server.clock import to_ms
from pointauth.server.journal.pg import Connection, Record, connection
from pointauth.server.journal.writer import (
    ACCOUNT_MEMBER_COLUMNS,
    CARD_ROW_COLUMNS,
    account_coupons,
    card_from_row,
    foreign_refunds,
    merge_histories,
    profile_from_row,
    rule_counts_from_row,
    visits_from_row,
)
from pointauth.server.ledger import Keyspace, codec
from pointauth.server.ops import directory as group_directory
from pointauth.server.ops import rules as ops_rules
from pointauth.server.ops.directory import DirectoryDifference
from pointauth.server.ops.rules import RulesDifference

PAGE = 2000


@dataclass(frozen=True)
class Difference:
    account_id: str
    what: str
    redis: str
    postgres: str
    text: str = ""
    """Said instead of the two sides where they would not tell what is wrong (the journal's)."""

    def __str__(self) -> str:
        if self.text:
            return f"{self.account_id}: {self.text}"
        return f"{self.account_id}: {self.what}: Redis {self.redis}, PostgreSQL {self.postgres}"


@dataclass
class ReconcileReport:
    accounts: int = 0
    differences: list[Difference] = field(default_factory=list)
    seconds: float = 0.0
    directory: list[DirectoryDifference] = field(default_factory=list)
    """Where the group directory's companies, stores and terminals differ."""
    rules: list[RulesDifference] = field(default_factory=list)
    """Where the rule sets, the current version and the campaigns' budget counts differ."""

    @property
    def ok(self) -> bool:
        return not self.differences and not self.directory and not self.rules

    @property
    def accounts_per_second(self) -> float:
        return self.accounts / self.seconds if self.seconds else 0.0


# What an event adds to the account's points, from what the journal keeps of it: `points`, the
# hold's `released`, and `lots`, each lot's signed change of unheld points. Three sums, each
# compared with what Redis stores:
# - the balance (available + held, as stored: expired lots count until an event expires them)
#   from `points` by type: earning and granting add; redeeming, capturing and expiring lots take
#   away, and so does closing the account (forfeiting every lot's points); a merge takes every
#   lot's points off the source (MERGED_OUT) and adds them to the target (MERGED_IN); a refund
#   gives back what a capture or redemption spent, or takes back what an earn gave (its lot
#   effects' sign says which, on whichever account it lands); a visit (check-in) adds like an
#   earn; holds move points between available and held, so add nothing, and neither do opening
#   the account, the events of its cards and profile, rank reviews and using a coupon;
# - the unheld points, Redis's lots: the sum of the lot effects;
# - the held points, Redis's holds: each hold authorized, less each captured (with what its
#   capture released), voided or expired.
_EVENT_TYPES = (
    "ACCOUNT_OPENED", "EARN", "GRANT", "HOLD_AUTHORIZED", "HOLD_CAPTURED", "HOLD_VOIDED", "HOLD_EXPIRED",
    "REDEEMED", "REFUNDED", "LOTS_EXPIRED", "CARD_LINKED", "CARD_UNLINKED", "CARD_BLOCKED", "CARD_UNBLOCKED",
    "CARD_REISSUED", "PROFILE_UPDATED", "ACCOUNT_CLOSED", "MERGED_OUT", "MERGED_IN", "VISIT", "RANK_REVIEWED",
    "COUPON_USED",
)  # fmt: skip
_BALANCE = """CASE type
    WHEN 'EARN' THEN points WHEN 'GRANT' THEN points WHEN 'VISIT' THEN points
    WHEN 'REDEEMED' THEN -points WHEN 'HOLD_CAPTURED' THEN -points WHEN 'LOTS_EXPIRED' THEN -points
    WHEN 'ACCOUNT_CLOSED' THEN -points WHEN 'MERGED_OUT' THEN -points WHEN 'MERGED_IN' THEN points
    WHEN 'REFUNDED' THEN coalesce(sign((lots -> 0 ->> 1)::bigint), 0)::bigint * points
    ELSE 0 END"""
_UNHELD = "(SELECT coalesce(sum((effect ->> 1)::bigint), 0) FROM jsonb_array_elements(lots) AS effect)"
_HELD = """CASE type
    WHEN 'HOLD_AUTHORIZED' THEN points
    WHEN 'HOLD_CAPTURED' THEN -(points + coalesce(released, 0))
    WHEN 'HOLD_VOIDED' THEN -points WHEN 'HOLD_EXPIRED' THEN -points
    ELSE 0 END"""
_KNOWN = ", ".join(f"'{t}'" for t in _EVENT_TYPES)

# Per account, the journal's figures and the accounts row's last_seq, in one snapshot (the worker
# writes both in one transaction). {where} is empty for the whole journal, or picks accounts.
_JOURNAL_TOTALS = f"""
SELECT coalesce(a.account_id, j.account_id) AS account_id, a.last_seq,
       coalesce(j.events, 0) AS events, coalesce(j.seqs, 0) AS seqs, j.first_seq, j.last_journal_seq,
       coalesce(j.balance, 0) AS balance, coalesce(j.unheld, 0) AS unheld, coalesce(j.held, 0) AS held,
       coalesce(j.unknown, 0) AS unknown
FROM (SELECT account_id, last_seq FROM accounts {{where}}) AS a
FULL JOIN (
    SELECT account_id, count(*) AS events, count(DISTINCT seq) AS seqs, min(seq) AS first_seq,
           max(seq) AS last_journal_seq, sum({_BALANCE})::bigint AS balance, sum({_UNHELD})::bigint AS unheld,
           sum({_HELD})::bigint AS held, count(*) FILTER (WHERE type NOT IN ({_KNOWN})) AS unknown
    FROM journal {{where}}
    GROUP BY account_id
) AS j ON j.account_id = a.account_id
"""

# For accounts whose journal is not 1..last_seq: the runs of missing seqs, and the seqs present
# more than once or beyond last_seq. Their journal rows are read once, through the index.
_JOURNAL_GAPS = """
WITH a AS (
    SELECT u.account_id, acc.last_seq
    FROM unnest($1::text[]) AS u(account_id) JOIN accounts AS acc USING (account_id)
), present AS (
    SELECT j.account_id, j.seq, count(*) AS n FROM a JOIN journal AS j USING (account_id) GROUP BY j.account_id, j.seq
), missing AS (
    SELECT a.account_id, s.seq, s.seq - row_number() OVER (PARTITION BY a.account_id ORDER BY s.seq) AS run
    FROM a CROSS JOIN LATERAL generate_series(1, a.last_seq) AS s(seq)
    LEFT JOIN present AS p ON p.account_id = a.account_id AND p.seq = s.seq
    WHERE p.seq IS NULL
)
SELECT account_id, 'missing' AS kind, min(seq) AS first, max(seq) AS last FROM missing GROUP BY account_id, run
UNION ALL
SELECT p.account_id, CASE WHEN p.seq > a.last_seq THEN 'beyond' ELSE 'repeated' END, p.seq, p.seq
FROM present AS p JOIN a USING (account_id)
WHERE p.n > 1 OR p.seq > a.last_seq
ORDER BY account_id, kind, first
"""
_LISTED = 20


@dataclass(frozen=True)
class _Journal:
    last_seq: int | None
    """The accounts row's; None without one."""
    events: int
    seqs: int
    first_seq: int | None
    last_journal_seq: int | None
    balance: int
    unheld: int
    held: int
    unknown: int

    @property
    def complete(self) -> bool:
        n = self.last_seq or 0
        return self.events == self.seqs == n and (n == 0 or (self.first_seq, self.last_journal_seq) == (1, n))


@dataclass
class _Side:
    seq: int = 0
    lots: dict[int, codec.LotEntry] = field(default_factory=dict)
    holds: dict[int, codec.HoldEntry] = field(default_factory=dict)
    lot_points: int = 0
    held_points: int = 0
    """The account hash's totals (Redis's side): the script keeps them equal to the sums."""
    cards: dict[str, codec.CardLink] = field(default_factory=dict)
    """Redis: the account hash's card fields; PostgreSQL: the cards table's rows."""
    status: codec.AccountStatusCode = "A"
    opened_ms: int | None = None
    closed_ms: int | None = None
    profile: codec.MemberProfile = field(default_factory=codec.MemberProfile)
    merged_into: str | None = None
    merge_id: str | None = None
    merged_ms: int | None = None
    merges_in: dict[str, codec.MergeIn] = field(default_factory=dict)
    """The merges into the account (its mh: fields), by merge id."""
    foreign_refunds: dict[str, str] = field(default_factory=dict)
    """The refund states of transactions of accounts merged into it (its f: fields)."""
    rule_counts: dict[str, int] = field(default_factory=dict)
    """The capped rules' counts for the member (its k:<rule> fields)."""
    first_earn_ms: int | None = None
    """The member's first earn (its fe field)."""
    rank_id: str | None = None
    """The member's rank, qualifying spend and rank period (its rk, rs and rp fields)."""
    rank_spend: int = 0
    rank_period: int | None = None
    visits: dict[str, int] = field(default_factory=dict)
    """The day each visit limit key last gave points (its v:<key> fields)."""
    coupons: dict[str, codec.CouponEntry] = field(default_factory=dict)
    """The member's coupons (its q:<coupon id> fields)."""
    unindexed: set[int] = field(default_factory=set)
    """Open holds missing from the hold index (so the sweeper would never expire them)."""
    card_owners: dict[str, str | None] = field(default_factory=dict)
    """Redis: the account each card of the account (on either side) has in the card index."""
    undecodable: str = ""
    """Why the account's keys could not be read, if they could not."""


async def reconcile(
    redis: Redis, dsn: str, keyspace: Keyspace, *, settle_seconds: float = 5.0, page: int = PAGE
) -> ReconcileReport:
    started = time.perf_counter()
    report = ReconcileReport()
    suspects: dict[str, list[Difference]] = {}
    async with connection(dsn) as conn:
        seen: set[str] = set()
        async with conn.transaction():  # a cursor lives in a transaction
            cursor = await conn.cursor(_JOURNAL_TOTALS.format(where=""))
            while rows := await cursor.fetch(page):
                journal = {r["account_id"]: _journal(r) for r in rows}
                accounts = list(journal)
                seen.update(accounts)
                suspects.update(await _compare(redis, conn, keyspace, accounts, journal))
                report.accounts += len(accounts)
        # Accounts Redis has and PostgreSQL does not (not yet, or never).
        only_redis: list[str] = []
        async for key in redis.scan_iter(match=keyspace.account_hash_pattern(), count=1000):
            account = keyspace.account_of_hash(key)
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
        # The group directory, whose changes may be in flight too.
        report.directory = await group_directory.differences(redis, conn, keyspace)
        while report.directory and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            report.directory = await group_directory.differences(redis, conn, keyspace)
        # The rule sets, whose publications may be in flight too, and the budget counts, which
        # earns in flight hold above PostgreSQL's (ops/rules.py): looked at twice at least, so
        # that a count that moves is never taken for one that stays put.
        rules = await ops_rules.compare(redis, conn, keyspace)
        first_budgets, looks = rules.redis_budgets, 1
        while not rules.settled and (time.monotonic() < deadline or looks < 2):
            await asyncio.sleep(0.2)
            rules = await ops_rules.compare(redis, conn, keyspace, first_budgets)
            looks += 1
        report.rules = rules.differences
    report.differences = [d for diffs in suspects.values() for d in diffs]
    report.seconds = time.perf_counter() - started
    return report


async def _compare(
    redis: Redis,
    conn: Connection,
    keyspace: Keyspace,
    accounts: list[str],
    journal: dict[str, _Journal] | None = None,
) -> dict[str, list[Difference]]:
    pg = await _postgres_sides(conn, accounts)
    rd = await _redis_sides(redis, keyspace, accounts, pg)
    journal = dict(journal or {})
    # Journal figures from before this page's projection was read are read again where the
    # account has moved since, so that all three describe the same events.
    stale = [a for a in accounts if a not in journal or (a in pg and journal[a].last_seq != pg[a].seq)]
    if stale:
        journal.update(await _journal_totals(conn, stale))
    gaps = await _journal_gaps(conn, [a for a in accounts if a in journal and not journal[a].complete])
    out: dict[str, list[Difference]] = {}
    for account in accounts:
        diffs = list(_differences(account, rd.get(account), pg.get(account)))
        diffs += _journal_differences(account, journal.get(account), rd.get(account), pg.get(account), gaps)
        if diffs:
            out[account] = diffs
    return out


def _journal(r: Record) -> _Journal:
    return _Journal(
        r["last_seq"], r["events"], r["seqs"], r["first_seq"], r["last_journal_seq"],
        r["balance"], r["unheld"], r["held"], r["unknown"],
    )  # fmt: skip


async def _journal_totals(conn: Connection, accounts: list[str]) -> dict[str, _Journal]:
    query = _JOURNAL_TOTALS.format(where="WHERE account_id = ANY($1::text[])")
    return {r["account_id"]: _journal(r) for r in await conn.fetch(query, accounts)}


async def _journal_gaps(conn: Connection, accounts: list[str]) -> dict[str, list[Difference]]:
    """What is wrong with these accounts' journal sequences, said seq by seq."""
    if not accounts:
        return {}
    found: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
    for r in await conn.fetch(_JOURNAL_GAPS, accounts):
        found[(r["account_id"], r["kind"])].append((r["first"], r["last"]))
    wording = {"missing": "is missing seq {}", "repeated": "has seq {} more than once", "beyond": "has seq {} beyond"}
    out: dict[str, list[Difference]] = defaultdict(list)
    for (account, kind), runs in sorted(found.items()):
        listed = _runs(runs)
        text = "journal " + wording[kind].format(listed)
        if kind == "beyond":
            text += " the account's last_seq"
        out[account].append(Difference(account, f"journal seqs {kind}", "", listed, text))
    return out


def _runs(runs: list[tuple[int, int]]) -> str:
    shown = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs[:_LISTED])
    return shown + (f" and {len(runs) - _LISTED} more" if len(runs) > _LISTED else "")


def _journal_differences(
    account: str, j: _Journal | None, rd: _Side | None, pg: _Side | None, gaps: dict[str, list[Difference]]
) -> list[Difference]:
    if j is None:
        return []
    out: list[Difference] = []
    if j.last_seq is None:
        text = f"journal has {j.events} events of an account PostgreSQL has no accounts row for"
        out.append(Difference(account, "journal account", "", "missing", text))
    elif not j.complete:
        # No gap found when read again (a repair meanwhile): say what the pass saw.
        saw = f"journal has {j.events} events for seq 1..{j.last_seq}"
        out += gaps.get(account) or [Difference(account, "journal seqs", "", f"{j.events} events", saw)]
    if j.unknown:
        text = f"journal has {j.unknown} events of unknown type"
        out.append(Difference(account, "journal types", "", str(j.unknown), text))
    if rd is None or j.last_seq is None:
        return out
    if rd.seq != j.last_seq:
        if pg is not None and pg.seq == rd.seq:  # else the projection's seq difference says it
            text = f"journal is at seq {j.last_seq}, Redis at seq {rd.seq}"
            out.append(Difference(account, "journal seq", str(rd.seq), str(j.last_seq), text))
        return out
    unheld = sum(lot.points for lot in rd.lots.values())
    held = sum(hold.points for hold in rd.holds.values())
    if j.balance != unheld + held:
        text = f"journal sums to {j.balance} points, Redis holds {unheld + held}"
        out.append(Difference(account, "journal balance", str(unheld + held), str(j.balance), text))
    if j.unheld != unheld:
        text = f"journal's lot effects sum to {j.unheld} points, Redis's lots hold {unheld}"
        out.append(Difference(account, "journal lots", str(unheld), str(j.unheld), text))
    if j.held != held:
        text = f"journal's holds sum to {j.held} points, Redis holds {held} on hold"
        out.append(Difference(account, "journal holds", str(held), str(j.held), text))
    return out


async def _postgres_sides(conn: Connection, accounts: list[str]) -> dict[str, _Side]:
    sides = {
        r["account_id"]: _Side(
            seq=r["last_seq"],
            status=r["status"],
            opened_ms=None if r["opened_at"] is None else to_ms(r["opened_at"]),
            closed_ms=None if r["closed_at"] is None else to_ms(r["closed_at"]),
            profile=profile_from_row(r["profile"]),
            merged_into=r["merged_into"],
            merge_id=r["merge_id"],
            merged_ms=None if r["merged_at"] is None else to_ms(r["merged_at"]),
            rule_counts=rule_counts_from_row(r["rule_counts"]),
            first_earn_ms=None if r["first_earn_at"] is None else to_ms(r["first_earn_at"]),
            rank_id=r["rank_id"],
            rank_spend=r["rank_spend"],
            rank_period=r["rank_period"],
            visits=visits_from_row(r["visits"]),
        )
        for r in await conn.fetch(
            f"SELECT account_id, last_seq, {ACCOUNT_MEMBER_COLUMNS} FROM accounts WHERE account_id = ANY($1::text[])",
            accounts,
        )
    }
    for r in await conn.fetch(
        "SELECT account_id, lot_id, points, expire_ms, kind, issuer_id FROM lots WHERE account_id = ANY($1::text[])",
        accounts,
    ):
        sides[r["account_id"]].lots[r["lot_id"]] = codec.LotEntry(
            r["lot_id"], r["points"], r["expire_ms"], r["kind"], r["issuer_id"]
        )
    for r in await conn.fetch(
        "SELECT account_id, seq, points, expire_ms FROM transactions"
        " WHERE account_id = ANY($1::text[]) AND type = 'HOLD' AND state = 'HELD'",
        accounts,
    ):
        sides[r["account_id"]].holds[r["seq"]] = codec.HoldEntry(r["points"], r["expire_ms"])
    for r in await conn.fetch(
        f"SELECT {CARD_ROW_COLUMNS} FROM cards WHERE account_id = ANY($1::text[]) ORDER BY card_number", accounts
    ):
        if r["account_id"] in sides:
            sides[r["account_id"]].cards[r["card_number"]] = card_from_row(r)
    known = list(sides)
    for account, history in (await merge_histories(conn, known)).items():
        sides[account].merges_in = history
    for account, states in (await foreign_refunds(conn, known)).items():
        sides[account].foreign_refunds = states
    for account, coupons in (await account_coupons(conn, known)).items():
        sides[account].coupons = coupons
    return sides


async def _redis_sides(redis: Redis, keyspace: Keyspace, accounts: list[str], pg: dict[str, _Side]) -> dict[str, _Side]:
    async with redis.pipeline(transaction=False) as pipe:
        for account in accounts:
            keys = keyspace.account(account)
            pipe.hgetall(keys.account)
            pipe.zrange(keys.lots, 0, -1, withscores=True)
            pipe.zrange(keys.open_holds, 0, -1, withscores=True)
        replies: list[Any] = await pipe.execute()
    sides: dict[str, _Side] = {}
    for i, account in enumerate(accounts):
        stored, lots, holds = replies[3 * i : 3 * i + 3]
        if stored:
            sides[account] = _parse_account(stored, lots, holds)
    # The indexes, for what the accounts have: the card index entry of every card of the account
    # (Redis's or PostgreSQL's), which servers look cards up by; the hold index entry of every
    # open hold, which lets the sweeper expire the hold.
    checks: list[tuple[_Side, str | None, int | None]] = []
    async with redis.pipeline(transaction=False) as pipe:
        for account in accounts:
            found, side = sides.get(account), pg.get(account)
            if found is None or found.undecodable:
                continue
            for card in sorted(found.cards.keys() | (side.cards.keys() if side is not None else set())):
                pipe.hget(keyspace.card_bucket(card), card)
                checks.append((found, card, None))
            for seq in sorted(side.holds) if side is not None else ():
                pipe.zscore(keyspace.account(account).holds, codec.hold_member(account, seq))
                checks.append((found, None, seq))
        replies = await pipe.execute() if checks else []
    for (found, checked_card, checked_hold), reply in zip(checks, replies, strict=True):
        if checked_card is not None:
            found.card_owners[checked_card] = codec.decode_card_owner(reply)
        elif checked_hold in found.holds and reply is None:
            found.unindexed.add(checked_hold)
    return sides


def _parse_account(
    stored: dict[bytes, bytes], lots: list[tuple[bytes, float]], holds: list[tuple[bytes, float]]
) -> _Side:
    try:
        account = codec.decode_account(stored, lots, holds)
    except msgspec.DecodeError as exc:
        return _Side(undecodable=str(exc))
    return _Side(
        seq=account.seq,
        lots=account.lots,
        holds=account.holds,
        lot_points=account.lot_points,
        held_points=account.held_points,
        cards=account.cards,
        status=account.status,
        opened_ms=account.opened_ms,
        closed_ms=account.closed_ms,
        profile=account.profile,
        merged_into=account.merged_into,
        merge_id=account.merge_id,
        merged_ms=account.merged_ms,
        merges_in=account.merges_in,
        foreign_refunds=account.foreign_refunds,
        rule_counts=account.rule_counts,
        first_earn_ms=account.first_earn_ms,
        rank_id=account.rank_id,
        rank_spend=account.rank_spend,
        rank_period=account.rank_period,
        visits=account.visits,
        coupons=account.coupons,
    )


def _differences(account: str, rd: _Side | None, pg: _Side | None) -> Iterable[Difference]:
    if rd is None and pg is None:
        return
    if rd is None:
        yield Difference(account, "account", "missing", f"at seq {pg.seq}" if pg else "")
        return
    if rd.undecodable:
        yield Difference(account, "account", "undecodable", "", f"Redis's account: {rd.undecodable}")
        return
    # Every call trusts the hash's totals instead of adding up the lots and holds.
    lot_sum, held_sum = sum(lot.points for lot in rd.lots.values()), sum(h.points for h in rd.holds.values())
    if (rd.lot_points, rd.held_points) != (lot_sum, held_sum):
        text = (
            f"Redis's account hash has {rd.lot_points} points in lots and {rd.held_points} on hold, "
            f"its lots hold {lot_sum} and its open holds {held_sum}"
        )
        yield Difference(account, "account totals", f"{rd.lot_points}/{rd.held_points}", f"{lot_sum}/{held_sum}", text)
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
            yield Difference(account, f"hold {seq}", _fmt(r), _fmt(p))
        elif seq in rd.unindexed:
            yield Difference(account, f"hold {seq} (not in the hold index)", _fmt(r), _fmt(p))
    # The script trusts the account's own card fields: each card of the account, no other, in
    # the state, kind and times the events gave it.
    if rd.cards.keys() != pg.cards.keys():
        yield Difference(account, "cards on the account", ",".join(rd.cards) or "none", ",".join(pg.cards) or "none")
    for card in sorted(rd.cards.keys() & pg.cards.keys()):
        if rd.cards[card] != pg.cards[card]:
            yield Difference(account, f"card {card}", _card(rd.cards[card]), _card(pg.cards[card]))
    # Servers find a card's account through the card index: every card of the account must be
    # found there, on this account.
    for card, owner in sorted(rd.card_owners.items()):
        if owner != account:
            said = f"names {owner}" if owner is not None else "has no entry"
            text = f"the card index {said} for card {card} of the account"
            yield Difference(account, f"card {card} in the card index", owner or "absent", account, text)
    if (rd.status, rd.closed_ms, rd.merged_into, rd.merge_id, rd.merged_ms) != (
        pg.status, pg.closed_ms, pg.merged_into, pg.merge_id, pg.merged_ms
    ):  # fmt: skip
        yield Difference(account, "status", _status(rd), _status(pg))
    # The merges into the account (mh:<merge id>, "<source>|<ms>"), and what has been refunded of
    # the transactions of the accounts merged into it (f:<transaction id>), which its refunds read.
    for merge in sorted(rd.merges_in.keys() | pg.merges_in.keys()):
        r_in, p_in = rd.merges_in.get(merge), pg.merges_in.get(merge)
        if r_in != p_in:
            yield Difference(account, f"merge {merge} into the account", _merge_in(r_in), _merge_in(p_in))
    for txid in sorted(rd.foreign_refunds.keys() | pg.foreign_refunds.keys()):
        r_f, p_f = rd.foreign_refunds.get(txid), pg.foreign_refunds.get(txid)
        if r_f != p_f:
            yield Difference(account, f"refund state of {txid}", r_f or "absent", p_f or "absent")
    # What the rules read of the member: each capped rule's count (k:<rule>), the first earn (fe).
    for rule in sorted(rd.rule_counts.keys() | pg.rule_counts.keys()):
        r_k, p_k = rd.rule_counts.get(rule), pg.rule_counts.get(rule)
        if r_k != p_k:
            yield Difference(account, f"rule count {rule}", _count(r_k), _count(p_k))
    if rd.first_earn_ms != pg.first_earn_ms:
        yield Difference(account, "first earn", _count(rd.first_earn_ms), _count(pg.first_earn_ms))
    # The member's rank program standing (rk, rs, rp), and each visit rule's limit (v:<key>).
    if (rd.rank_id, rd.rank_spend, rd.rank_period) != (pg.rank_id, pg.rank_spend, pg.rank_period):
        yield Difference(account, "rank", _rank(rd), _rank(pg))
    for key in sorted(rd.visits.keys() | pg.visits.keys()):
        r_v, p_v = rd.visits.get(key), pg.visits.get(key)
        if r_v != p_v:
            yield Difference(account, f"visit limit {key}", _count(r_v), _count(p_v))
    # The member's coupons (q:<coupon id>): which the script lets the member use, and when.
    for coupon in sorted(rd.coupons.keys() | pg.coupons.keys()):
        r_q, p_q = rd.coupons.get(coupon), pg.coupons.get(coupon)
        if r_q != p_q:
            yield Difference(account, f"coupon {coupon}", _coupon(r_q), _coupon(p_q))
    # Accounts opened before the account hash kept the opening time have none in Redis.
    if rd.opened_ms is not None and rd.opened_ms != pg.opened_ms:
        yield Difference(
            account, "opened", str(rd.opened_ms), str(pg.opened_ms) if pg.opened_ms is not None else "none"
        )
    if rd.profile != pg.profile:
        yield Difference(account, "profile", _profile(rd.profile), _profile(pg.profile))


def _count(value: int | None) -> str:
    return "absent" if value is None else str(value)


def _coupon(coupon: codec.CouponEntry | None) -> str:
    """A coupon as its q: field keeps it: <campaign>|<issued ms>|<valid-before ms>|<used ms>."""
    return "absent" if coupon is None else codec.coupon_field(coupon)


def _rank(side: _Side) -> str:
    """rk, rs and rp: "<rank> (spend <rs>, period <rp>)"; "none" without a rank."""
    if side.rank_id is None and side.rank_period is None:
        return "none" if not side.rank_spend else f"none (spend {side.rank_spend})"
    return f"{side.rank_id or 'none'} (spend {side.rank_spend}, period {_count(side.rank_period)})"


def _card(link: codec.CardLink) -> str:
    """The card as its field keeps it: <state><kind>[<link ms>[:<state ms>[:<replaced by>]]]."""
    return codec.encode_card_link(link).decode()


_STATUSES = {"A": "active", "C": "closed", "M": "merged"}


def _merge_in(came: codec.MergeIn | None) -> str:
    """A merge into the account as its mh: field keeps it: <source>|<ms>."""
    return "absent" if came is None else f"{came.source}|{came.time}"


def _status(side: _Side) -> str:
    """The status as the account hash says it (`st`, `ct`, `mt`, `mi`, `mg`): active, closed at
    <ms>, merged into <account> by <merge id> at <ms>."""
    said = _STATUSES.get(side.status, side.status)
    if side.merged_into is not None or side.merge_id is not None or side.merged_ms is not None:
        said += f" into {side.merged_into} by {side.merge_id} at {side.merged_ms}"
    if side.closed_ms is None:
        return said
    return f"closed at {side.closed_ms}" if side.status == "C" else f"{said}, closed at {side.closed_ms}"


def _profile(profile: codec.MemberProfile) -> str:
    """The profile as its events carry it (JSON, attributes in name order)."""
    attrs = dict(sorted(profile.attrs.items())) if profile.attrs else None
    return msgspec.json.encode(msgspec.structs.replace(profile, attrs=attrs)).decode()


def _fmt(value: codec.LotEntry | codec.HoldEntry | None) -> str:
    """points:expiry ms:kind:issuer for a lot, points:expiry ms for a hold."""
    if value is None:
        return "absent"
    if isinstance(value, codec.LotEntry):
        return f"{value.points}:{value.expire_ms}:{value.kind}:{value.issuer_id}"
    return f"{value.points}:{value.expire_ms}"
