"""Recording the audit trail (ledger/codec.py, AuditRecord): records go to shard 0's stream, in
Redis before the call is answered, and the write-behind copies them to PostgreSQL's append-only
audit_log (journal/audit.py). The gRPC side is api/audit.py; operator commands record themselves.

Refusals are recorded at most `refusals_per_second` a second per process: a flood of refused
calls must not become a flood of writes. Those beyond it are counted in the next record's
`suppressed`, never silently dropped.
"""

from __future__ import annotations

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
        self._second, self._recorded, self._suppressed = 0, 0, 0

    def now(self, method: str, actor: str, role: str, peer: str, code: str, reason: str, request: str) -> AuditRecord:
        return AuditRecord(self.clock.now_ms(), method, actor, role, peer, code, reason, request)

    async def action(self, record: AuditRecord) -> None:
        await self._append(record)

    async def refusal(self, record: AuditRecord) -> None:
        second = int(self.monotonic())
        if second != self._second:
            self._second, self._recorded = second, 0
        if self._recorded >= self.refusals_per_second:
            self._suppressed += 1
            return
        self._recorded += 1
        suppressed, self._suppressed = self._suppressed, 0
        await self._append(msgspec.structs.replace(record, suppressed=suppressed))

    async def command(self, command: str, request: str, code: str = "OK", reason: str = "") -> None:
        """An operator command run from the command line (`pointauth settle --close`...)."""
        peer = f"host:{socket.gethostname()}"
        await self.action(self.now(f"cli:{command}", "", "", peer, code, reason, request))

    async def _append(self, record: AuditRecord) -> None:
        try:
            await self.redis.xadd(self.stream, audit_entry(record))  # type: ignore[arg-type]
        except BACKEND_ERRORS:
            # The action itself is done (or refused) already: answering it as failed now would
            # mislead the caller. The log has it; an operator reconciles.
            log.error("audit record not written (Redis unavailable): %s", record)
