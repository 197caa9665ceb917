"""Applies a batch of stream events to PostgreSQL in one transaction: journal rows and point flows
(COPY) and the projections they change.

Per account, events apply strictly in sequence: an event at or below the account's `last_seq`
is a redelivery (skipped, and acknowledged), the next one applies, and one beyond it means an
earlier event has not arrived yet (a gap): it and the account's later events are held back,
unacknowledged, to be delivered again.

The rows of an event (its journal row, its flows, the transaction record it creates) are COPYed
straight into their tables: under the account's row lock, an event past `last_seq` has none yet,
as both are written in one transaction. A database where that does not hold (rows restored by
hand) makes the COPY fail on a key; the batch is then written again through staging tables that
keep the rows already there (ON CONFLICT), at about twice the PostgreSQL cost.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

import msgspec

from pointauth.server.clock import to_ms, to_time
from pointauth.server.domain.ids import transaction_id
from pointauth.server.journal import audit as journal_audit
from pointauth.server.journal import directory as journal_directory
from pointauth.server.journal import rules as journal_rules
from pointauth.server.journal.events import AuditRecord, DirectoryChange, EntryId, Event, RuleSetPublished, StreamEntry
from pointauth.server.journal.flows import FLOW_COLUMNS, FlowRow
from pointauth.server.journal.pg import Connection, Record, UniqueViolation
from pointauth.server.journal.projection import (
    AccountState,
    MergeLanded,
    MergeOut,
    NotYetApplied,
    ProjectionError,
    Projector,
    RecordKey,
)
from pointauth.server.ledger import Keyspace
from pointauth.server.ledger.codec import (
    AllocEntry,
    CardLink,
    CouponEntry,
    EarnLineEntry,
    LotEntry,
    MemberProfile,
    MergeIn,
    MergeMove,
    PointOfSaleRef,
    TransactionRecord,
    foreign_refund_state,
)

log = logging.getLogger(__name__)

JOURNAL_COLUMNS = (
    "event_id", "account_id", "seq", "type", "points", "lots", "issuer_id", "company_id", "store_id",
    "terminal_id", "channel", "request_id", "event_time", "ref_seq", "released", "amount", "purchase_time",
    "hold_expire_ms", "card_number", "stream", "entry_id", "card_kind", "new_card", "profile", "merge_id",
    "other_account", "ref_account", "lines", "rules_version", "rule_counts", "first_earn", "rank_from", "rank_to",
    "rank_spend", "rank_period", "qualifying_amount", "visits", "coupons",
)  # fmt: skip
TRANSACTION_COLUMNS = (
    "account_id", "seq", "type", "time_ms", "points", "refunded", "available", "held", "pos", "lots", "alloc",
    "ref_seq", "state", "expire_ms", "captured", "released", "capture_seq", "amount", "ref_account", "lines",
    "rules_version", "qual", "rank_period",
)  # fmt: skip
_JSON_TRANSACTION_COLUMNS = {"pos", "lots", "alloc", "lines"}


class IdempotencyRow(NamedTuple):
    account_id: str
    request_id: str
    record: bytes
    expires_at: datetime


class Delivered(NamedTuple):
    """A stream entry and the event it carries."""

    entry: StreamEntry
    event: Event


@dataclass
class BatchOutcome:
    applied: list[Delivered] = field(default_factory=list)
    duplicates: list[Delivered] = field(default_factory=list)
    # Not applied, not to be acknowledged: (delivery, why).
    held: list[tuple[Delivered, str]] = field(default_factory=list)

    @property
    def acknowledged(self) -> list[Delivered]:
        return self.applied + self.duplicates


def _ms(time: datetime | None) -> int | None:
    return None if time is None else to_ms(time)


def _time(ms: int | None) -> datetime | None:
    return None if ms is None else to_time(ms)


_decode_profile = msgspec.json.Decoder(MemberProfile).decode


def profile_from_row(raw: str | None) -> MemberProfile:
    """An accounts row's profile (jsonb, as asyncpg gives it: text)."""
    return MemberProfile() if raw is None else _decode_profile(raw)


def card_from_row(r: Record) -> CardLink:
    """A cards row as the account hash's field keeps the card."""
    return CardLink(
        state=r["state"], kind=r["kind"], link_ms=_ms(r["linked_at"]), state_ms=_ms(r["state_at"]),
        replaced_by=r["replaced_by"],
    )  # fmt: skip


CARD_ROW_COLUMNS = "card_number, account_id, kind, state, linked_at, state_at, replaced_by, moved_at"
ACCOUNT_MEMBER_COLUMNS = (
    "opened_at, status, closed_at, profile::text AS profile, merged_into, merge_id, merged_at,"
    " rule_counts::text AS rule_counts, first_earn_at, rank_id, rank_spend, rank_period, visits::text AS visits"
)
"""What card_from_row reads of a cards row (and moved_at), and the accounts columns of the member
(profile, rule counts and visit limits as text), its merge, its first earn and its rank."""

_decode_counts = msgspec.json.Decoder(dict[str, int]).decode


