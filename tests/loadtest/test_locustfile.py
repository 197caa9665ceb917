"""The Locust scenarios, run headless (the documented command) against a real in-process server:
the tills' checkouts reach the ledger, refusals are not failures, and the CSV is written; what
the run's stats count, the ledger applied, and every balance is exactly what its events add up to."""

from __future__ import annotations

import asyncio
import csv
import json
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

from redis.asyncio import Redis

from pointauth.client import Channel, PointOfSale, PointsClient
from pointauth.server.app import PointauthServer
from pointauth.server.config import Settings
from pointauth.server.domain.group import Company, Store
from pointauth.server.journal.events import EntryId, Event, StreamEntry, decode
from pointauth.server.ledger import Keyspace
from pointauth.server.ops.seed_group import SeedGroup

REPO = Path(__file__).resolve().parents[2]
MEMBERS = 10
POINTS = 1_000
USERS = 6
GROUP = SeedGroup(companies=2, stores=3, terminals=2)


async def _all_events(redis: Redis, keyspace: Keyspace) -> list[Event]:
    """Every event the ledger appended, from every shard's stream (no worker consumes them here)."""
    found: list[Event] = []
    for shard in range(keyspace.shards):
        stream = keyspace.events(shard)
        entries: list[tuple[bytes, dict[bytes, bytes]]] = await redis.xrange(stream)  # type: ignore[assignment]
        for entry_id, fields in entries:
            decoded = decode(StreamEntry(stream, shard, EntryId.parse(entry_id), fields))
            if isinstance(decoded, Event):
                found.append(decoded)
    return found


def _expected_balance(events: list[Event]) -> tuple[int, int]:
    """An account's (available, held) points by the arithmetic of its own events."""
    types = {event.seq: event.type for event in events}
    available = held = 0
    for event in events:
        if event.type in ("GRANT", "EARN"):
            available += event.pts
        elif event.type == "HOLD_AUTHORIZED":
            available -= event.pts
            held += event.pts
        elif event.type == "HOLD_CAPTURED":
            released = event.released or 0
            held -= event.pts + released
            available += released
        elif event.type == "HOLD_VOIDED":
            held -= event.pts
            available += event.pts
        elif event.type == "REFUNDED":
            # A refund of an earn takes its points back; a refund of a capture returns them.
            assert event.ref is not None
            available += event.pts if types[event.ref] == "HOLD_CAPTURED" else -event.pts
        else:
            assert event.type == "ACCOUNT_OPENED", event
    return available, held


async def test_headless_run_moves_balances_without_failures(
    settings: Settings, redis: Redis, keyspace: Keyspace, tmp_path: Path
) -> None:
    # The system clock, not the tests' manual one: the users stamp purchases with the real time.
    async with (
        PointauthServer(settings, sweeper=False) as server,
        PointsClient(f"127.0.0.1:{server.port}", plaintext=True) as client,
    ):
        desk = PointOfSale(company_id="acme", store_id="hq", terminal_id="admin", channel=Channel.CHANNEL_STORE)
        # The desk's point of sale and the tills' (a small seeded group, as the run is told).
        await client.register_company("acme")
        await client.register_store("hq", company_id="acme", region_id="kanto")
        await client.register_terminal("hq", "admin")
        for entry in GROUP.entries():
            if isinstance(entry, Company):
                await client.register_company(entry.company_id)
            elif isinstance(entry, Store):
                await client.register_store(entry.store_id, company_id=entry.company_id, region_id=entry.region_id)
            else:
                await client.register_terminal(entry.store_id, entry.terminal_id)
        expiry = datetime.now(UTC) + timedelta(days=365)
        for n in range(MEMBERS):
            await client.create_account(f"a{n:08d}", f"9{n:015d}")
            await client.grant_points(f"9{n:015d}", POINTS, expiry, desk)

        # --stop-timeout: at the end a user in the middle of a checkout finishes it. One whose
        # pause ends just as the run stops may still be killed in its next task's first call,
        # applied but not counted: an AuthorizeHold (its hold stays open) or a RefundTransaction.
        # The CSV is a snapshot taken every second (it misses the last); the JSON file is final.
        locust = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless",
            "-u", str(USERS), "-r", str(USERS), "-t", "5s", "--stop-timeout", "10",
            "--host", f"127.0.0.1:{server.port}", "--accounts", str(MEMBERS),
            "--companies", str(GROUP.companies), "--stores", str(GROUP.stores), "--terminals", str(GROUP.terminals),
            "--csv", str(tmp_path / "run"), "--json-file", str(tmp_path / "final"), "--only-summary",
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await asyncio.wait_for(locust.communicate(), timeout=60)
        assert locust.returncode == 0, output.decode()

        balances = [(await client.get_balance(f"9{n:015d}")).balance for n in range(MEMBERS)]

    with (tmp_path / "run_stats.csv").open() as stats:
        rows = {row["Name"]: row for row in csv.DictReader(stats)}
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    assert int(rows["AuthorizeHold"]["Request Count"]) > 0
    assert int(rows["EarnPoints"]["Request Count"]) > 0

    final = {entry["name"]: entry for entry in json.loads((tmp_path / "final.json").read_text())}
    assert sum(entry["num_failures"] for entry in final.values()) == 0

    # Refusals are lines of their own ("AuthorizeHold [INSUFFICIENT_POINTS]"): an RPC's own line
    # counts calls the server applied.
    def applied(rpc: str) -> int:
        return int(final[rpc]["num_requests"]) if rpc in final else 0

    assert applied("EarnPoints") > 0
    assert applied("CaptureHold") > 0
    # Every counted checkout captures or voids its hold.
    assert applied("AuthorizeHold") == applied("CaptureHold") + applied("VoidHold")

    # The ledger's events: one per call counted, besides the openings and grants above, and at most
    # one uncounted call per user (see above).
    events = await _all_events(redis, keyspace)
    resolved = {(event.account, event.ref) for event in events if event.type in ("HOLD_CAPTURED", "HOLD_VOIDED")}
    open_holds = [e for e in events if e.type == "HOLD_AUTHORIZED" and (e.account, e.seq) not in resolved]
    counted = Counter(event.type for event in events)
    uncounted_refunds = counted["REFUNDED"] - applied("RefundTransaction")
    assert counted == Counter(
        {
            "ACCOUNT_OPENED": MEMBERS,
            "GRANT": MEMBERS,
            "EARN": applied("EarnPoints"),
            "HOLD_AUTHORIZED": applied("AuthorizeHold") + len(open_holds),
            "HOLD_CAPTURED": applied("CaptureHold"),
            "HOLD_VOIDED": applied("VoidHold"),
            "REFUNDED": applied("RefundTransaction") + uncounted_refunds,
        }
    )
    assert uncounted_refunds >= 0
    assert len(open_holds) + uncounted_refunds <= USERS
    assert {event.pts for event in events if event.type == "GRANT"} == {POINTS}
    # Earns at the default rate (1 point per 100 yen, rounded down); checkouts capture whole holds.
    earns = [event for event in events if event.type == "EARN"]
    assert [event.pts for event in earns] == [(event.amount or 0) // 100 for event in earns]
    assert {event.released for event in events if event.type == "HOLD_CAPTURED"} <= {0}

    # Each member's balance is exactly what its events add up to.
    assert [(balance.available_points, balance.held_points) for balance in balances] == [
        _expected_balance([event for event in events if event.account == f"a{n:08d}"]) for n in range(MEMBERS)
    ]
