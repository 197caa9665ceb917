"""Rebuilds Redis from PostgreSQL after Redis was lost: accounts (hash, lots, open holds),
transaction records (open holds and those within the refund window), the hold index,
the card index (and each account's own card fields, with their states, which the ledger script
checks), each account's status and member profile, and the request-id records still within
their TTL. And merges: a merged account's status and target, each account's merge history and
the refund states it keeps of transactions of the accounts merged into it (its mh: and f:
fields), every merged account's move record, and, for a merge whose step 2 had not reached
PostgreSQL, the source's place in its shard's list of unfinished merges, with its cards' index
entries still naming it: the recovery pass (Ledger.finish_merges) then finishes the merge.

A merged account's transaction refunded since on the account it was merged into comes back as
PostgreSQL has it, everything refunded of it (Redis had kept it as it was at the merge): the
script reads the refund state from the f: field first, so refunds go on the same.

And the rules (issue #10): each member's rule counts and first earn (k:<rule>, fe), earns' and
refunds' lines in their records, the published rule sets and the current version, and each
budgeted campaign's count (ops/rules.py). With a request's record, an earn's or a refund's
budget marks (Keyspace.budget_mark) come back too, for each campaign of its answer's lines: a
retried earn then gives back its new reservation whole, and a retried refund gives nothing back
twice, as before the loss.

And ranks and visits: each member's rank, qualifying spend and rank period (rk, rs, rp) and visit
limits (v:<key>), and the records' qualifying amounts and rank periods (qual, rp), which refunds
read to lower the spend.

And coupons: each member's coupons (q:<coupon id>, used or not), from the coupons table, and a
merged member's coupons in its move record (the merges row's), which step 2 brings to the target.

What PostgreSQL had not yet received when Redis was lost (the worker's lag, about a second of
traffic) cannot come back; the tills' retries with the same request ids redo those requests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
from redis.asyncio import Redis

from pointauth.server.clock import to_ms
from pointauth.server.domain.earning import BASE_RULE
from pointauth.server.domain.ids import transaction_id
from pointauth.server.journal import rules as journal_rules
from pointauth.server.journal.pg import connection
from pointauth.server.journal.status import stream_backlogs
from pointauth.server.journal.writer import (
    ACCOUNT_MEMBER_COLUMNS,
    CARD_ROW_COLUMNS,
    account_coupons,
    card_from_row,
    foreign_refunds,
    merge_histories,
    merge_moves,
    profile_from_row,
    record_from_row,
    rule_counts_from_row,
    visits_from_row,
)
from pointauth.server.ledger import Keyspace, codec
from pointauth.server.ops import directory
from pointauth.server.ops import rules as ops_rules

PAGE = 1000
Progress = Callable[[int, int], None]


class RehydrateRefused(RuntimeError):
    """Redis still has events PostgreSQL lacks: rebuilding from PostgreSQL would lose them."""


@dataclass(frozen=True)
class RehydrateReport:
    accounts: int
    transactions: int
    idempotency_records: int
    cards: int
    seconds: float
    directory_entries: int = 0
    """Companies, stores and terminals of the group directory."""
    unfinished_merges: int = 0
    """Merges put back on their shard's list for the recovery pass to finish."""
    rule_sets: int = 0
    """Published rule set versions."""
    budgets: int = 0
    """Budget counts of campaigns (each that had a budget in some version)."""


