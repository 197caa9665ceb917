"""`python -m loadtest.writebehind_bench`: what the write-behind costs, catching up a backlog.

It starts the embedded stack, migrates, and writes `--events` events over `--accounts` accounts
through the real Ledger (openings, earns, holds and captures, redemptions, and a few refusals,
whose request ids the worker copies too) with no worker running. Then it starts `pointauth
worker` as its own process and waits until PostgreSQL has every event, while a probe calls the
ledger (one GetBalance-like call at a time, `--probe-rate` a second) as a till would.

Printed: events/s of the drain; worker and PostgreSQL CPU µs per event (from /proc: the worker
process, and the postmaster with its backends); Redis CPU per event; the probe's p50/p99 before
the drain (no worker), during it, and after it beside the worker idling, caught up (the tills'
steady state in production); and the slowest Redis commands of the drain (SLOWLOG at 1 ms, reset
when the worker starts; `--slowlog-us 0` shows every command's duration).
`--split-cpus` runs the drain with the worker and its PostgreSQL backends on a CPU of their own;
`--background-idle` with the worker and PostgreSQL in a cgroup of the kernel's idle CPU class, as
systemd's `CPUWeight=idle` puts them (the worker alone is in the idle class by default).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import IO, Any

import uvloop
from redis.asyncio import Redis

from loadtest.procs import background_label, cpu_seconds, cpu_split, idle_cgroup, pin, tree
from pointauth.server.clock import SystemClock
from pointauth.server.config import LedgerSettings
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.journal import migrate
from pointauth.server.journal.pg import Connection, connection
from pointauth.server.ledger import Keyspace, Ledger, LedgerRefusal, PointOfSaleRef

TILL = PointOfSaleRef("acme", "store-1", "till-1", 1)
DAY_MS = 86_400_000
SLOW_US = 1000


def _fp(rid: str) -> str:
    return hashlib.sha256(rid.encode()).hexdigest()[:32]


async def write_backlog(ledger: Ledger, accounts: int, events: int, concurrency: int, seed: int) -> tuple[int, int]:
    """Writes about `events` events; returns (events, refusals). Every call has a request id."""
    names = [f"wb{n:07d}" for n in range(accounts)]
    written = refused = 0
    counter = 0
    holds: dict[str, list[int]] = {}

    def rid() -> str:
        nonlocal counter
        counter += 1
        return f"r{seed}-{counter}"

    async def opener(part: list[str]) -> None:
        nonlocal written
        for name in part:
            r = rid()
            await ledger.create_account(name, f"card-{name}", r, _fp(r))
            r = rid()
            exp = ledger.clock.now_ms() + 365 * DAY_MS
            await ledger.earn(name, points=10_000, expire_ms=exp, kind="R", pos=TILL, request_id=r, fingerprint=_fp(r))
            written += 2

    await asyncio.gather(*(opener(names[i::concurrency]) for i in range(concurrency)))

    async def till(n: int) -> None:
        nonlocal written, refused
        rng = random.Random(seed * 1000 + n)
        while written < events:
            account = rng.choice(names)
            r = rid()
            roll = rng.random()
            try:
                if roll < 0.4:
                    exp = ledger.clock.now_ms() + 365 * DAY_MS
                    await ledger.earn(
                        account, points=rng.randint(1, 200), expire_ms=exp, kind="R", pos=TILL,
                        request_id=r, fingerprint=_fp(r),
                    )  # fmt: skip
                elif roll < 0.65:
                    result = await ledger.authorize(
                        account, points=rng.randint(1, 50), ttl_ms=DAY_MS, pos=TILL, request_id=r, fingerprint=_fp(r)
                    )
                    holds.setdefault(account, []).append(result.tx)
                elif roll < 0.85 and holds.get(account):
                    hold = holds[account].pop()
                    await ledger.capture(account, hold, points=None, request_id=r, fingerprint=_fp(r))
                elif roll < 0.98:
                    await ledger.redeem(account, points=rng.randint(1, 30), pos=TILL, request_id=r, fingerprint=_fp(r))
                else:
                    # A refusal: no event, a note whose idempotency record the worker copies.
                    await ledger.redeem(account, points=10**12, pos=TILL, request_id=r, fingerprint=_fp(r))
                written += 1
            except LedgerRefusal:
                refused += 1

    await asyncio.gather(*(till(n) for n in range(concurrency)))
    return written, refused


async def probe(ledger: Ledger, accounts: int, rate: float, stop: asyncio.Event) -> list[float]:
    """One ledger call at a time, `rate` a second: each latency in ms (from when it was due)."""
    latencies: list[float] = []
    rng = random.Random(99)
    due = time.monotonic()
    while not stop.is_set():
        due += 1 / rate
        if (wait := due - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        await ledger.balance(f"wb{rng.randrange(accounts):07d}")
        latencies.append((time.monotonic() - due) * 1000)
    return latencies


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def applied_events(conn: Connection) -> int:
    value = await conn.fetchval("SELECT coalesce(sum(applied_events), 0) FROM stream_positions")
    return int(value)


async def heartbeat_seen(dsn: str) -> bool:
    async with connection(dsn) as conn:
        return bool(await conn.fetchval("SELECT count(*) FROM worker_heartbeats"))


async def run(
    args: argparse.Namespace, stack: EmbeddedStack, work: Path, to_background: Callable[[list[int]], None] | None
) -> dict[str, Any]:
    dsn = stack.postgres.dsn
    await migrate(dsn)
    redis = Redis.from_url(stack.redis.url)
    settings = LedgerSettings(shards=args.shards)
    keyspace = Keyspace(settings.shards)
    ledger = Ledger(redis, keyspace, SystemClock(), settings)
    await ledger.load()
    started = time.monotonic()
    events, refused = await write_backlog(ledger, args.accounts, args.events, args.concurrency, seed=1)
    print(f"wrote {events} events and {refused} refusals in {time.monotonic() - started:.1f} s (no worker)")

    stop = asyncio.Event()
    steady_task = asyncio.create_task(probe(ledger, args.accounts, args.probe_rate, stop))
    await asyncio.sleep(args.probe_seconds)
    stop.set()
    steady = await steady_task

    env = {
        **os.environ,
        "POINTAUTH__REDIS__URL": stack.redis.url,
        "POINTAUTH__POSTGRES__DSN": dsn,
        "POINTAUTH__LEDGER__SHARDS": str(args.shards),
    }
    log = (work / "worker.log").open("ab")
    worker = _start_worker(env, log)
    try:
        # From the worker's first heartbeat (written before its first read): its start-up
        # (imports, creating 1,024 groups) is not write-behind work.
        while not await heartbeat_seen(dsn):
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited with {worker.returncode}; see {work / 'worker.log'}")
            await asyncio.sleep(0.02)
        split = (
            await split_cpus(dsn, worker.pid, stack.redis.proc.pid if stack.redis.proc else None)
            if args.split_cpus
            else ""
        )
        if to_background:
            # After the worker's first heartbeat: its PostgreSQL backend exists by then, and
            # backends started later inherit the postmaster's group.
            to_background(tree(worker.pid) + (tree(stack.postgres.proc.pid) if stack.postgres.proc else []))
        await redis.config_set("slowlog-log-slower-than", args.slowlog_us)
        await redis.config_set("slowlog-max-len", 1_000_000)
        await redis.slowlog_reset()
        pg_pids = tree(stack.postgres.proc.pid) if stack.postgres.proc else []
        redis_pids = tree(stack.redis.proc.pid) if stack.redis.proc else []
        cpu0 = (cpu_seconds(tree(worker.pid)), cpu_seconds(pg_pids), cpu_seconds(redis_pids))
        # One connection for the whole drain: a connection per look would cost PostgreSQL a
        # process start each time, and this process's event loop (the probe's) its set-up.
        async with connection(dsn) as conn:
            t0 = time.monotonic()
            stop = asyncio.Event()
            drain_task = asyncio.create_task(probe(ledger, args.accounts, args.probe_rate, stop))
            while await applied_events(conn) < events:
                if worker.poll() is not None:
                    raise RuntimeError(f"the worker exited with {worker.returncode}; see {work / 'worker.log'}")
                await asyncio.sleep(0.1)
            elapsed = time.monotonic() - t0
        cpu1 = (cpu_seconds(tree(worker.pid)), cpu_seconds(pg_pids), cpu_seconds(redis_pids))
        stop.set()
        during = await drain_task
        slow: list[Any] = await redis.slowlog_get(1_000_000)
        await redis.config_set("slowlog-log-slower-than", 10_000)
        # The tills' steady state in production: the worker running, caught up, scanning for
        # work (the steady probe above ran with no worker at all).
        stop = asyncio.Event()
        idle_task = asyncio.create_task(probe(ledger, args.accounts, args.probe_rate, stop))
        await asyncio.sleep(args.probe_seconds)
        stop.set()
        beside_idle_worker = await idle_task
    finally:
        worker.terminate()
        worker.wait(30)
        log.close()
    await redis.aclose()

    def per_event(i: int) -> float:
        return (cpu1[i] - cpu0[i]) / events * 1e6

    slowest = sorted(slow, key=lambda e: -int(e["duration"]))
    by_command: dict[str, list[int]] = {}
    for e in slow:
        by_command.setdefault(_text(e["command"].split()[0]).upper(), []).append(int(e["duration"]))
    return {
        "cpus": split or "shared",
        "background": background_label(to_background is not None),
        "events": events,
        "refusals": refused,
        "drain_s": round(elapsed, 2),
        "events_per_s": round(events / elapsed),
        "worker_us_per_event": round(per_event(0), 1),
        "postgres_us_per_event": round(per_event(1), 1),
        "redis_us_per_event": round(per_event(2), 1),
        "probe_steady_p50_ms": round(_pct(steady, 0.5), 2),
        "probe_steady_p99_ms": round(_pct(steady, 0.99), 2),
        "probe_drain_p50_ms": round(_pct(during, 0.5), 2),
        "probe_drain_p99_ms": round(_pct(during, 0.99), 2),
        "probe_drain_mean_ms": round(statistics.fmean(during), 2) if during else 0.0,
        "probe_worker_idle_p50_ms": round(_pct(beside_idle_worker, 0.5), 2),
        "probe_worker_idle_p99_ms": round(_pct(beside_idle_worker, 0.99), 2),
        f"slowlog_over_{args.slowlog_us}us": len(slow),
        "slowlog_by_command (n, p99 µs, max µs)": {
            name: (len(d), int(_pct([float(x) for x in d], 0.99)), max(d)) for name, d in sorted(by_command.items())
        },
        "slowest": [(int(e["duration"]), _text(e["command"])[:90]) for e in slowest[:5]],
    }


async def split_cpus(dsn: str, worker_pid: int, redis_pid: int | None) -> str:
    """Puts the worker and its PostgreSQL backends on the last CPU, this process (the probe) and
    Redis on the others, as a deployment would with cpusets: the drain then never wakes a till's
    work on a CPU the write-behind is using. Needs the right to set those processes' affinity."""
    own, rest = cpu_split("--split-cpus")
    async with connection(dsn) as conn:
        backends = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
    pin([*tree(worker_pid), *(int(r["pid"]) for r in backends)], own)
    pin([os.getpid(), *([redis_pid] if redis_pid else [])], rest)
    return f"worker and its PostgreSQL backends on CPU {min(own)}, probe and Redis on {sorted(rest)}"


