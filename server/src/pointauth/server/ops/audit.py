"""`pointauth audit`: the audit trail as PostgreSQL has it, newest first."""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime
from typing import TextIO

from pointauth.server.config import Settings
from pointauth.server.journal.audit import AuditQuery, query
from pointauth.server.journal.pg import connection


def audit_command(settings: Settings, q: AuditQuery, *, show_requests: bool = False, out: TextIO = sys.stdout) -> int:
    async def fetch() -> list[str]:
        async with connection(settings.postgres.dsn) as conn:
            rows = await query(conn, q)
        lines = []
        for r in rows:
            at: datetime = r["at"]
            who = f"{r['actor'] or '(no credential)'}" + (f" ({r['role']})" if r["role"] else "")
            outcome = r["code"] + (f" {r['reason']}" if r["reason"] else "")
            more = f" [+{r['suppressed']} refusals not recorded]" if r["suppressed"] else ""
            lines.append(f"{at.isoformat()}  {who}  {r['method']}  {outcome}  from {r['peer']}{more}")
            if show_requests and r["request"]:
                lines.append(f"    {r['request']}")
        return lines

    for line in asyncio.run(fetch()):
        print(line, file=out)
    return 0