async def rehydrate(
    redis: Redis,
    dsn: str,
    keyspace: Keyspace,
    *,
    now_ms: int,
    transaction_retention_ms: int,
    progress: Progress | None = None,
    force: bool = False,
    page: int = PAGE,
) -> RehydrateReport:
    """`now_ms` is the ledger clock (for the refund window); request-id TTLs follow Redis's own clock."""
    started = time.perf_counter()
    if not force:
        backlog = [
            b for b in await stream_backlogs(redis, [keyspace.events(s) for s in range(keyspace.shards)]) if b.backlog
        ]
        if backlog:
            total = sum(b.backlog for b in backlog)
            raise RehydrateRefused(
                f"{total} events in {len(backlog)} streams are not in PostgreSQL yet: let the worker apply them "
                "(pointauth status shows the backlog), or force the rebuild and lose them"
            )
    counts = {"accounts": 0, "transactions": 0, "idempotency": 0, "cards": 0, "merges": 0}
    async with connection(dsn) as conn:
        total = int(await conn.fetchval("SELECT count(*) FROM accounts"))
        budgeted = set(await journal_rules.budget_counts(conn))
        after = ""
        while True:
            accounts = await conn.fetch(
                f"SELECT account_id, last_seq, {ACCOUNT_MEMBER_COLUMNS} FROM accounts"
                " WHERE account_id > $1 ORDER BY account_id LIMIT $2",
                after,
                page,
            )
            if not accounts:
                break
            ids = [r["account_id"] for r in accounts]
            after = ids[-1]
            lots = await conn.fetch(
                "SELECT account_id, lot_id, points, expire_ms, kind, issuer_id FROM lots"
                " WHERE account_id = ANY($1::text[]) ORDER BY account_id, lot_id",
                ids,
            )
            records = await conn.fetch(
                "SELECT * FROM transactions WHERE account_id = ANY($1::text[])"
                " AND ((type = 'HOLD' AND state = 'HELD') OR time_ms > $2) ORDER BY account_id, seq",
                ids,
                now_ms - transaction_retention_ms,
            )
            idempotency = await conn.fetch(
                "SELECT account_id, request_id, record, (extract(epoch FROM expires_at - now()) * 1000)::bigint AS ttl"
                " FROM idempotency_records WHERE account_id = ANY($1::text[]) AND expires_at > now() + interval '1 s'",
                ids,
            )
            cards = await conn.fetch(f"SELECT {CARD_ROW_COLUMNS} FROM cards WHERE account_id = ANY($1::text[])", ids)
            history = await merge_histories(conn, ids)
            foreign = await foreign_refunds(conn, ids)
            coupons = await account_coupons(conn, ids)
            moves = await merge_moves(conn, [r["account_id"] for r in accounts if r["status"] == "M"])
            hashes = {
                # x0: where the script's pruning of old transaction records resumes; the first
                # record restored below lowers it.
                r["account_id"]: codec.StoredAccount(
                    seq=r["last_seq"],
                    x0=r["last_seq"] + 1,
                    status=r["status"],
                    opened_ms=None if r["opened_at"] is None else to_ms(r["opened_at"]),
                    closed_ms=None if r["closed_at"] is None else to_ms(r["closed_at"]),
                    profile=profile_from_row(r["profile"]),
                    merged_into=r["merged_into"],
                    merge_id=r["merge_id"],
                    merged_ms=None if r["merged_at"] is None else to_ms(r["merged_at"]),
                    merges_in=history.get(r["account_id"], {}),
                    foreign_refunds=foreign.get(r["account_id"], {}),
                    rule_counts=rule_counts_from_row(r["rule_counts"]),
                    first_earn_ms=None if r["first_earn_at"] is None else to_ms(r["first_earn_at"]),
                    rank_id=r["rank_id"],
                    rank_spend=r["rank_spend"],
                    rank_period=r["rank_period"],
                    visits=visits_from_row(r["visits"]),
                    coupons=coupons.get(r["account_id"], {}),
                )
                for r in accounts
            }
            for r in lots:
                lot = codec.LotEntry(r["lot_id"], r["points"], r["expire_ms"], r["kind"], r["issuer_id"])
                hashes[r["account_id"]].lots[lot.lot_id] = lot
            for r in cards:
                hashes[r["account_id"]].cards[r["card_number"]] = card_from_row(r)
            async with redis.pipeline(transaction=False) as pipe:
                for account in hashes:
                    keys = keyspace.account(account)
                    pipe.delete(keys.account, keys.transactions, keys.lots, keys.open_holds)
                for row in records:
                    account, seq, rec = row["account_id"], row["seq"], record_from_row(row)
                    stored = hashes[account]
                    stored.x0 = min(stored.x0 or seq, seq)
                    keys = keyspace.account(account)
                    pipe.hset(keys.transactions, codec.record_field(seq), codec.encode_record(rec))
                    if rec.type == "HOLD" and rec.state == "HELD":
                        stored.holds[seq] = codec.HoldEntry(rec.pts, rec.exp)
                        pipe.zadd(keys.holds, {codec.hold_member(account, seq): rec.exp})
                for account, stored in hashes.items():
                    keys = keyspace.account(account)
                    restored = codec.account_of(
                        stored.seq,
                        stored.x0,
                        stored.lots,
                        stored.holds,
                        stored.cards,
                        status=stored.status,
                        opened_ms=stored.opened_ms,
                        closed_ms=stored.closed_ms,
                        profile=stored.profile,
                        merged_into=stored.merged_into,
                        merge_id=stored.merge_id,
                        merged_ms=stored.merged_ms,
                        merges_in=stored.merges_in,
                        foreign_refunds=stored.foreign_refunds,
                        rule_counts=stored.rule_counts,
                        first_earn_ms=stored.first_earn_ms,
                        visits=stored.visits,
                        coupons=stored.coupons,
                    )
                    # rk, rs and rp as the accounts row has them (rs is written with rk).
                    restored.rank_id, restored.rank_spend = stored.rank_id, stored.rank_spend
                    restored.rank_period = stored.rank_period
                    layout = codec.encode_account(restored)
                    pipe.hset(keys.account, mapping=layout.fields)  # type: ignore[arg-type]  # dict keys are invariant
                    if layout.lots:
                        pipe.zadd(keys.lots, layout.lots)
                    if layout.holds:
                        pipe.zadd(keys.open_holds, layout.holds)
                for r in idempotency:
                    # The record as the script wrote it (codec.idempotency_record), byte for byte.
                    key = keyspace.idempotency(r["account_id"], r["request_id"])
                    pipe.set(key, r["record"], px=r["ttl"])
                    for mark in _budget_marks(keyspace, r["account_id"], r["record"], budgeted):
                        pipe.set(mark, "1", px=r["ttl"] + Keyspace.BUDGET_MARK_MARGIN_S * 1000)
                for r in cards:
                    card = r["card_number"]
                    pipe.hset(keyspace.card_bucket(card), card, codec.card_owner_value(r["account_id"]))
                # A merged account keeps its move record. One whose merge is unfinished is on its
                # shard's list for the recovery pass, and its cards' index entries name it still
                # (steps 2 and 3 move them: a till's call meets the merged account, and follows).
                for source, (move, unfinished) in sorted(moves.items()):
                    keys = keyspace.account(source)
                    pipe.hset(keys.transactions, codec.MERGE_MOVE_FIELD, codec.encode_merge_move(move))
                    if unfinished:
                        pipe.zadd(keys.merges, {source: move.time})
                        for card in move.cards if isinstance(move.cards, dict) else {}:
                            pipe.hset(keyspace.card_bucket(card), card, codec.card_owner_value(source))
                        counts["merges"] += 1
                await pipe.execute()
            counts["accounts"] += len(accounts)
            counts["transactions"] += len(records)
            counts["idempotency"] += len(idempotency)
            counts["cards"] += len(cards)
            if progress is not None:
                progress(counts["accounts"], total)
        # And the group directory (its keys, and its version, above which new changes go on).
        directory_entries = await directory.restore(redis, conn, keyspace)
        # And the rule sets (the version above which new publications go on) and the budgets.
        rules = await ops_rules.restore(redis, conn, keyspace)
    return RehydrateReport(
        rule_sets=rules.rule_sets,
        budgets=len(rules.budgets),
        directory_entries=directory_entries,
        accounts=counts["accounts"],
        transactions=counts["transactions"],
        idempotency_records=counts["idempotency"],
        cards=counts["cards"],
        seconds=time.perf_counter() - started,
        unfinished_merges=counts["merges"],
    )


# A budget mark outlives its request's record by a day (Ledger.settle_budget, give_budget).


def _budget_marks(keyspace: Keyspace, account_id: str, record: bytes, budgeted: set[str]) -> list[str]:
    """The budget marks of the earn or refund whose answer a request's record holds: one per
    budgeted campaign among its lines (an earn's: each settled its reservation; a refund's: each
    share given back), as the server set them after the call."""
    try:
        result = codec.decode_result(codec.split_idempotency_record(record)[1])
    except (msgspec.DecodeError, UnicodeDecodeError):
        return []
    if result.code != "OK" or not result.lines:
        return []
    txid = transaction_id(account_id, result.tx)
    return [
        keyspace.budget_mark(line.rule, txid)
        for line in result.lines
        if line.rule != BASE_RULE and line.rule in budgeted
    ]


def utc_now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)
