"""The Locust scenarios, run headless (the documented command) against a real in-process server:
the tills' checkouts reach the ledger, refusals are not failures, and the CSV is written."""

from __future__ import annotations

import asyncio
import csv
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pointauth.client import Channel, PointOfSale, PointsClient
from pointauth.server.app import PointauthServer
from pointauth.server.config import Settings

REPO = Path(__file__).resolve().parents[2]
MEMBERS = 10
POINTS = 1_000


@pytest.mark.usefixtures("redis")  # a flushed Redis
async def test_headless_run_moves_balances_without_failures(settings: Settings, tmp_path: Path) -> None:
    # The system clock, not the tests' manual one: the users stamp purchases with the real time.
    async with (
        PointauthServer(settings, sweeper=False) as server,
        PointsClient(f"127.0.0.1:{server.port}") as client,
    ):
        desk = PointOfSale(company_id="acme", store_id="hq", terminal_id="admin", channel=Channel.CHANNEL_STORE)
        expiry = datetime.now(UTC) + timedelta(days=365)
        for n in range(MEMBERS):
            await client.create_account(f"a{n:08d}", f"9{n:015d}")
            await client.grant_points(f"9{n:015d}", POINTS, expiry, desk)

        locust = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless",
            "-u", "6", "-r", "6", "-t", "5s", "--host", f"127.0.0.1:{server.port}",
            "--accounts", str(MEMBERS), "--csv", str(tmp_path / "run"), "--only-summary",
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await asyncio.wait_for(locust.communicate(), timeout=60)
        assert locust.returncode == 0, output.decode()

        balances = [(await client.get_balance(f"9{n:015d}")).balance.available_points for n in range(MEMBERS)]
    assert balances != [POINTS] * MEMBERS  # checkouts spent and earned points

    with (tmp_path / "run_stats.csv").open() as stats:
        rows = {row["Name"]: row for row in csv.DictReader(stats)}
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    assert int(rows["AuthorizeHold"]["Request Count"]) > 0
    assert int(rows["EarnPoints"]["Request Count"]) > 0
