"""`python -m loadtest.bench`: pointauth's speed in one run, on one machine.

It starts (or is given) Redis and PostgreSQL, seeds the population, and runs `pointauth serve
--workers N`, the write-behind worker and two references with the same N: a bare grpc.aio echo,
and the echo plus one Redis script call per RPC (the ceiling of any design that touches Redis
once). Then, from a pool of client processes:

- closed loops at `--concurrency` of every scenario: throughput, and its ratio to both references;
  `earn_rules` (EarnPoints with a basket under a published rule set, loadtest/earn_rules.py) runs
  after every other step, so that they all run as before any rule set (the flat `earn` above all);
- AuthorizeHold at fixed rates (`--rates`): latency measured from when each call was due, not
  when it was sent (no coordinated omission), with how busy the machine was meanwhile;
- the same AuthorizeHold steps (closed loops, then each rate) against a second and third
  `pointauth serve` with TLS and API-key authentication, and with mTLS and client-certificate
  authentication (`--security`), in the same run: the cost of TLS and auth per call.

Each step runs `--repeat` times; the table shows the median and the spread (min-max). Latencies
are HDR histograms (µs). CPU is counted for every process group: server, references, Redis,
PostgreSQL, worker and the load generator. Redis's latency monitor is read over each step
(loadtest/stalls.py): a step during which Redis itself stalled (an fsync of the AOF, a fork, a
slow command) is reported with the event, its length and the commands Redis's SLOWLOG caught, so
a tail can be laid where it belongs.
`--json` writes every repeat for machines.

The table goes to stdout once, at the end; while it runs, one progress line per step (and the
seeding's progress bar) go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
from hdrh.histogram import HdrHistogram

from loadtest import earn_rules
from loadtest.driver import POS, Step, StepResult, new_histogram
from loadtest.lag import LagSampler, wait_until_drained
from loadtest.population import CARD_FORMAT, Population
from loadtest.procs import ClientPool, CpuMeter, Service, background_label, cpu_split, idle_cgroup, named, pin, tree
from loadtest.stalls import RedisStalls, describe
from pointauth.client import ClientTLS, NotFoundError, PointsClient
from pointauth.server.api.credentials import write_credentials_atomically
from pointauth.server.app import LISTENING
from pointauth.server.devstack.certificates import ensure_pki
from pointauth.server.devstack.stack import EmbeddedStack, free_port
from pointauth.server.domain.credentials import Credential, Role, encode_credentials, key_sha256, new_api_key
from pointauth.server.ledger import Keyspace, codec
from pointauth.server.ops.progress import ProgressBar
from pointauth.server.ops.seed_group import SeedGroup, load_group
from pointauth.v1 import points_service_pb2 as pb
from pointauth.v1 import rules_service_pb2

LABELS = {
    "echo": "echo (bare grpc.aio)",
    "echo_redis": "echo + 1 Redis call",
    "authorize": "AuthorizeHold",
    "authorize_capture": "Authorize+Capture",
    "earn": "EarnPoints",
    "earn_rules": "EarnPoints (rules)",
    "balance": "GetBalance",
    "authorize_tls": "AuthorizeHold TLS+key",
    "authorize_mtls": "AuthorizeHold mTLS",
}
# RPCs per unit operation: the ratios to the references compare calls with calls.
RPCS_PER_OP = {
    "echo": 1,
    "echo_redis": 1,
    "authorize": 1,
    "authorize_capture": 2,
    "earn": 1,
    "earn_rules": 1,
    "balance": 1,
    "authorize_tls": 1,
    "authorize_mtls": 1,
}
SECURED = {"tls": "authorize_tls", "mtls": "authorize_mtls"}
"""The secured servers (--security) and their rows: AuthorizeHold, the driver's `authorize`."""
BENCH_TILL = "bench-till"
REFERENCES = ("echo", "echo_redis")
UNDER_RULES = ("earn_rules",)
"""Scenarios that need the bench's rule set: they run after every other step, which all run as
before any rule set (a rule set cannot be withdrawn, and the flat `earn` measures the flat rate)."""
RULES_REFRESH_S = 1.0
"""How often the server processes look for a new rule set (rules.refresh_seconds)."""


@dataclass
class Row:
    scenario: str
    concurrency: int
    mode: str
    ops_per_s: float
    rpcs_per_s: float
    ok: int
    refused: int
    errors: int
    latency_ms: dict[str, dict[str, float]]
    cpu_cores: dict[str, float]
    busy: float = 0.0
    """How busy the whole machine was during the step: the share of all its cores' time."""
    lag_max_ms: int = 0
    """The write-behind lag's largest 1/s sample during the step."""
    redis_stalls: dict[str, int] = field(default_factory=dict)
    """Redis's latency monitor over the step: each event of at least stalls.THRESHOLD_MS, its
    longest in ms."""
    redis_slow_commands: list[str] = field(default_factory=list)
    """The commands that took that long, from Redis's SLOWLOG."""
    refusals: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)


