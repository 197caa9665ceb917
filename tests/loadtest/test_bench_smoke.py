"""The benchmark runs end to end in quick mode against the test stack and reports sane figures.
No timed assertions: speed is for the benchmark to print, not for tests to judge."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from redis.asyncio import Redis

from loadtest.bench import HEADER
from pointauth.server.devstack.stack import EmbeddedStack

REPO = Path(__file__).resolve().parents[2]


def test_quick_bench_reports_ordered_percentiles_and_no_errors(
    stack: EmbeddedStack, redis: Redis, tmp_path: Path
) -> None:
    # `redis` flushed the session's Redis: the bench seeds its own population (1,024 shards).
    out = tmp_path / "bench.json"
    command = [
        sys.executable, "-m", "loadtest.bench", "--quick",
        "--accounts", "1000", "--workers", "1", "--clients", "1",
        "--redis-url", stack.redis.url, "--postgres-dsn", stack.postgres.dsn, "--json", str(out),
    ]  # fmt: skip
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr

    result = json.loads(out.read_text())
    rows = {row["scenario"]: row for row in result["rows"]}
    assert set(rows) == {"echo", "authorize_capture", "earn", "balance"}
    for row in rows.values():
        assert row["ok"] > 0
        assert row["ops_per_s"] > 0
        assert (row["errors"], row["refused"]) == (0, 0), row
        for name, latency in row["latency_ms"].items():
            assert 0 < latency["p50"] <= latency["p99"] <= latency["p99.9"] <= latency["max"], (name, latency)
            assert latency["count"] == row["ok"]
    assert set(rows["authorize_capture"]["latency_ms"]) == {"op", "AuthorizeHold", "CaptureHold"}
    assert result["echo_ceiling_rpcs_per_s"] == rows["echo"]["rpcs_per_s"]
    assert result["redis_memory"]["accounts"] == 1000
    assert result["redis_memory"]["used_memory"] > 0
    assert "Authorize+Capture" in run.stdout

    # One table, printed once the ratios to the echo ceiling are known (progress goes to stderr).
    output = run.stdout + run.stderr
    assert output.count(HEADER) == 1, output
    table = run.stdout.split(HEADER, 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    assert [line.split()[0] for line in table] == ["echo", "Authorize+Capture", "AuthorizeHold", "CaptureHold",
                                                    "EarnPoints", "GetBalance"], table  # fmt: skip
    ratio_column = slice(22 + HEADER.index("÷echo") - 1, 22 + HEADER.index("÷echo") + 5)
    for line in table:
        if line.startswith("  "):  # one call of a pair: its latencies only, the rest is the pair's
            assert len(line.split()) == 4, line
        else:
            assert float(line[ratio_column]) > 0, line
    # The seeding's progress bar counts accounts, to the account count.
    bars = re.findall(r"(\d+)/(\d+) accounts", run.stderr)
    assert bars, run.stderr
    assert {int(total) for _, total in bars} == {1000}
    assert int(bars[-1][0]) == 1000
