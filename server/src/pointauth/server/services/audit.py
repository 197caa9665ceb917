"""Recording the audit trail (ledger/codec.py, AuditRecord): records go to shard 0's stream, in
Redis before the call is answered, and the write-behind copies them to PostgreSQL's append-only
audit_log (journal/audit.py). The gRPC side is api/audit.py; operator commands record themselves.

Refusals are recorded at most `refusals_per_second` a second per caller (actor and peer) and
process: a flood of refused calls must not become a flood of writes, nor hide another caller's.
Those beyond it are counted in that caller's next record's `suppressed` (a process that stops
first loses the count: the log keeps nothing of them either).
"""

from __future__ import annotations

import getpass
import logging
import socket
import time
from collections.abc import Callable

import msgspec
from redis.asyncio import Redis

from pointauth.server.clock import Clock
from pointauth.server.ledger import BACKEND_ERRORS, Keyspace
from pointauth.server.ledger.codec import AuditRecord, audit_entry

log = logging.getLogger(__name__)


class Auditor:
    """Appends audit records to shard 0's stream."""

    def __init__(
        self,
        redis: Redis,
        keyspace: Keyspace,
        clock: Clock,
        refusals_per_second: int = 50,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.stream = keyspace.events(0)
        self.clock = clock
        self.monotonic = monotonic
        self.refusals_per_second = refusals_per_second
        self.closed = False
        """Set when the server stops: its Redis client is closing."""
        self._second = 0
        self._windows: dict[tuple[str, str], tuple[int, int]] = {}
        """(actor, peer) -> refusals recorded this second, refusals held back since its last record."""

    def now(self, method: str, actor: str, role: str, peer: str, code: str, reason: str, request: str) -> AuditRecord:
        return AuditRecord(self.clock.now_ms(), method, actor, role, peer, code, reason, request)

    async def action(self, record: AuditRecord) -> None:
        await self._append(record)

    async def refusal(self, record: AuditRecord) -> None:
        """Recorded unless this caller (actor and peer) had `refusals_per_second` recorded in this
        second already: then counted, and the count rides on its next recorded refusal. One caller's
        flood never hides another's refusals."""
        second = int(self.monotonic())
        if second != self._second:
            self._second = second
            # Callers with nothing held back start afresh; the map stays as small as the flood.
            self._windows = {key: (0, held) for key, (_, held) in self._windows.items() if held}
        key = (record.actor, record.peer)
        recorded, held = self._windows.get(key, (0, 0))
        if recorded >= self.refusals_per_second:
            self._windows[key] = (recorded, held + 1)
            return
        self._windows[key] = (recorded + 1, 0)
        await self._append(msgspec.structs.replace(record, suppressed=held))

    async def command(self, command: str, request: str, code: str = "OK", reason: str = "") -> None:
        """An operator command run from the command line (`pointauth settle --close`...)."""
        peer = f"host:{socket.gethostname()}"
        await self.action(self.now(f"cli:{command}", f"os:{getpass.getuser()}", "", peer, code, reason, request))

    async def _append(self, record: AuditRecord) -> None:
        if self.closed:
            log.error("audit record after the server stopped, not written: %s by %r", record.method, record.actor)
            return
        try:
            await self.redis.xadd(self.stream, audit_entry(record))  # type: ignore[arg-type]
        except BACKEND_ERRORS:
            # The action itself is done (or refused) already: answering it as failed now would
            # mislead the caller. The log has it; an operator reconciles.
            # Without the request: it may hold a member's data, which logs must not.
            log.error(
                "audit record not written (Redis unavailable): %s by %r from %s, %s",
                record.method, record.actor, record.peer, record.code,
            )  # fmt: skip