@dataclass
class Summary:
    """A step's repeats: medians, with the spread (min, max) of throughput and p99."""

    scenario: str
    concurrency: int
    mode: str
    repeats: int
    ops_per_s: float
    ops_range: tuple[float, float]
    rpcs_per_s: float
    latency_ms: dict[str, dict[str, float]]
    p99_range: tuple[float, float]
    busy: float
    lag_max_ms: float
    cpu_cores: dict[str, float]
    refused: int
    errors: int
    ratios: dict[str, float] = field(default_factory=dict)
    """Calls per second over each reference's (echo, echo_redis)."""


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else round((ordered[middle - 1] + ordered[middle]) / 2, 3)


def summarize(rows: list[Row]) -> Summary:
    first = rows[0]
    p99s = [r.latency_ms.get("op", {}).get("p99", 0.0) for r in rows]
    return Summary(
        scenario=first.scenario,
        concurrency=first.concurrency,
        mode=first.mode,
        repeats=len(rows),
        ops_per_s=_median([r.ops_per_s for r in rows]),
        ops_range=(min(r.ops_per_s for r in rows), max(r.ops_per_s for r in rows)),
        rpcs_per_s=_median([r.rpcs_per_s for r in rows]),
        latency_ms={
            name: {key: _median([r.latency_ms[name][key] for r in rows if name in r.latency_ms]) for key in figures}
            for name, figures in first.latency_ms.items()
        },
        p99_range=(min(p99s), max(p99s)),
        busy=_median([r.busy for r in rows]),
        lag_max_ms=_median([float(r.lag_max_ms) for r in rows]),
        cpu_cores={name: _median([r.cpu_cores.get(name, 0.0) for r in rows]) for name in first.cpu_cores},
        refused=sum(r.refused for r in rows),
        errors=sum(r.errors for r in rows),
    )


def _percentiles(hist: HdrHistogram) -> dict[str, float]:
    def ms(value: float) -> float:
        return round(value / 1000, 3)

    return {
        "p50": ms(hist.get_value_at_percentile(50)),
        "p99": ms(hist.get_value_at_percentile(99)),
        "p99.9": ms(hist.get_value_at_percentile(99.9)),
        "max": ms(hist.get_max_value()),
        "count": hist.get_total_count(),
    }


def merge(scenario: str, concurrency: int, mode: str, duration_s: float, results: list[StepResult]) -> Row:
    merged: dict[str, HdrHistogram] = {}
    refusals: dict[str, int] = {}
    for result in results:
        for name, encoded in result.histograms.items():
            merged.setdefault(name, new_histogram()).decode_and_add(encoded)
        for reason, count in result.refusals.items():
            refusals[reason] = refusals.get(reason, 0) + count
    ok = sum(r.ok for r in results)
    return Row(
        scenario=scenario,
        concurrency=concurrency,
        mode=mode,
        ops_per_s=round(ok / duration_s, 1),
        rpcs_per_s=round(ok * RPCS_PER_OP[scenario] / duration_s, 1),
        ok=ok,
        refused=sum(r.refused for r in results),
        errors=sum(r.errors for r in results),
        latency_ms={name: _percentiles(hist) for name, hist in merged.items() if hist.get_total_count()},
        cpu_cores={},
        refusals=refusals,
        error_samples=[s for r in results for s in r.error_samples][:5],
    )


def split(total: int, parts: int) -> list[int]:
    """`total` loops over at most `parts` processes, as evenly as it goes (no empty share)."""
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