def _start_worker(env: dict[str, str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    """`pointauth worker` with its default settings, as operators run it."""
    command = [sys.executable, "-m", "pointauth.server.cli", "worker", "--consumer", "bench"]
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.writebehind_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--accounts", type=int, default=2_000)
    parser.add_argument("--shards", type=int, default=1024)
    parser.add_argument("--concurrency", type=int, default=64, help="ledger calls in flight while writing")
    parser.add_argument("--probe-rate", type=float, default=100.0, help="probe calls a second")
    parser.add_argument(
        "--probe-seconds", type=float, default=6.0, help="each steady probe (before the drain; beside the idle worker)"
    )
    parser.add_argument(
        "--split-cpus", action="store_true", help="the worker and PostgreSQL's backends on a CPU of their own"
    )
    parser.add_argument(
        "--background-idle",
        action="store_true",
        help="the worker and PostgreSQL in a cgroup with cpu.idle = 1 (needs root and the cgroup cpu controller)",
    )
    parser.add_argument(
        "--slowlog-us", type=int, default=SLOW_US, help="SLOWLOG threshold during the drain (0: every command)"
    )
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="pointauth-wbbench-"))
    work.chmod(0o755)
    background = idle_cgroup(f"pointauth-wbbench-{os.getpid()}") if args.background_idle else nullcontext(None)
    try:
        # The cgroup outlives the stack: it can be removed only once PostgreSQL has stopped.
        with background as to_background, EmbeddedStack(work / "stack") as stack:
            # uvloop, as the server: the default loop wakes a sleeping probe up to a millisecond
            # late (epoll's timeout is whole ms), which would count as latency.
            result = uvloop.run(run(args, stack, work, to_background))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
