"""The audit trail in PostgreSQL (migration 0008): records copied from shard 0's stream, and the
operators' query of them (`pointauth audit`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pointauth.server.journal.events import AuditRecord, StreamEntry
from pointauth.server.journal.pg import Connection, Record


def jsonb_text(text: str) -> str:
    """JSON that PostgreSQL's jsonb accepts: it refuses the NUL character (\\u0000), which a
    request's strings may hold (a caller's junk must not stop the write-behind): it becomes U+FFFD."""
    if "\\u0000" not in text:
        return text
    return json.dumps(_without_nul(json.loads(text)), ensure_ascii=False)


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    return value


async def write_records(conn: Connection, records: Sequence[tuple[StreamEntry, AuditRecord]]) -> None:
    """Copies the records (in the caller's transaction); one already there is kept."""
    if not records:
        return
    rows = [
        (
            entry.stream,
            str(entry.entry_id),
            datetime.fromtimestamp(r.time / 1000, tz=UTC),
            r.method,
            r.actor,
            r.role,
            r.peer,
            r.code,
            r.reason,
            jsonb_text(r.request) if r.request else None,
            r.suppressed,
        )
        for entry, r in records
    ]
    await conn.execute(
        """
        INSERT INTO audit_log (stream, entry_id, at, method, actor, role, peer, code, reason, request, suppressed)
        SELECT stream, entry_id, at, method, actor, role, peer, code, reason, request::jsonb, suppressed
        FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[], $6::text[], $7::text[],
                    $8::text[], $9::text[], $10::text[], $11::int[])
            AS t(stream, entry_id, at, method, actor, role, peer, code, reason, request, suppressed)
        ON CONFLICT DO NOTHING
        """,
        *map(list, zip(*rows, strict=True)),
    )


@dataclass(frozen=True)
class AuditQuery:
    since: datetime | None = None
    actor: str = ""
    method: str = ""
    """A substring of the method (`MergeAccounts`, `SettlementService/`)."""
    refusals: bool = False
    """Only calls that did not succeed."""
    limit: int = 100


async def query(conn: Connection, q: AuditQuery) -> list[Record]:
    """The matching records, newest first."""
    return await conn.fetch(
        "SELECT at, method, actor, role, peer, code, reason, request::text AS request, suppressed FROM audit_log"
        " WHERE ($1::timestamptz IS NULL OR at >= $1) AND ($2 = '' OR actor = $2)"
        " AND ($3 = '' OR strpos(method, $3) > 0) AND (NOT $4 OR code <> 'OK')"
        " ORDER BY at DESC, entry_id DESC LIMIT $5",
        q.since,
        q.actor,
        q.method,
        q.refusals,
        q.limit,
    )