@dataclass
class Plan:
    concurrency: int
    rates: list[float]
    warmup_s: float
    duration_s: float
    repeat: int


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--accounts", type=int, default=100_000, help="population size (seeded unless --no-seed)")
    p.add_argument("--card-format", default=CARD_FORMAT, help="member n's card, a str.format with n")
    p.add_argument("--no-seed", action="store_true", help="the population is there already (pointauth seed)")
    p.add_argument("--workers", type=int, default=2, help="server processes, for pointauth and the echo alike")
    p.add_argument("--clients", type=int, default=2, help="load generator processes")
    p.add_argument("--concurrency", type=int, default=64, help="closed loops per throughput step")
    p.add_argument("--rates", default="100,200,400", help="fixed AuthorizeHold rates (calls/s) for latency")
    p.add_argument("--repeat", type=int, default=3, help="runs of each step; the table shows median and spread")
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per step")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each step")
    p.add_argument("--scenarios", default="authorize,authorize_capture,earn,earn_rules,balance")
    p.add_argument("--quick", action="store_true", help="8 loops, one rate (50/s), one 2 s run per step: ~40 s")
    p.add_argument("--hot-traffic", type=float, default=0.0, help="share of calls on the hot 20%% (0: uniform)")
    p.add_argument("--shards", type=int, default=1024, help="ledger shards (must match the seeded data)")
    p.add_argument("--redis-url", help="use this Redis instead of starting one")
    p.add_argument("--postgres-dsn", help="use this PostgreSQL instead of starting one (with --redis-url)")
    p.add_argument("--worker-cmd", help="write-behind worker command to run (default: `pointauth worker` if present)")
    p.add_argument("--data-dir", type=Path, help="embedded stack folder (default: a temporary one, removed)")
    p.add_argument(
        "--settle",
        action="store_true",
        help="before measuring: VACUUM ANALYZE and CHECKPOINT PostgreSQL, and rewrite Redis's AOF",
    )
    p.add_argument(
        "--security",
        default="tls,mtls",
        help="also AuthorizeHold against servers with TLS + API keys (tls) and mTLS + client certificates (mtls),"
        " each with authentication on; '' for neither",
    )
    p.add_argument(
        "--background-idle",
        action="store_true",
        help="the write-behind worker and PostgreSQL in a cgroup with cpu.idle = 1, as systemd's CPUWeight=idle"
        " puts them (needs root, the cgroup cpu controller and the embedded stack)",
    )
    p.add_argument(
        "--store-cpu",
        action="store_true",
        help="Redis, PostgreSQL and the write-behind worker on the last CPU, the servers and the load generator on"
        " the others, as when the stores have hosts of their own (needs the embedded stack)",
    )
    p.add_argument(
        "--tick-reference",
        action="store_true",
        help="the echo + 1 Redis call reference makes its call through pointauth's tick pipeline, not redis-py's"
        " pool (a connection per call)",
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def _seed_redis(redis_url: str, shards: int, todo: list[tuple[int, int]], anchor_ms: int, done: Any) -> None:
    from pointauth.server.ops import seed as seeding

    def count(n: int) -> None:
        with done.get_lock():
            done.value += n

    seeding.load_redis(redis_url, Keyspace(shards), todo, anchor_ms, count)


def settle(client: redis.Redis, postgres_dsn: str) -> None:
    """What a fresh load leaves to do, done before measuring rather than during it: PostgreSQL's
    vacuum and statistics of the new rows and a checkpoint, and a rewrite of Redis's AOF. Redis
    rewrites it by itself once it has grown past its size at the last rewrite by
    auto-aof-rewrite-percentage (100 by default), forking a process the size of the data: at 10M
    accounts a fork of about 100 ms, which a step would count in the server's tail."""
    from pointauth.server.journal.pg import connection

    async def vacuum() -> None:
        async with connection(postgres_dsn) as conn:
            await conn.execute("VACUUM ANALYZE")
            await conn.execute("CHECKPOINT")

    started = time.monotonic()
    if postgres_dsn:
        asyncio.run(vacuum())
    if client.info("persistence").get("aof_enabled"):
        with contextlib.suppress(redis.ResponseError):  # one is running already: it is waited for
            client.bgrewriteaof()
    while any(client.info("persistence").get(f"aof_rewrite_{s}") for s in ("in_progress", "scheduled")):
        time.sleep(0.5)
    print(f"settled in {time.monotonic() - started:.0f} s (VACUUM ANALYZE, CHECKPOINT, AOF rewrite)", file=sys.stderr)


def seed(redis_url: str, postgres_dsn: str, keyspace: Keyspace, accounts: int) -> tuple[int, float]:
    """Migrates, then seeds both stores with `pointauth seed`'s own loaders, Redis from a second
    process as `pointauth seed` does; returns (accounts new in Redis, seconds).

    The progress bar counts accounts, each once both stores hold it, so its total is the account
    count (`pointauth seed`'s own bar counts every account twice, once per store)."""
    from pointauth.server.journal import migrate
    from pointauth.server.ops import seed as seeding

    asyncio.run(migrate(postgres_dsn))
    # The group directory first: the points of sale the load uses (driver.POS) are its.
    asyncio.run(load_group(redis_url, postgres_dsn, keyspace, SeedGroup()))
    client = redis.Redis.from_url(redis_url)
    todo = list(seeding.chunks(accounts, seeding.redis_seeded(client)))
    new = sum(count for _, count in todo)
    anchor_ms = int(time.time() // 86_400) * seeding.DAY_MS  # today, 00:00 UTC, as `pointauth seed`
    started = time.monotonic()
    ctx = multiprocessing.get_context("spawn")
    in_redis = ctx.Value("q", accounts - new)
    loader = ctx.Process(target=_seed_redis, args=(redis_url, keyspace.shards, todo, anchor_ms, in_redis))
    loader.start()
    bar = ProgressBar("accounts seeded (Redis and PostgreSQL)")
    in_postgres, shown_all = 0, False

    def show() -> None:
        nonlocal shown_all
        if not shown_all:  # the bar ends its line at 100 %: once
            done = min(in_postgres, in_redis.value)
            bar(done, accounts)
            shown_all = done >= accounts

    def progress(n: int) -> None:
        nonlocal in_postgres
        in_postgres += n
        show()

    asyncio.run(seeding.load_postgres(postgres_dsn, keyspace, accounts, anchor_ms, progress))
    while loader.exitcode is None:
        loader.join(0.5)
        show()
    show()  # the loader may have finished before the loop looked
    if loader.exitcode != 0:
        raise SystemExit("seeding Redis failed (see above)")
    return new, time.monotonic() - started


def used_memory(client: redis.Redis) -> int:
    info: dict[str, Any] = client.info("memory")
    return int(info["used_memory"])


def check_population(client: redis.Redis, keyspace: Keyspace, population: Population) -> None:
    last = population.card(population.accounts - 1)
    if not client.hexists(keyspace.card_bucket(last), last):
        raise SystemExit(f"card {last} is not in Redis: seed {population.accounts} accounts first")
    if not client.hexists(keyspace.directory().terminals, codec.terminal_field(POS.store_id, POS.terminal_id)):
        raise SystemExit(f"the group directory lacks the load's point of sale {POS.store_id}/{POS.terminal_id}: seed")


def current_rule_set(target: str) -> int:
    """The version of the rule set the server earns under (0: none published)."""

    async def ask() -> int:
        async with PointsClient(target, plaintext=True) as client:
            try:
                return (await client.get_rule_set()).version
            except NotFoundError:
                return 0

    return asyncio.run(ask())


def publish_rules(target: str, group: SeedGroup) -> dict[str, Any]:
    """Publishes earn_rules' rule set, then waits until every server process has taken it in
    (each looks every RULES_REFRESH_S; the driver counts an earn_rules answer without it as an
    error); returns what was published."""

    async def publish() -> rules_service_pb2.RuleSet:
        async with PointsClient(target, plaintext=True) as client:
            return await client.publish_rule_set(earn_rules.rule_set(group, int(time.time())))

    published = asyncio.run(publish())
    time.sleep(2 * RULES_REFRESH_S)
    return {
        "rule_set_version": published.version,
        "base_rates": len(published.base_rates),
        "campaigns": len(published.campaigns),
    }


def worker_command(args: argparse.Namespace) -> list[str] | None:
    if args.worker_cmd:
        command: str = args.worker_cmd
        return command.split()
    return [sys.executable, "-m", "pointauth.server.cli", "--log-level", "WARNING", "worker"]


def run(args: argparse.Namespace, out: contextlib.ExitStack) -> dict[str, Any]:
    plan = Plan(
        args.concurrency, [float(r) for r in args.rates.split(",") if r], args.warmup, args.duration, args.repeat
    )
    if args.quick:
        plan = Plan(8, [50.0], 0.5, 2.0, 1)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    keyspace = Keyspace(args.shards)
    population = Population(args.accounts, args.card_format, hot_traffic=args.hot_traffic)

    to_background: Callable[[list[int]], None] | None = None
    store_cpu, others = cpu_split("--store-cpu") if args.store_cpu else (set(), set())
    if args.redis_url:
        if args.background_idle or args.store_cpu:
            raise SystemExit("--background-idle and --store-cpu need the embedded stack (they move its stores)")
        redis_url, postgres_dsn = args.redis_url, args.postgres_dsn or ""
        log_dir = Path(tempfile.mkdtemp(prefix="pointauth-bench-logs-"))
    else:
        data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="pointauth-bench-"))
        data_dir.mkdir(parents=True, exist_ok=True)
        data_dir.chmod(0o755)
        if args.data_dir is None:
            out.callback(shutil.rmtree, data_dir, ignore_errors=True)
        if args.background_idle:
            # Entered before the stack, so left after it: the cgroup goes once PostgreSQL stopped.
            to_background = out.enter_context(idle_cgroup(f"pointauth-bench-{os.getpid()}"))
        stack = out.enter_context(EmbeddedStack(data_dir))
        redis_url, postgres_dsn = stack.redis.url, stack.postgres.dsn
        log_dir = data_dir
    client = redis.Redis.from_url(redis_url)
    out.callback(client.close)
    appendfsync = client.config_get("appendfsync").get("appendfsync", "?")
    stalls = out.enter_context(RedisStalls(client))

    memory: dict[str, Any] = {"accounts": args.accounts}
    if not args.no_seed:
        before = used_memory(client)
        written, seconds = seed(redis_url, postgres_dsn, keyspace, args.accounts)
        memory.update(seeded_now=written, seed_seconds=round(seconds, 1))
        if written == args.accounts:
            memory["bytes_per_account"] = round((used_memory(client) - before) / written, 1)
    check_population(client, keyspace, population)
    if args.settle:
        settle(client, postgres_dsn)
    memory["used_memory"] = used_memory(client)
    memory.setdefault("bytes_per_account_upper_bound", round(memory["used_memory"] / args.accounts, 1))

    env = {
        **os.environ,
        "POINTAUTH__REDIS__URL": redis_url,
        "POINTAUTH__POSTGRES__DSN": postgres_dsn,
        "POINTAUTH__LEDGER__SHARDS": str(args.shards),
        "POINTAUTH__SERVER__GRACE_SECONDS": "1",
        "POINTAUTH__RULES__REFRESH_SECONDS": str(RULES_REFRESH_S),
        # The servers' own cost, as before TLS and auth existed (a run with them is to come).
        "POINTAUTH__TLS__PLAINTEXT": "true",
        "POINTAUTH__AUTH__ENABLED": "false",
    }
    python = sys.executable
    workers = str(args.workers)
    serve = [python, "-m", "pointauth.server.cli", "--log-level", "WARNING", "serve"]
    echo_port, echo_redis_port, server_port = free_port(), free_port(), free_port()
    # Serving processes log LISTENING (at INFO, whatever --log-level says); one process alone
    # listens only once it serves, so its port is enough.
    ready = (LISTENING, args.workers) if args.workers > 1 else None
    echo_command = [python, "-m", "loadtest.echo_server", "--workers", workers, "--port"]
    reference_client = ["--tick-pipeline"] if args.tick_reference else []
    services = {
        "echo": Service("echo server", [*echo_command, str(echo_port)], echo_port, env, log_dir / "echo.log"),
        "echo_redis": Service(
            "echo + Redis server",
            [*echo_command, str(echo_redis_port), "--redis-url", redis_url, *reference_client],
            echo_redis_port,
            env,
            log_dir / "echo-redis.log",
        ),
        "server": Service(
            "pointauth serve",
            [*serve, "--workers", workers, "--port", str(server_port)],
            server_port,
            env,
            log_dir / "server.log",
            ready=ready,
        ),
    }
    secured = [s.strip() for s in args.security.split(",") if s.strip()]
    if unknown := [s for s in secured if s not in SECURED]:
        raise SystemExit(f"--security: {unknown} are neither tls nor mtls")
    secured_by_mode = secured_servers(log_dir, env, secured)
    for security, secure in secured_by_mode.items():
        port = free_port()
        services[f"server_{security}"] = Service(
            f"pointauth serve ({security})", [*serve, "--workers", workers, "--port", str(port)], port, secure.env,
            log_dir / f"server-{security}.log", ready=ready,
        )  # fmt: skip
    if others:
        pin([os.getpid()], others)  # and so the servers and the load generator, started from here
    for service in services.values():
        out.enter_context(service)
    command = worker_command(args)
    if command:
        services["worker"] = out.enter_context(
            Service("write-behind worker", command, None, env, log_dir / "worker.log")
        )
    background = [services["worker"].proc] if "worker" in services else []
    if to_background:
        to_background([pid for proc in [*background, stack.postgres.proc] if proc for pid in tree(proc.pid)])
    if store_cpu:
        # PostgreSQL's backends started later are forked by its postmaster, and so run where it does.
        stores = [*background, stack.redis.proc, stack.postgres.proc]
        pin([pid for proc in stores if proc for pid in tree(proc.pid)], store_cpu)
    flat = [s for s in scenarios if s not in UNDER_RULES]
    ruled = [s for s in scenarios if s in UNDER_RULES]
    # AuthorizeHold, CaptureHold and GetBalance are the same under rules; EarnPoints is not.
    if "earn" in flat and (version := current_rule_set(services["server"].target)):
        raise SystemExit(
            f"a rule set (version {version}) is published already: the flat earn would run under it. "
            "Use a store without one (seed afresh), or leave earn out of --scenarios"
        )
    pool = out.enter_context(ClientPool(args.clients))
    lag = LagSampler(redis_url, keyspace)

    payload = pb.AuthorizeHoldRequest(
        request_id="0b8f6d3e-3a4c-4b8e-9a51-5f2c7d9e1a20", card_number=population.card(0), point_of_sale=POS, points=1
    ).SerializeToString()
    steps_planned = (len(REFERENCES) + len(scenarios) + (1 + len(secured)) * len(plan.rates)) * plan.repeat
    steps_planned += len(secured) * plan.repeat
    rows: list[Row] = []

    def step(scenario: str, loops: int, rate: float = 0.0, security: str = "") -> Row:
        target = services[scenario if scenario in REFERENCES else f"server_{security}" if security else "server"].target
        secure = secured_by_mode.get(security)
        tls, api_key = (secure.tls, secure.api_key) if secure else (None, "")
        shares = split(loops, pool.size)
        steps = [
            Step(
                scenario=scenario,
                tls=tls,
                api_key=api_key,
                target=target,
                loops=share,
                warmup_s=plan.warmup_s,
                duration_s=plan.duration_s,
                population=population,
                rate_per_s=rate * share / loops,
                channels=min(share, 4),
                echo_payload=payload,
                seed=zlib.crc32(f"{scenario}/{loops}/{rate}/{len(rows)}/{index}".encode()),
            )
            for index, share in enumerate(shares)
        ]
        groups = {name: service.pids() for name, service in services.items()}
        groups.update(redis=named("redis-server"), postgres=named("postgres"), clients=pool.pids())
        meter = CpuMeter({name: pids for name, pids in groups.items() if pids})
        sampled = len(lag.samples_ms)
        stalls.reset()
        meter.start()
        results = pool.run(steps)
        cpu = meter.stop()
        label = SECURED[security] if security else scenario
        row = merge(label, loops, f"{rate:.0f}/s" if rate else "closed", plan.duration_s, results)
        row.cpu_cores, row.busy = cpu, meter.busy
        row.lag_max_ms = max(lag.samples_ms[sampled:], default=0)
        row.redis_stalls, row.redis_slow_commands = stalls.read(), stalls.slow_commands()
        rows.append(row)
        print(progress_line(len(rows), steps_planned, row), file=sys.stderr, flush=True)
        return row

    rules: dict[str, Any] = {}
    lag.start()
    for _ in range(plan.repeat):
        for scenario in (*REFERENCES, *flat):
            step(scenario, plan.concurrency)
        # Far more loops than a rate needs, so a slow answer delays only its own loop and the
        # arrival rate holds (open-loop like); each call's latency counts from when it was due.
        for rate in plan.rates:
            wait_until_drained(redis_url, keyspace)
            step("authorize", max(64, plan.concurrency), rate=rate)
        # The same calls through TLS and authentication, in the same run as without.
        for security in secured:
            step("authorize", plan.concurrency, security=security)
            for rate in plan.rates:
                wait_until_drained(redis_url, keyspace)
                step("authorize", max(64, plan.concurrency), rate=rate, security=security)
    if ruled:
        # Last: once published, a rule set applies to every earn that follows.
        rules = publish_rules(services["server"].target, SeedGroup())
        for _ in range(plan.repeat):
            for scenario in ruled:
                step(scenario, plan.concurrency)
    lag.stop()

    groups_of_rows: dict[tuple[str, int, str], list[Row]] = {}
    for row in rows:
        groups_of_rows.setdefault((row.scenario, row.concurrency, row.mode), []).append(row)
    # The table in the scenarios' order (earn_rules beside earn, though it ran last), paced steps after.
    order = [*REFERENCES, *scenarios, *(SECURED[s] for s in secured)]
    summaries = sorted(
        (summarize(group) for group in groups_of_rows.values()),
        key=lambda s: (1, order.index(s.scenario)) if s.mode != "closed" else (0, order.index(s.scenario)),
    )
    ceilings = {
        ref: next(s.rpcs_per_s for s in summaries if s.scenario == ref and s.mode == "closed") for ref in REFERENCES
    }
    for summary in summaries:
        if summary.mode == "closed":
            summary.ratios = {ref: round(summary.rpcs_per_s / c, 3) if c else 0.0 for ref, c in ceilings.items()}

    lag_figures: dict[str, Any] | str = "n/a (no sample: the run was shorter than a second)"
    if lag.samples_ms:
        ordered = sorted(lag.samples_ms)
        lag_figures = {
            "samples": len(ordered),
            "p50_ms": ordered[len(ordered) // 2],
            "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
            "max_ms": ordered[-1],
            "missed": lag.missed,
        }
    elif lag.missed:
        lag_figures = f"n/a (every sample missed: {lag.missed[0]})"
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "config": {
            "accounts": args.accounts,
            "workers": args.workers,
            "clients": args.clients,
            "shards": args.shards,
            "hot_traffic": args.hot_traffic,
            "redis_appendfsync": appendfsync,
            "reference_client": "tick pipeline" if args.tick_reference else "redis-py pool",
            "redis_stall_threshold_ms": stalls.threshold_ms if stalls.enabled else None,
            "background": background_label(to_background is not None),
            "cpus": (
                f"Redis, PostgreSQL and the worker on CPU {min(store_cpu)}, the rest on {sorted(others)}"
                if store_cpu
                else "all shared"
            ),
            "warmup_s": plan.warmup_s,
            "duration_s": plan.duration_s,
            "repeat": plan.repeat,
        },
        "ceilings_rpcs_per_s": ceilings,
        "summary": [asdict(summary) for summary in summaries],
        "rows": [asdict(row) for row in rows],
        "redis_memory": memory,
        "write_behind_lag": lag_figures,
        "earn_rules": rules,
    }