def rule_counts_from_row(raw: str | None) -> dict[str, int]:
    """An accounts row's rule_counts (jsonb, as asyncpg gives it: text), in rule order."""
    return {} if raw is None else dict(sorted(_decode_counts(raw).items()))


def visits_from_row(raw: str | None) -> dict[str, int]:
    """An accounts row's visits (jsonb as text: limit key -> day), in key order."""
    return rule_counts_from_row(raw)


def _json(value: Any) -> str | None:
    return None if value is None else msgspec.json.encode(value).decode()


class _Retry(Exception):
    """Rolls the transaction back so the batch is projected again without a failing event."""


class JournalWriter:
    def __init__(self, keyspace: Keyspace) -> None:
        self.keyspace = keyspace

    async def prepare(self, conn: Connection) -> None:
        """Per connection: the staging table COPY writes into."""
        for table in ("journal", "point_flows"):
            await conn.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {table}_stage (LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            )

    async def apply(
        self,
        conn: Connection,
        batch: Sequence[Delivered],
        idempotency: Sequence[IdempotencyRow] = (),
        directory: Sequence[tuple[StreamEntry, DirectoryChange]] = (),
        rule_sets: Sequence[tuple[StreamEntry, RuleSetPublished]] = (),
        audits: Sequence[tuple[StreamEntry, AuditRecord]] = (),
    ) -> BatchOutcome:
        """`directory`, `rule_sets`, `audits`: the batch's group directory changes, rule set
        publications and audit records, copied in the same transaction."""
        blocked: dict[str, tuple[int, str]] = {}
        tolerant = False
        while True:
            try:
                async with conn.transaction():
                    outcome = await self._apply_once(conn, batch, idempotency, blocked, tolerant)
                    if directory:
                        await journal_directory.write_changes(conn, [change for _, change in directory])
                    if rule_sets:
                        await journal_rules.write_published(conn, [published for _, published in rule_sets])
                    await journal_audit.write_records(conn, audits)
                    if directory or rule_sets or audits:
                        others = [entry for entry, _ in (*directory, *rule_sets, *audits)]
                        await self._write_positions(conn, (), others)
                    return outcome
            except _Retry:
                continue
            except UniqueViolation as exc:
                if tolerant:
                    raise
                log.warning(
                    "write-behind: a row of this batch is there already (%s); writing the batch again, keeping it", exc
                )
                tolerant = True

    async def _apply_once(
        self,
        conn: Connection,
        batch: Sequence[Delivered],
        idempotency: Sequence[IdempotencyRow],
        blocked: dict[str, tuple[int, str]],
        tolerant: bool,
    ) -> BatchOutcome:
        """`tolerant`: rows already there are kept (ON CONFLICT), not a failure (see above)."""
        by_account: dict[str, list[Delivered]] = defaultdict(list)
        for item in batch:
            by_account[item.event.account].append(item)
        for items in by_account.values():
            items.sort(key=lambda d: d.event.seq)
        accounts = sorted(by_account)
        states = await self._load_states(conn, accounts)
        # A refund of a merged account's transaction refers to that account's record.
        refs = {(d.event.racct or d.event.account, d.event.ref) for d in batch if d.event.ref is not None}
        records, versions = await self._load_records(conn, refs)
        stored = set(records)
        projector = Projector(records, versions)

        outcome = BatchOutcome()
        for account in accounts:
            state = states.setdefault(account, AccountState(account))
            stop_at, why = blocked.get(account, (0, ""))
            for item in by_account[account]:
                seq = item.event.seq
                if seq <= state.last_seq:
                    outcome.duplicates.append(item)
                elif stop_at and seq >= stop_at:
                    outcome.held.append((item, why))
                elif seq > state.last_seq + 1:
                    outcome.held.append((item, f"gap: {account} is at seq {state.last_seq}, got {seq}"))
                else:
                    try:
                        projector.apply(state, item.event)
                    except NotYetApplied as exc:
                        log.warning("write-behind: holding back %s: %s", item.event.event_id, exc)
                        blocked[account] = (seq, f"waiting: {exc}")
                        raise _Retry from exc
                    except ProjectionError as exc:
                        log.error("write-behind: cannot apply %s: %s", item.event.event_id, exc)
                        blocked[account] = (seq, f"diverged: {exc}")
                        raise _Retry from exc
                    outcome.applied.append(item)

        if outcome.duplicates:
            await self._verify_duplicates(conn, outcome)
        applied = outcome.applied
        await self._write_accounts(conn, states, {d.event.account for d in applied})
        await self._write_journal(conn, applied, tolerant)
        await self._write_flows(conn, projector.flows, tolerant)
        await self._write_cards(conn, states)
        await self._write_lots(conn, states)
        changed = sorted(projector.changed)
        await self._write_records(
            conn,
            [(key, projector.records[key], projector.versions.get(key)) for key in changed if key in stored],
            [(key, projector.records[key], projector.versions.get(key)) for key in changed if key not in stored],
            tolerant,
        )
        await self._write_merges(conn, projector.merges_out, projector.merges_landed)
        await self._write_coupons(conn, projector.coupons)
        await self._write_idempotency(conn, idempotency)
        # Last but the positions: rows every worker may add to, locked for the least time.
        await journal_rules.write_campaign_points(conn, projector.campaign_points)
        await self._write_positions(conn, outcome.acknowledged)
        return outcome

    async def _verify_duplicates(self, conn: Connection, outcome: BatchOutcome) -> None:
        """A redelivered event must be the one the journal has: a different event under the same
        id means Redis lost its state and restarted the account's sequence (it was not
        rehydrated). Such events are held back, to be dead-lettered, never silently dropped."""
        dups = outcome.duplicates
        rows = await conn.fetch(
            "SELECT account_id, seq, type, event_time FROM journal"
            " WHERE (account_id, seq) IN (SELECT * FROM unnest($1::text[], $2::bigint[]))",
            [d.event.account for d in dups],
            [d.event.seq for d in dups],
        )
        stored = {(r["account_id"], r["seq"]): (r["type"], r["event_time"]) for r in rows}
        outcome.duplicates = []
        for d in dups:
            if stored.get((d.event.account, d.event.seq)) == (d.event.type, to_time(d.event.time)):
                outcome.duplicates.append(d)
            else:
                why = f"conflict: the journal has another event {d.event.event_id}"
                log.error("write-behind: %s (Redis state lost and not rehydrated?)", why)
                outcome.held.append((d, why))

    async def _load_states(self, conn: Connection, accounts: list[str]) -> dict[str, AccountState]:
        # FOR UPDATE: two workers never project the same account at once (e.g. while the shard
        # split changes), so last_seq cannot move under us.
        rows = await conn.fetch(
            f"SELECT account_id, last_seq, card_number, {ACCOUNT_MEMBER_COLUMNS} FROM accounts"
            " WHERE account_id = ANY($1::text[]) ORDER BY account_id FOR UPDATE",
            accounts,
        )
        states = {
            r["account_id"]: AccountState(
                r["account_id"],
                r["last_seq"],
                card_number=r["card_number"],
                opened_ms=_ms(r["opened_at"]),
                status=r["status"],
                closed_ms=_ms(r["closed_at"]),
                profile=profile_from_row(r["profile"]),
                merged_into=r["merged_into"],
                merge_id=r["merge_id"],
                merged_ms=_ms(r["merged_at"]),
                rule_counts=rule_counts_from_row(r["rule_counts"]),
                first_earn_ms=_ms(r["first_earn_at"]),
                rank_id=r["rank_id"],
                rank_spend=r["rank_spend"],
                rank_period=r["rank_period"],
                visits=visits_from_row(r["visits"]),
            )
            for r in rows
        }
        if not states:
            return states
        known = list(states)
        for r in await conn.fetch(f"SELECT {CARD_ROW_COLUMNS} FROM cards WHERE account_id = ANY($1::text[])", known):
            state = states[r["account_id"]]
            state.cards[r["card_number"]] = card_from_row(r)
            if r["moved_at"] is not None:
                state.card_moves[r["card_number"]] = to_ms(r["moved_at"])
        for r in await conn.fetch(
            "SELECT account_id, lot_id, points, expire_ms, kind, issuer_id FROM lots"
            " WHERE account_id = ANY($1::text[])",
            known,
        ):
            states[r["account_id"]].lots[r["lot_id"]] = LotEntry(
                r["lot_id"], r["points"], r["expire_ms"], r["kind"], r["issuer_id"]
            )
        return states

    async def _load_records(
        self, conn: Connection, refs: set[RecordKey]
    ) -> tuple[dict[RecordKey, TransactionRecord], dict[RecordKey, int]]:
        """The records named, and the rule set version of those that are earns under the rules."""
        if not refs:
            return {}, {}
        accounts = [a for a, _ in refs]
        seqs = [s for _, s in refs]
        # FOR UPDATE: a record may be changed by another account's batch too (a refund of a merged
        # account's transaction, on the account it was merged into), which must not overwrite
        # what this batch writes, nor this batch what it wrote.
        rows = await conn.fetch(
            f"SELECT {', '.join(TRANSACTION_COLUMNS)} FROM transactions"
            " WHERE (account_id, seq) IN (SELECT * FROM unnest($1::text[], $2::bigint[]))"
            " ORDER BY account_id, seq FOR UPDATE",
            accounts,
            seqs,
        )
        records = {(r["account_id"], r["seq"]): record_from_row(r) for r in rows}
        versions = {(r["account_id"], r["seq"]): r["rules_version"] for r in rows if r["rules_version"]}
        return records, versions

    async def _write_accounts(self, conn: Connection, states: dict[str, AccountState], touched: set[str]) -> None:
        if not touched:
            return
        rows = [
            (
                s.account_id,
                self.keyspace.shard_of(s.account_id),
                s.card_number,
                s.last_seq,
                _time(s.opened_ms),
                s.status,
                _time(s.closed_ms),
                _json(s.profile),
                s.merged_into,
                s.merge_id,
                _time(s.merged_ms),
                _json(dict(sorted(s.rule_counts.items()))),
                _time(s.first_earn_ms),
                s.rank_id,
                s.rank_spend,
                s.rank_period,
                _json(dict(sorted(s.visits.items()))),
            )
            for s in (states[a] for a in sorted(touched))
        ]
        await conn.execute(
            """
            INSERT INTO accounts (account_id, shard, card_number, last_seq, opened_at, status, closed_at, profile,
                                  merged_into, merge_id, merged_at, rule_counts, first_earn_at, rank_id, rank_spend,
                                  rank_period, visits)
            SELECT account_id, shard, card_number, last_seq, opened_at, status, closed_at, profile::jsonb,
                   merged_into, merge_id, merged_at, rule_counts::jsonb, first_earn_at, rank_id, rank_spend,
                   rank_period, visits::jsonb
            FROM unnest($1::text[], $2::int[], $3::text[], $4::bigint[], $5::timestamptz[], $6::text[],
                        $7::timestamptz[], $8::text[], $9::text[], $10::text[], $11::timestamptz[], $12::text[],
                        $13::timestamptz[], $14::text[], $15::bigint[], $16::bigint[], $17::text[])
                AS t(account_id, shard, card_number, last_seq, opened_at, status, closed_at, profile,
                     merged_into, merge_id, merged_at, rule_counts, first_earn_at, rank_id, rank_spend,
                     rank_period, visits)
            ON CONFLICT (account_id) DO UPDATE SET
                last_seq = EXCLUDED.last_seq,
                card_number = COALESCE(accounts.card_number, EXCLUDED.card_number),
                opened_at = COALESCE(accounts.opened_at, EXCLUDED.opened_at),
                status = EXCLUDED.status,
                closed_at = EXCLUDED.closed_at,
                profile = EXCLUDED.profile,
                merged_into = EXCLUDED.merged_into,
                merge_id = EXCLUDED.merge_id,
                merged_at = EXCLUDED.merged_at,
                rule_counts = EXCLUDED.rule_counts,
                first_earn_at = EXCLUDED.first_earn_at,
                rank_id = EXCLUDED.rank_id,
                rank_spend = EXCLUDED.rank_spend,
                rank_period = EXCLUDED.rank_period,
                visits = EXCLUDED.visits,
                updated_at = now()
            """,
            *map(list, zip(*rows, strict=True)),
        )

    async def _write_cards(self, conn: Connection, states: dict[str, AccountState]) -> None:
        """The cards the batch's events changed. The cards table holds each card under the account
        that has it now; a card that moved (unlinked from one account, then linked to another; or
        carried by a merge) has events on both accounts' streams, which may be applied in either
        order. So a row is deleted only while it is the unlinking (or merged) account's, and taken
        over only by a link at least as recent as the row's own: by its link time (linked_at, the
        link event's time), then, as a merge moves a card with its link time unchanged, by the
        time of the merge that brought it (moved_at; NULL, linked there, before any)."""
        gone: list[tuple[str, str]] = []
        present: dict[str, tuple[str, CardLink, int | None]] = {}
        for state in states.values():
            for card in sorted(state.touched_cards):
                link = state.cards.get(card)
                if link is None:
                    gone.append((card, state.account_id))
                    continue
                # Two accounts of one batch with the same card (it moved within the batch): the
                # later link is the card's current one (one row per card and statement).
                moved = state.card_moves.get(card)
                held = present.get(card)
                if held is None or _link_order(link, moved) >= _link_order(held[1], held[2]):
                    present[card] = (state.account_id, link, moved)
        if gone:
            await conn.execute(
                "DELETE FROM cards WHERE (card_number, account_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
                *map(list, zip(*gone, strict=True)),
            )
        if present:
            rows = [
                (
                    card, account, link.kind, link.state, _time(link.link_ms), _time(link.state_ms), link.replaced_by,
                    _time(moved),
                )
                for card, (account, link, moved) in sorted(present.items())
            ]  # fmt: skip
            await conn.execute(
                """
                INSERT INTO cards (card_number, account_id, kind, state, linked_at, state_at, replaced_by, moved_at)
                SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
                                     $6::timestamptz[], $7::text[], $8::timestamptz[])
                ON CONFLICT (card_number) DO UPDATE SET
                    account_id = EXCLUDED.account_id, kind = EXCLUDED.kind, state = EXCLUDED.state,
                    linked_at = EXCLUDED.linked_at, state_at = EXCLUDED.state_at, replaced_by = EXCLUDED.replaced_by,
                    moved_at = EXCLUDED.moved_at
                WHERE cards.account_id = EXCLUDED.account_id OR cards.linked_at IS NULL
                    OR EXCLUDED.linked_at > cards.linked_at
                    OR (EXCLUDED.linked_at = cards.linked_at
                        AND coalesce(EXCLUDED.moved_at, '-infinity') >= coalesce(cards.moved_at, '-infinity'))
                """,
                *map(list, zip(*rows, strict=True)),
            )

    async def _write_journal(self, conn: Connection, applied: list[Delivered], tolerant: bool) -> None:
        if applied:
            await _copy(conn, "journal", [journal_row(d) for d in applied], JOURNAL_COLUMNS, tolerant)

    async def _write_flows(self, conn: Connection, flows: list[FlowRow], tolerant: bool) -> None:
        if not flows:
            return
        # Closing a period assumes no event of it can come later (services/settlement.py): a
        # server clock far behind Redis's could still make one. It is journaled all the same, and
        # said loudly, as no statement will count it.
        closed_until = await conn.fetchval("SELECT max(ends_at) FROM settlement_statements")
        if closed_until is not None and (late := [f for f in flows if to_time(f.time_ms) < closed_until]):
            events = ", ".join(sorted({transaction_id(f.account_id, f.seq) for f in late}))
            log.error(
                "write-behind: %d point flows fall in a closed settlement period (before %s), in no statement: %s",
                len(late), closed_until.isoformat(), events,
            )  # fmt: skip
        await _copy(conn, "point_flows", [flow_row(f) for f in flows], FLOW_COLUMNS, tolerant)

    async def _write_lots(self, conn: Connection, states: dict[str, AccountState]) -> None:
        upsert: list[tuple[str, int, int, int, str, str]] = []
        gone: list[tuple[str, int]] = []
        for state in states.values():
            for lot_id in sorted(state.touched_lots):
                lot = state.lots.get(lot_id)
                if lot is None:
                    gone.append((state.account_id, lot_id))
                else:
                    upsert.append((state.account_id, lot_id, lot.points, lot.expire_ms, lot.kind, lot.issuer_id))
        if gone:
            await conn.execute(
                "DELETE FROM lots WHERE (account_id, lot_id) IN (SELECT * FROM unnest($1::text[], $2::bigint[]))",
                *map(list, zip(*gone, strict=True)),
            )
        if upsert:
            await conn.execute(
                """
                INSERT INTO lots (account_id, lot_id, points, expire_ms, kind, issuer_id)
                SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::text[], $6::text[])
                ON CONFLICT (account_id, lot_id) DO UPDATE SET points = EXCLUDED.points
                """,
                *map(list, zip(*upsert, strict=True)),
            )

    async def _write_records(
        self,
        conn: Connection,
        stored: list[tuple[RecordKey, TransactionRecord, int | None]],
        new: list[tuple[RecordKey, TransactionRecord, int | None]],
        tolerant: bool,
    ) -> None:
        """(key, record, its rule set version if an earn under the rules): `stored`, records read
        from the table and changed; `new`, the records of this batch's events, COPYed (upserted
        with the others when `tolerant`)."""
        if tolerant:
            stored, new = stored + new, []
        if new:
            await conn.copy_records_to_table(
                "transactions", records=[record_row(*r) for r in new], columns=TRANSACTION_COLUMNS
            )
        if not stored:
            return
        rows = [record_row(*r) for r in stored]
        types = [
            "text", "bigint", "text", "bigint", "bigint", "bigint", "bigint", "bigint", "text", "text", "text",
            "bigint", "text", "bigint", "bigint", "bigint", "bigint", "bigint", "text", "text", "bigint", "bigint",
            "bigint",
        ]  # fmt: skip
        select = ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(types))
        casts = ", ".join(f"{c}::jsonb" if c in _JSON_TRANSACTION_COLUMNS else c for c in TRANSACTION_COLUMNS)
        # An earn's rule set version is written with it and never changes.
        updates = ", ".join(
            f"{c} = coalesce(EXCLUDED.{c}, transactions.{c})" if c == "rules_version" else f"{c} = EXCLUDED.{c}"
            for c in TRANSACTION_COLUMNS[2:]
        )
        await conn.execute(
            f"INSERT INTO transactions ({', '.join(TRANSACTION_COLUMNS)})"
            f" SELECT {casts} FROM unnest({select}) AS t({', '.join(TRANSACTION_COLUMNS)})"
            f" ON CONFLICT (account_id, seq) DO UPDATE SET {updates}",
            *map(list, zip(*rows, strict=True)),
        )

    async def _write_merges(self, conn: Connection, out: list[MergeOut], landed: list[MergeLanded]) -> None:
        """The merges table's rows, each written by its two events, in whichever order they come."""
        if out:
            rows = [
                (
                    m.merge_id, m.source, m.target, to_time(m.time), m.actor, m.why, _json(m.lots),
                    _json(m.cards), _json(m.foreign), _json(dict(sorted(m.coupons.items()))),
                )
                for m in out
            ]  # fmt: skip
            await conn.execute(
                """
                INSERT INTO merges
                    (merge_id, source_id, target_id, merged_at, actor, reason, lots, cards, foreign_refunds, coupons)
                SELECT merge_id, source_id, target_id, merged_at, actor, reason, lots::jsonb, cards::jsonb,
                       foreign_refunds::jsonb, coupons::jsonb
                FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[], $6::text[],
                            $7::text[], $8::text[], $9::text[], $10::text[])
                    AS t(merge_id, source_id, target_id, merged_at, actor, reason, lots, cards, foreign_refunds,
                         coupons)
                ON CONFLICT (merge_id) DO UPDATE SET
                    target_id = EXCLUDED.target_id, merged_at = EXCLUDED.merged_at, actor = EXCLUDED.actor,
                    reason = EXCLUDED.reason, lots = EXCLUDED.lots, cards = EXCLUDED.cards,
                    foreign_refunds = EXCLUDED.foreign_refunds, coupons = EXCLUDED.coupons
                """,
                *map(list, zip(*rows, strict=True)),
            )
        if landed:
            await conn.execute(
                """
                INSERT INTO merges (merge_id, source_id, landed_on, landed_at)
                SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[])
                ON CONFLICT (merge_id) DO UPDATE SET landed_on = EXCLUDED.landed_on, landed_at = EXCLUDED.landed_at
                """,
                [m.merge_id for m in landed],
                [m.source for m in landed],
                [m.account for m in landed],
                [to_time(m.time) for m in landed],
            )

    async def _write_coupons(self, conn: Connection, coupons: dict[tuple[str, str], CouponEntry | None]) -> None:
        """The coupons rows the batch's events wrote: each as the events left it (the whole
        coupon, as its q: field has it), or deleted (moved off a merged account)."""
        gone = [key for key, c in sorted(coupons.items()) if c is None]
        rows = [
            (account, c.coupon_id, c.campaign_id, to_time(c.issued_ms), to_time(c.expire_ms), _time(c.used_ms or None))
            for (account, _), c in sorted(coupons.items())
            if c is not None
        ]
        if gone:
            await conn.execute(
                "DELETE FROM coupons WHERE (account_id, coupon_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
                *map(list, zip(*gone, strict=True)),
            )
        if rows:
            await conn.execute(
                """
                INSERT INTO coupons (account_id, coupon_id, campaign_id, issued_at, expire_at, used_at)
                SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[],
                                     $6::timestamptz[])
                ON CONFLICT (account_id, coupon_id) DO UPDATE SET
                    campaign_id = EXCLUDED.campaign_id, issued_at = EXCLUDED.issued_at,
                    expire_at = EXCLUDED.expire_at, used_at = EXCLUDED.used_at
                """,
                *map(list, zip(*rows, strict=True)),
            )

    async def _write_idempotency(self, conn: Connection, rows: Sequence[IdempotencyRow]) -> None:
        if not rows:
            return
        await conn.execute(
            """
            INSERT INTO idempotency_records (account_id, request_id, record, expires_at)
            SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::timestamptz[])
            ON CONFLICT (account_id, request_id)
                DO UPDATE SET record = EXCLUDED.record, expires_at = EXCLUDED.expires_at
            """,
            *map(list, zip(*rows, strict=True)),
        )

    async def _write_positions(
        self, conn: Connection, acknowledged: Iterable[Delivered], others: Iterable[StreamEntry] = ()
    ) -> None:
        """`others`: entries applied that are no events (group directory changes): they move the
        position, not the count of events."""
        highest: dict[str, EntryId] = {}
        counts: dict[str, int] = defaultdict(int)
        for d in acknowledged:
            stream = d.entry.stream
            highest[stream] = max(highest.get(stream, d.entry.entry_id), d.entry.entry_id)
            counts[stream] += 1
        for entry in others:
            highest[entry.stream] = max(highest.get(entry.stream, entry.entry_id), entry.entry_id)
        if not highest:
            return
        streams = sorted(highest)
        await conn.execute(
            """
            INSERT INTO stream_positions AS p (stream, applied_ms, applied_seq, applied_events)
            SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[])
            ON CONFLICT (stream) DO UPDATE SET
                -- Claimed entries may be older than ones applied before: the position only grows.
                applied_ms = CASE WHEN (EXCLUDED.applied_ms, EXCLUDED.applied_seq) > (p.applied_ms, p.applied_seq)
                    THEN EXCLUDED.applied_ms ELSE p.applied_ms END,
                applied_seq = CASE WHEN (EXCLUDED.applied_ms, EXCLUDED.applied_seq) > (p.applied_ms, p.applied_seq)
                    THEN EXCLUDED.applied_seq ELSE p.applied_seq END,
                applied_events = p.applied_events + EXCLUDED.applied_events,
                updated_at = now()
            """,
            streams,
            [highest[s].ms for s in streams],
            [highest[s].seq for s in streams],
            [counts[s] for s in streams],
        )


