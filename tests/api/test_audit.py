"""The audit trail end to end, over real TLS with API keys: every operator action (however it
ends) and every call refused for its credentials or permissions reaches PostgreSQL's audit_log
through the write-behind, with who, what, when, from where and the request; till traffic does not;
nobody can change a record; a flood of refusals is counted, not written one by one."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis

from pointauth.client import ClientTLS, PointsClient
from pointauth.server.api.audit import OPERATOR_ACTIONS
from pointauth.server.app import PointauthServer
from pointauth.server.clock import ManualClock
from pointauth.server.config import Settings
from pointauth.server.devstack.certificates import Pki
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.domain.group import Entry
from pointauth.server.journal.audit import AuditQuery
from pointauth.server.journal.pg import connection
from pointauth.server.ledger import Keyspace
from pointauth.server.ledger.codec import AUDIT_FIELD, AuditRecord
from pointauth.server.ops.audit import audit_command
from pointauth.server.services.audit import Auditor
from pointauth.v1 import (
    admin_service_pb2,
    group_service_pb2,
    members_service_pb2,
    rules_service_pb2,
    settlement_service_pb2,
)
from tests.api import test_access
from tests.api.test_access import KEYS, connect, refused, secured_settings
from tests.conftest import CARD, DAY_MS, START_MS, STORE, at
from tests.journal.support import running_worker

# The secured server's certificates and credentials, as test_access.py makes them.
pki = test_access.pki
credentials_file = test_access.credentials_file

COLUMNS = ("method", "actor", "role", "code", "reason", "request", "suppressed", "peer", "at")


@pytest.fixture
async def audited(
    stack: EmbeddedStack,
    settings: Settings,
    clock: ManualClock,
    redis: Redis,
    group: tuple[Entry, ...],
    pki: Pki,
    credentials_file: Path,
    dsn: str,
    keyspace: Keyspace,
) -> AsyncIterator[tuple[PointauthServer, str]]:
    secure = secured_settings(settings, pki, credentials_file, mtls=False)
    secure = msgspec.structs.replace(secure, postgres=msgspec.structs.replace(secure.postgres, dsn=dsn))
    async with PointauthServer(secure, clock, sweeper=False) as server:
        yield server, dsn


async def audit_rows(stack: EmbeddedStack, redis: Redis, dsn: str, keyspace: Keyspace, n: int) -> list[dict[str, Any]]:
    """The audit_log rows once the worker has copied `n` of them, oldest first."""
    async with running_worker(stack.redis.url, dsn, keyspace) as worker:
        for _ in range(300):
            if worker.audit_records_applied >= n:
                break
            await asyncio.sleep(0.02)
    async with connection(dsn) as conn:
        rows = await conn.fetch(
            "SELECT method, actor, role, code, reason, request::text AS request, suppressed, peer, at FROM audit_log"
            " ORDER BY at, entry_id"
        )
    return [{c: r[c] for c in COLUMNS} for r in rows]


async def test_operator_actions_and_access_refusals_are_recorded_with_who_what_and_the_request(
    stack: EmbeddedStack,
    redis: Redis,
    keyspace: Keyspace,
    audited: tuple[PointauthServer, str],
    pki: Pki,
    clock: ManualClock,
) -> None:
    server, dsn = audited
    async with connect(server, pki, "operator-1", "tls+key") as operator:
        await operator.create_account("member-1", CARD)
        await operator.grant_points(CARD, 1000, at(clock.now_ms() + 30 * DAY_MS), STORE)
        await operator.block_card(CARD)
        await refused(operator.grant_points(CARD, -5, at(clock.now_ms() + DAY_MS), STORE))  # INVALID_ARGUMENT
        await operator.unblock_card(CARD)
        await operator.get_balance(CARD)  # a read: not recorded
    async with connect(server, pki, "till-acme", "tls+key") as till:
        await till.redeem_points(CARD, STORE, 10)  # till traffic is the journal's, not the audit's
        await refused(till.grant_points(CARD, 10**6, at(clock.now_ms() + DAY_MS), STORE))
    tls = ClientTLS.from_files(pki.ca_cert)
    async with PointsClient(f"127.0.0.1:{server.port}", tls=tls, api_key="ghost.secret") as stranger:
        await refused(stranger.get_balance(CARD))

    rows = await audit_rows(stack, redis, dsn, keyspace, 7)
    assert [(r["method"].rsplit("/", 1)[-1], r["actor"], r["role"], r["code"], r["reason"]) for r in rows] == [
        ("CreateAccount", "operator-1", "operator", "OK", ""),
        ("GrantPoints", "operator-1", "operator", "OK", ""),
        ("BlockCard", "operator-1", "operator", "OK", ""),
        ("GrantPoints", "operator-1", "operator", "INVALID_ARGUMENT", "INVALID_ARGUMENT"),
        ("UnblockCard", "operator-1", "operator", "OK", ""),
        ("GrantPoints", "till-acme", "till", "PERMISSION_DENIED", "METHOD_NOT_ALLOWED"),
        ("GetBalance", "key:ghost", "", "UNAUTHENTICATED", "CREDENTIALS_INVALID"),
    ]
    grant = json.loads(rows[1]["request"])
    assert (grant["card_number"], grant["points"], grant["point_of_sale"]["store_id"]) == (CARD, "1000", "store-1")
    assert rows[1]["method"] == "/pointauth.v1.AdminService/GrantPoints"
    assert all(r["peer"].startswith("ipv4:127.0.0.1:") for r in rows)
    assert {r["at"] for r in rows} == {at(START_MS)}  # the server's clock
    assert KEYS["operator-1"] not in json.dumps([r["request"] for r in rows])

    # No UPDATE, DELETE or TRUNCATE of the trail, even by the tables' owner (the role the tests use),
    # short of disabling the trigger, which README's production roles can't.
    async with connection(dsn) as conn:
        for sql in ("UPDATE audit_log SET actor = 'someone'", "DELETE FROM audit_log", "TRUNCATE audit_log"):
            with pytest.raises(Exception, match="append-only"):
                await conn.execute(sql)
        assert await conn.fetchval("SELECT count(*) FROM audit_log") == 7

    # Operators read it with `pointauth audit`.
    out = io.StringIO()
    cli_settings = msgspec.structs.replace(server.settings)
    query = AuditQuery(refusals=True)
    assert await asyncio.to_thread(audit_command, cli_settings, query, show_requests=True, out=out) == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 6  # three refusals, each with its request
    assert lines[0].endswith("UNAUTHENTICATED CREDENTIALS_INVALID  from " + rows[6]["peer"])
    assert "key:ghost" in lines[0]
    assert lines[1] == f"    {rows[6]['request']}"
    assert "till-acme (till)  /pointauth.v1.AdminService/GrantPoints  PERMISSION_DENIED METHOD_NOT_ALLOWED" in lines[2]


async def test_a_flood_of_refusals_is_counted_not_written_one_by_one(redis: Redis, keyspace: Keyspace) -> None:
    now = [100.0]
    auditor = Auditor(redis, keyspace, ManualClock(START_MS), refusals_per_second=3, monotonic=lambda: now[0])
    flood = auditor.now("/pointauth.v1.AdminService/GrantPoints", "key:x", "", "ipv4:1", "UNAUTHENTICATED", "", "")
    probe = msgspec.structs.replace(flood, actor="till-acme", role="till", code="PERMISSION_DENIED")
    for _ in range(10):
        await auditor.refusal(flood)
    await auditor.refusal(probe)  # another caller in the same second: not hidden by the flood
    now[0] += 1.0
    await auditor.refusal(flood)
    await auditor.action(flood)  # actions are never held back
    entries: Any = await redis.xrange(keyspace.events(0))
    written = [msgspec.msgpack.decode(fields[AUDIT_FIELD], type=AuditRecord) for _, fields in entries]
    # 3 of the flood in the first second, 7 counted; its next second's first record says so.
    assert [(r.actor, r.suppressed) for r in written] == [
        ("key:x", 0), ("key:x", 0), ("key:x", 0), ("till-acme", 0), ("key:x", 7), ("key:x", 0),
    ]  # fmt: skip


async def test_a_request_with_a_nul_character_is_recorded_and_does_not_stop_the_write_behind(
    stack: EmbeddedStack, redis: Redis, keyspace: Keyspace, audited: tuple[PointauthServer, str], pki: Pki
) -> None:
    server, dsn = audited
    tls = ClientTLS.from_files(pki.ca_cert)
    async with PointsClient(f"127.0.0.1:{server.port}", tls=tls, api_key="ghost.secret") as stranger:
        await refused(stranger.get_balance("A\x00B"))
    async with connect(server, pki, "operator-1", "tls+key") as operator:
        await operator.create_account("member-1", CARD)  # applied after it: the stream goes on
    rows = await audit_rows(stack, redis, dsn, keyspace, 2)
    assert [(r["method"].rsplit("/", 1)[-1], json.loads(r["request"]) if r["request"] else None) for r in rows] == [
        ("GetBalance", {"card_number": "A\ufffdB"}),
        ("CreateAccount", {"account_id": "member-1", "card_number": CARD, "card_kind": "CARD_KIND_PHYSICAL"}),
    ]


def test_every_rpc_that_changes_something_outside_a_sale_is_an_operator_action() -> None:
    """A new RPC of the back-office services must be classified: recorded, or a read."""
    back_office = (admin_service_pb2, members_service_pb2, group_service_pb2, rules_service_pb2, settlement_service_pb2)
    rpcs = {
        f"/{service.full_name}/{method.name}"
        for module in back_office
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    reads = {rpc for rpc in rpcs if rpc.rsplit("/", 1)[1].startswith(("Get", "List", "Export"))}
    assert rpcs - reads == OPERATOR_ACTIONS
    # GrantPoints is the one of them on AdminService; the till's own calls are the journal's.
    assert "/pointauth.v1.AdminService/GrantPoints" in OPERATOR_ACTIONS