def secured_servers(directory: Path, env: dict[str, str], modes: list[str]) -> dict[str, SecuredServer]:
    """Per mode, a server's environment with TLS (mTLS for "mtls") and authentication on, and how
    the load generator connects to it: as one till credential, by API key (tls) or by its client
    certificate (mtls), with a rate limit far above any step's."""
    pki = ensure_pki(directory / "pki", [BENCH_TILL])
    key = new_api_key(BENCH_TILL)
    credential = Credential(
        id=BENCH_TILL, role=Role.TILL, company=POS.company_id, key_sha256=key_sha256(key), certificate=BENCH_TILL,
        rate_per_second=10_000_000,
    )  # fmt: skip
    credentials = directory / "bench-credentials.toml"
    write_credentials_atomically(credentials, encode_credentials([credential]))
    servers = {}
    for mode in modes:
        server_env = {
            **env,
            "POINTAUTH__TLS__PLAINTEXT": "false",
            "POINTAUTH__TLS__CERT_FILE": str(pki.server_cert),
            "POINTAUTH__TLS__KEY_FILE": str(pki.server_key),
            "POINTAUTH__TLS__CLIENT_CA_FILE": str(pki.ca_cert) if mode == "mtls" else "",
            "POINTAUTH__AUTH__ENABLED": "true",
            "POINTAUTH__AUTH__CREDENTIALS_FILE": str(credentials),
        }
        if mode == "mtls":
            tls = ClientTLS.from_files(pki.ca_cert, pki.client_cert(BENCH_TILL), pki.client_key(BENCH_TILL))
            servers[mode] = SecuredServer(server_env, tls, "")
        else:
            servers[mode] = SecuredServer(server_env, ClientTLS.from_files(pki.ca_cert), key)
    return servers