async def _copy(
    conn: Connection, table: str, rows: list[tuple[Any, ...]], columns: Sequence[str], tolerant: bool
) -> None:
    """COPYs `rows` into `table`; `tolerant`: through its staging table, keeping rows already there."""
    if not tolerant:
        await conn.copy_records_to_table(table, records=rows, columns=columns)
        return
    await conn.copy_records_to_table(f"{table}_stage", records=rows, columns=columns)
    names = ", ".join(columns)
    await conn.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM {table}_stage ON CONFLICT DO NOTHING")


def journal_row(d: Delivered) -> tuple[Any, ...]:
    e = d.event
    pos = e.pos
    company, store, terminal, channel = (
        (pos.company_id, pos.store_id, pos.terminal_id, pos.channel) if pos is not None else (None, None, None, None)
    )
    issuer = e.lots[0].issuer_id if e.type in ("EARN", "GRANT", "VISIT") and e.lots else None
    other = e.target if e.type == "MERGED_OUT" else e.source if e.type == "MERGED_IN" else None
    return (
        e.event_id, e.account, e.seq, e.type, e.pts, _json(e.lots), issuer, company, store,
        terminal, channel, e.rid or None, to_time(e.time), e.ref, e.released, e.amount,
        to_time(e.ptime) if e.ptime else None, e.hold_exp, e.card, d.entry.stream, str(d.entry.entry_id),
        e.kind, e.new_card, _json(e.profile), e.merge, other, e.racct, _json(e.lines), e.rules,
        _json(dict(sorted(e.counts.items()))) if e.counts else None, e.first, e.rank[0] if e.rank else None,
        e.rank[-1] if e.rank else None, e.spend, e.period, e.qual,
        _json(dict(sorted(e.visits.items()))) if e.visits else None, _json(e.coupons),
    )  # fmt: skip


