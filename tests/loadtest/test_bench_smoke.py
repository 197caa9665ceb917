"""The benchmark runs end to end in quick mode against the test stack and reports sane figures.
No timed assertions: speed is for the benchmark to print, not for tests to judge."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from redis import Redis as SyncRedis
from redis.asyncio import Redis

from loadtest.bench import HEADER
from pointauth.server.devstack.stack import EmbeddedStack

REPO = Path(__file__).resolve().parents[2]


def test_quick_bench_reports_ordered_percentiles_and_no_errors(
    stack: EmbeddedStack, redis: Redis, tmp_path: Path
) -> None:
    # `redis` flushed the session's Redis: the bench seeds its own population (1,024 shards).
    out = tmp_path / "bench.json"
    with SyncRedis.from_url(stack.redis.url) as plain:
        rewrites_before = plain.info("persistence")["aof_rewrites"]
    command = [
        sys.executable, "-m", "loadtest.bench", "--quick",
        "--accounts", "1000", "--workers", "1", "--clients", "1", "--settle",
        "--redis-url", stack.redis.url, "--postgres-dsn", stack.postgres.dsn, "--json", str(out),
    ]  # fmt: skip
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr

    result = json.loads(out.read_text())
    closed = {row["scenario"]: row for row in result["summary"] if row["mode"] == "closed"}
    paced = [row for row in result["summary"] if row["mode"] != "closed"]
    assert set(closed) == {
        "echo", "echo_redis", "authorize", "authorize_capture", "earn", "earn_rules", "balance", "authorize_tls",
        "authorize_mtls",
    }  # fmt: skip
    assert [(row["scenario"], row["mode"]) for row in paced] == [
        ("authorize", "50/s"), ("authorize_tls", "50/s"), ("authorize_mtls", "50/s"),
    ]  # fmt: skip
    assert len(result["rows"]) == 12  # quick: one run of each step
    # earn_rules runs last, under the rule set published just before it; every step before it ran
    # without one. The drivers counted as errors (none, below) any flat earn answered under a rule
    # set, and any earn_rules answer without one or lacking the base line or an always-on campaign.
    assert result["rows"][-1]["scenario"] == "earn_rules"
    assert result["earn_rules"] == {"rule_set_version": 1, "base_rates": 8, "campaigns": 20}
    for row in result["rows"]:
        assert row["ok"] > 0
        assert (row["errors"], row["refused"]) == (0, 0), row
        assert 0 < row["busy"] <= 1
        assert row["lag_max_ms"] >= 0  # the write-behind lag during the step (0: nothing waited)
        for name, latency in row["latency_ms"].items():
            assert 0 < latency["p50"] <= latency["p99"] <= latency["p99.9"] <= latency["max"], (name, latency)
            assert latency["count"] == row["ok"]
    assert set(closed["authorize_capture"]["latency_ms"]) == {"op", "AuthorizeHold", "CaptureHold"}
    assert result["ceilings_rpcs_per_s"] == {ref: closed[ref]["rpcs_per_s"] for ref in ("echo", "echo_redis")}
    assert closed["authorize"]["ratios"]["echo"] == round(
        closed["authorize"]["rpcs_per_s"] / closed["echo"]["rpcs_per_s"], 3
    )
    # AuthorizeHold through TLS and authentication ran against servers of their own (as one till
    # credential, by API key and by client certificate), side by side with plaintext in the report.
    assert closed["authorize_tls"]["cpu_cores"]["server_tls"] > 0
    assert closed["authorize_mtls"]["cpu_cores"]["server_mtls"] > 0
    report = run.stdout[run.stdout.index("AuthorizeHold without and with TLS") :].splitlines()
    assert [line.split()[0] for line in report[1:4]] == ["plaintext", "TLS", "mTLS"]
    # Every process group's CPU is counted, the stores' included.
    assert {"server", "echo", "echo_redis", "worker", "redis", "postgres", "clients"} <= set(
        closed["authorize"]["cpu_cores"]
    )
    assert result["redis_memory"]["accounts"] == 1000
    # Redis's latency monitor was read over every step, and set back as it was once done.
    assert result["config"]["redis_stall_threshold_ms"] == 10
    assert all(isinstance(row["redis_stalls"], dict) for row in result["rows"])
    assert all(isinstance(row["redis_slow_commands"], list) for row in result["rows"])
    assert "Redis stalls of 10 ms or more (its latency monitor)" in run.stdout
    with SyncRedis.from_url(stack.redis.url) as plain:
        assert plain.config_get("latency-monitor-threshold") == {"latency-monitor-threshold": "0"}
        assert plain.config_get("slowlog-log-slower-than") == {"slowlog-log-slower-than": "10000"}
    assert result["redis_memory"]["used_memory"] > 0

    assert "settled in" in run.stderr  # --settle vacuumed PostgreSQL before measuring
    with SyncRedis.from_url(stack.redis.url) as plain:  # and rewrote the AOF: no fork during a step
        assert plain.info("persistence")["aof_rewrites"] == rewrites_before + 1
    # One table, printed once the ratios to the references are known (progress goes to stderr).
    output = run.stdout + run.stderr
    assert output.count(HEADER) == 1, output
    table = run.stdout.split(HEADER, 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    assert [line[:22].strip() for line in table] == [
        "echo (bare grpc.aio)", "echo + 1 Redis call", "AuthorizeHold", "Authorize+Capture",
        "AuthorizeHold", "CaptureHold", "EarnPoints", "EarnPoints (rules)", "GetBalance", "AuthorizeHold TLS+key",
        "AuthorizeHold mTLS", "AuthorizeHold", "AuthorizeHold TLS+key", "AuthorizeHold mTLS",
    ], table  # fmt: skip
    assert "EarnPoints (rules): a 5-line basket under rule set version 1" in run.stdout
    echo_column = slice(22 + HEADER.index("÷echo") - 1, 22 + HEADER.index("÷echo") + 5)
    for line in table:
        if line.startswith("  "):  # one call of a pair: its latencies only, the rest is the pair's
            assert len(line.split()) == 4, line
        elif " closed " in line:
            assert float(line[echo_column]) > 0, line
    # The seeding's progress bar counts accounts, to the account count.
    bars = re.findall(r"(\d+)/(\d+) accounts", run.stderr)
    assert bars, run.stderr
    assert {int(total) for _, total in bars} == {1000}
    assert int(bars[-1][0]) == 1000