@dataclass(frozen=True)
class SecuredServer:
    env: dict[str, str]
    tls: ClientTLS
    api_key: str


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


HEADER = f"{'loops':>5} {'mode':>7} {'ops/s':>8} {'(min-max)':>13} {'rpc/s':>8} {'p50 ms':>7} {'p99 ms':>7}"
HEADER += f" {'(min-max)':>13} {'p99.9':>7} {'÷echo':>6} {'÷e+R':>5} {'busy':>5} {'lag ms':>7} {'errors':>6}  cpu cores"


def format_row(row: Summary, sub: str = "op") -> str:
    """A table row; for one call of a pair (`sub`), only its latencies: throughput, ratio, counts
    and CPU belong to the pair and are on the pair's row."""
    lat = row.latency_ms.get(sub, {})
    p50, p99, p999 = (f"{lat.get(key, 0):>7.2f}" for key in ("p50", "p99", "p99.9"))
    if sub != "op":
        return f"{'  ' + sub:22}{'':5} {'':7} {'':8} {'':13} {'':8} {p50} {p99} {'':13} {p999}"
    ops = f"{row.ops_range[0]:,.0f}-{row.ops_range[1]:,.0f}"
    p99s = f"{row.p99_range[0]:.1f}-{row.p99_range[1]:.1f}"
    ratios = " ".join(
        f"{row.ratios[ref]:>{width}.2f}" if ref in row.ratios else f"{'-':>{width}}"
        for ref, width in zip(REFERENCES, (6, 5), strict=True)
    )
    # Idle groups (the references while pointauth runs, and the other way round) are left out.
    cpu = " ".join(f"{name}={cores:.2f}" for name, cores in row.cpu_cores.items() if cores >= 0.01)
    return (
        f"{LABELS[row.scenario]:22}{row.concurrency:>5} {row.mode:>7} {row.ops_per_s:>8,.0f} {ops:>13} "
        f"{row.rpcs_per_s:>8,.0f} {p50} {p99} {p99s:>13} {p999} {ratios} {row.busy:>5.2f} {row.lag_max_ms:>7,.0f} "
        f"{row.errors:>6}  {cpu}"
    )