def flow_row(f: FlowRow) -> tuple[Any, ...]:
    """A point_flows row (FLOW_COLUMNS) of a flow."""
    return (to_time(f.time_ms), *f[1:-1], _time(f.ref_time_ms))


def _link_order(link: CardLink, moved_ms: int | None) -> tuple[int, int]:
    """Which of two links of one card is the later: a link time, or (none) before any; at the same
    link time, the one a later merge moved (or, moved by none, before any)."""
    return (-1 if link.link_ms is None else link.link_ms, -1 if moved_ms is None else moved_ms)


def record_row(key: RecordKey, r: TransactionRecord, rules_version: int | None = None) -> tuple[Any, ...]:
    """The transactions row of a record (and, an earn under the rules, its rule set version). A
    reference, state, expiry, lines or rank period (with its qualifying amount: an earn's under a
    rank program) the record's type does not have is NULL, so that operators' SQL (`WHERE ref_seq
    IS NOT NULL`) means what it says."""
    account_id, seq = key
    return (
        account_id, seq, r.type, r.time, r.pts, r.refunded, r.available, r.held, _json(r.pos), _json(r.lots),
        _json(r.alloc) if r.alloc else None, r.ref or None, r.state or None, r.exp or None, r.captured,
        r.released, r.capture or None, r.amount, r.racct or None, _json(r.lines) if r.lines else None,
        rules_version or None, r.qual if r.rp else None, r.rp or None,
    )  # fmt: skip