def progress_line(step: int, steps: int, row: Row) -> str:
    """While the run goes on: what a step measured, briefly (the table comes at the end)."""
    p99 = row.latency_ms.get("op", {}).get("p99", 0)
    stalled = f", Redis stalled: {describe(row.redis_stalls)}" if row.redis_stalls else ""
    return (
        f"step {step}/{steps}: {LABELS[row.scenario]}, {row.concurrency} loops {row.mode}: "
        f"{row.ops_per_s:,.0f} ops/s, p99 {p99:.1f} ms, machine {row.busy:.0%} busy, {row.errors} errors{stalled}"
    )


def stall_lines(result: dict[str, Any]) -> list[str]:
    """The steps during which Redis itself stalled, and on what."""
    threshold = result["config"]["redis_stall_threshold_ms"]
    if threshold is None:
        return ["Redis stalls: not monitored (the Redis refused CONFIG SET latency-monitor-threshold)"]
    stalled = []
    for index, row in enumerate(result["rows"], 1):
        if row["redis_stalls"]:
            stalled.append(f"  step {index}: {LABELS[row['scenario']]}, {row['mode']}: {describe(row['redis_stalls'])}")
            stalled.extend(f"    {command}" for command in row["redis_slow_commands"])
    head = f"Redis stalls of {threshold} ms or more (its latency monitor)"
    return [f"{head}, by step:", *stalled] if stalled else [f"{head}: none"]


def security_cost(summary: list[dict[str, Any]]) -> list[str]:
    """AuthorizeHold without and with TLS and auth, side by side: closed-loop calls/s, the server
    processes' CPU per call, and p50/p99 at each fixed rate."""
    modes = {
        "authorize": ("plaintext", "server"),
        "authorize_tls": ("TLS + API key", "server_tls"),
        "authorize_mtls": ("mTLS + certificate", "server_mtls"),
    }
    rows = [s for s in summary if s["scenario"] in modes]
    if len({s["scenario"] for s in rows}) < 2:
        return []
    lines = ["AuthorizeHold without and with TLS and authentication (same run):"]
    for scenario, (name, group) in modes.items():
        closed = next((s for s in rows if s["scenario"] == scenario and s["mode"] == "closed"), None)
        if closed is None:
            continue
        cpu_us = closed["cpu_cores"].get(group, 0.0) * 1e6 / closed["rpcs_per_s"] if closed["rpcs_per_s"] else 0.0
        paced = [
            f"{s['mode']} p50 {s['latency_ms']['op']['p50']:.2f} / p99 {s['latency_ms']['op']['p99']:.2f} ms"
            for s in rows
            if s["scenario"] == scenario and s["mode"] != "closed"
        ]
        lines.append(
            f"  {name:<20} {closed['rpcs_per_s']:>7,.0f} calls/s closed, server CPU {cpu_us:,.0f} µs/call; "
            + "; ".join(paced)
        )
    return lines