def record_from_row(r: Record) -> TransactionRecord:
    """A transactions row as the record Redis keeps. Rows written before records had one shape
    have NULL where their type had no field: those read as the record's defaults."""
    return TransactionRecord(
        type=r["type"],
        time=r["time_ms"],
        pos=msgspec.json.decode(r["pos"], type=PointOfSaleRef),
        pts=r["points"],
        refunded=r["refunded"],
        available=r["available"],
        held=r["held"],
        lots=msgspec.json.decode(r["lots"], type=list[LotEntry]),
        alloc=msgspec.json.decode(r["alloc"], type=list[AllocEntry]) if r["alloc"] is not None else [],
        ref=r["ref_seq"] or 0,
        state=r["state"] or "",
        exp=r["expire_ms"] or 0,
        captured=r["captured"] or 0,
        released=r["released"] or 0,
        capture=r["capture_seq"] or 0,
        amount=r["amount"] or 0,
        racct=r["ref_account"] or "",
        lines=msgspec.json.decode(r["lines"], type=list[EarnLineEntry]) if r["lines"] is not None else [],
        qual=r["qual"] or 0,
        rp=r["rank_period"] or 0,
    )


# -- coupons, as rehydrate and reconcile read them -----------------------------------------------

_COUPONS = """
SELECT account_id, coupon_id, campaign_id, issued_at, expire_at, used_at FROM coupons
WHERE account_id = ANY($1::text[]) ORDER BY account_id, coupon_id
"""