def report(result: dict[str, Any]) -> str:
    cfg, machine = result["config"], result["machine"]
    lines = [
        "",
        f"pointauth benchmark: {cfg['accounts']:,} accounts, {cfg['workers']} server processes, "
        f"{cfg['clients']} client processes, Redis appendfsync={cfg['redis_appendfsync']}, "
        f"each step {cfg['repeat']}x {cfg['duration_s']} s (medians; min-max over the runs)",
        f"machine: {machine['cpus']} CPUs ({machine['cpu_model']}), Python {machine['python']}; CPUs: {cfg['cpus']}",
        "latency from when each call was due; busy = share of all cores' time used, by everything",
        "",
        f"{'':22}{HEADER}",
    ]
    for data in result["summary"]:
        row = Summary(**{**data, "ops_range": tuple(data["ops_range"]), "p99_range": tuple(data["p99_range"])})
        lines.append(format_row(row))
        lines.extend(format_row(row, sub) for sub in row.latency_ms if sub != "op")
    samples = [sample for data in result["rows"] for sample in data["error_samples"]][:5]
    lines.extend(f"error: {sample}" for sample in samples)
    lines.append("")
    ceilings = result["ceilings_rpcs_per_s"]
    lines.append(
        f"references: bare echo {ceilings['echo']:,.0f} rpc/s, echo + 1 Redis call {ceilings['echo_redis']:,.0f} rpc/s"
        f" (through the {cfg['reference_client']})"
    )
    lines.extend(security_cost(result["summary"]))
    lines.extend(stall_lines(result))
    rules = result.get("earn_rules") or {}
    if rules:
        lines.append(
            f"EarnPoints (rules): a 5-line basket under rule set version {rules['rule_set_version']} "
            f"({rules['base_rates']} base rates, {rules['campaigns']} campaigns), measured after every other "
            "step; those ran without a rule set (EarnPoints: the flat rate)"
        )
    memory = result["redis_memory"]
    if "bytes_per_account" in memory:
        lines.append(
            f"Redis memory per account: {memory['bytes_per_account']:,.0f} bytes "
            f"(used_memory delta over {memory['seeded_now']:,} seeded accounts, seeded in {memory['seed_seconds']} s)"
        )
    lines.append(
        f"Redis used_memory: {memory['used_memory']:,} bytes = "
        f"{memory['bytes_per_account_upper_bound']:,.0f} bytes per account (upper bound, everything included)"
    )
    lag = result["write_behind_lag"]
    if isinstance(lag, dict):
        lines.append(
            f"write-behind lag: p50 {lag['p50_ms']} ms, p99 {lag['p99_ms']} ms, max {lag['max_ms']} ms "
            f"({lag['samples']} samples, 1/s)"
        )
        if lag["missed"]:
            lines.append(f"  {len(lag['missed'])} samples missed, the first: {lag['missed'][0]}")
    else:
        lines.append(f"write-behind lag: {lag}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as out:
        result = run(args, out)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    bad = sum(row["errors"] for row in result["rows"])
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