async def account_coupons(conn: Connection, accounts: list[str]) -> dict[str, dict[str, CouponEntry]]:
    """The coupons of each of these accounts (its hash's q:<coupon id> fields), by coupon id."""
    out: dict[str, dict[str, CouponEntry]] = defaultdict(dict)
    for r in await conn.fetch(_COUPONS, accounts):
        used = r["used_at"]
        out[r["account_id"]][r["coupon_id"]] = CouponEntry(
            r["coupon_id"], r["campaign_id"], to_ms(r["issued_at"]), to_ms(r["expire_at"]),
            0 if used is None else to_ms(used),
        )  # fmt: skip
    return dict(out)


# -- merges, as rehydrate and reconcile read them ------------------------------------------------

_MERGE_HISTORY = """
SELECT landed_on, merge_id, source_id, landed_at FROM merges WHERE landed_on = ANY($1::text[])
"""


async def merge_histories(conn: Connection, accounts: list[str]) -> dict[str, dict[str, MergeIn]]:
    """The merges into each of these accounts (its hash's mh:<merge id> fields), by merge id."""
    out: dict[str, dict[str, MergeIn]] = defaultdict(dict)
    for r in await conn.fetch(_MERGE_HISTORY, accounts):
        out[r["landed_on"]][r["merge_id"]] = MergeIn(r["source_id"], to_ms(r["landed_at"]))
    return dict(out)


# The source's rule counts, first-earn mark and visit limits went with the move too: they are its
# accounts row's, which no event changes after its MERGED_OUT. Its coupons left it: the merges row
# keeps them (NULL: a merge journaled before coupons, which had none).
_MERGE_MOVES = """
SELECT m.merge_id, m.source_id, m.target_id, m.merged_at, m.lots::text AS lots, m.cards::text AS cards,
       m.foreign_refunds::text AS foreign_refunds, m.coupons::text AS coupons, m.landed_on,
       a.rule_counts::text AS rule_counts,
       a.first_earn_at IS NOT NULL AS earned, a.visits::text AS visits
FROM merges AS m LEFT JOIN accounts AS a ON a.account_id = m.source_id
WHERE m.source_id = ANY($1::text[]) AND m.lots IS NOT NULL
"""


async def merge_moves(conn: Connection, sources: list[str]) -> dict[str, tuple[MergeMove, bool]]:
    """The move record (its transactions hash's field "m") of each of these accounts merged out,
    and whether its merge is still to be finished (its MERGED_IN is not here)."""
    out: dict[str, tuple[MergeMove, bool]] = {}
    for r in await conn.fetch(_MERGE_MOVES, sources):
        cards = msgspec.json.decode(r["cards"], type=dict[str, str])
        foreign = msgspec.json.decode(r["foreign_refunds"], type=dict[str, str])
        counts = rule_counts_from_row(r["rule_counts"])
        visits = visits_from_row(r["visits"])
        coupons = msgspec.json.decode(r["coupons"], type=dict[str, str]) if r["coupons"] is not None else {}
        move = MergeMove(
            merge=r["merge_id"],
            source=r["source_id"],
            target=r["target_id"],
            time=to_ms(r["merged_at"]),
            lots=msgspec.json.decode(r["lots"], type=list[LotEntry]),
            # As the script packs them: an empty table is an array, a table without a key absent.
            cards=cards or [],
            foreign=foreign or None,
            # The script's k: field values, as text; absent when none.
            counts={rule: str(n) for rule, n in counts.items()} or None,
            earned=bool(r["earned"]),
            visits={key: str(day) for key, day in visits.items()} or None,
            coupons=dict(sorted(coupons.items())) or None,
        )
        out[r["source_id"]] = (move, r["landed_on"] is None)
    return out


# Where each refunded transaction of a merged account keeps its refund state: the account that
# refunded it (a REFUND naming it in ref_account), or the account that one has since been merged
# into (by a merge that has landed), and so on; not an account merged out itself (its f: fields
# went into its move record, see merge_moves). The state is the original's row: refunded, each
# allocation entry's returned and each line's refunded, which every refund of it, wherever, has
# brought up to date. Merges
# are rare: the walk reads every refund of a merged account's transaction.
_FOREIGN_REFUNDS = """
WITH RECURSIVE held (ref_account, ref_seq, holder) AS (
    SELECT DISTINCT ref_account, ref_seq, account_id FROM transactions
    WHERE ref_account IS NOT NULL AND type = 'REFUND'
    UNION
    SELECT h.ref_account, h.ref_seq, m.landed_on
    FROM held AS h JOIN merges AS m ON m.source_id = h.holder AND m.landed_on IS NOT NULL
)
SELECT h.holder, h.ref_account, h.ref_seq, t.refunded, t.alloc::text AS alloc, t.lines::text AS lines
FROM held AS h JOIN transactions AS t ON t.account_id = h.ref_account AND t.seq = h.ref_seq
WHERE h.holder = ANY($1::text[]) AND NOT EXISTS (SELECT FROM merges AS m WHERE m.source_id = h.holder)
"""


async def foreign_refunds(conn: Connection, accounts: list[str]) -> dict[str, dict[str, str]]:
    """The f:<transaction id> fields of these accounts: what has been refunded of a transaction of
    an account merged into them (codec.foreign_refund_state)."""
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for r in await conn.fetch(_FOREIGN_REFUNDS, accounts):
        alloc = msgspec.json.decode(r["alloc"], type=list[AllocEntry]) if r["alloc"] is not None else []
        lines = msgspec.json.decode(r["lines"], type=list[EarnLineEntry]) if r["lines"] is not None else []
        state = foreign_refund_state(r["refunded"], (e.returned for e in alloc), (line.refunded for line in lines))
        out[r["holder"]][transaction_id(r["ref_account"], r["ref_seq"])] = state
    return dict(out)
