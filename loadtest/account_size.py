"""Redis's cost per ledger call as an account grows (`python -m loadtest.account_size`).

Issue #13 item 5: a call's Redis work must not grow with the account. This builds, on a Redis
of its own, accounts with 1, 100 and 1,000 lots (distinct expiries, so no two can merge) and one
with 1,000 open holds, then measures each call inside Redis, so that neither the network nor the
client counts. The AuthorizeHolds measured are then voided (not measured), to keep the account's
shape for the next; GetBalance changes nothing. The echo + 1 Redis call reference's call (an
INCR script) is measured the same way, beside them.

Two measures:
- by default, time: `INFO commandstats`'s usec for the call, after a CONFIG RESETSTAT. On a
  shared machine it moves by tens of per cent from run to run.
- with `--instructions`, the instructions Redis executes per call, with redis-server run under
  valgrind's callgrind and counting only while the measured calls run. That is everything
  Redis does for the call in its own code (reading the request, the function, the AOF's buffer,
  the reply) and nothing of the kernel's; it is the same from run to run, whatever else the
  machine is doing, so a change of a few per cent in the ledger function shows.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from redis.asyncio import Redis

from loadtest.echo_server import REFERENCE_SCRIPT, reference_key
from pointauth.server.clock import ManualClock
from pointauth.server.config import LedgerSettings
from pointauth.server.devstack.stack import RedisServer
from pointauth.server.ledger import Keyspace, Ledger, PointOfSaleRef
from pointauth.server.ledger.pipeline import TickPipeline

POS = PointOfSaleRef("acme", "store-1", "till-1", 1)
NOW_MS = 1_795_000_000_000
DAY_MS = 86_400_000
HOUR_MS = 3_600_000

Calls = Callable[[], Awaitable[object]]


def _rid() -> str:
    return str(uuid.uuid4())


async def _calls(redis: Redis, command: str) -> int:
    stats: dict[str, Any] = await redis.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {"calls": 0})["calls"])


class Meter(Protocol):
    unit: str
    title: str

    async def prepare(self) -> None: ...

    async def per_call(self, calls: Calls, command: str, n: int) -> float:
        """Redis's cost of each of the `n` calls of `command` that `calls` makes (and nothing else)."""
        ...


class Time:
    """Microseconds inside Redis, from INFO commandstats."""

    unit = "µs"
    title = "Redis time per call (INFO commandstats usec_per_call, after CONFIG RESETSTAT)"

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def prepare(self) -> None:
        pass

    async def per_call(self, calls: Calls, command: str, n: int) -> float:
        await self.redis.config_resetstat()
        await calls()
        stats: dict[str, Any] = await self.redis.info("commandstats")
        entry = stats[f"cmdstat_{command}"]
        if int(entry["calls"]) != n:
            raise AssertionError(f"{entry['calls']} {command} calls counted, {n} expected")
        return int(entry["usec"]) / n


class Instructions:
    """Instructions Redis executed, from callgrind (redis-server started under it, counting off):
    counters zeroed and counting on just before the calls, off and dumped just after."""

    unit = "instructions"
    title = "Instructions Redis executes per call (valgrind --tool=callgrind, counting only during the calls)"

    def __init__(self, redis: Redis, pid: int, out: Path) -> None:
        self.redis = redis
        self.pid = pid
        self.out = out

    async def prepare(self) -> None:
        # Redis's timer work (expiring keys, rehashing, the AOF's checks) runs 10 times a second
        # of wall time, and under valgrind a call takes long enough to catch some of it at random:
        # once a second, what it adds to a call's count is below its spread.
        await self.redis.config_set("hz", 1)

    def _control(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(self.pid)], check=True, capture_output=True)

    def _last_dump_total(self) -> int:
        # Each dump is a new file, <out>.<n>; its "totals:" line is what was counted since the zeroing.
        dumps = [p for p in self.out.parent.glob(f"{self.out.name}.*") if p.suffix[1:].isdigit()]
        newest = max(dumps, key=lambda p: int(p.suffix[1:]))
        for line in newest.read_text().splitlines():
            if line.startswith("totals:"):
                return int(line.split()[1])
        raise AssertionError(f"{newest}: no totals line")

    async def per_call(self, calls: Calls, command: str, n: int) -> float:
        before = await _calls(self.redis, command)
        self._control("-z")
        self._control("-i", "on")
        try:
            await calls()
        finally:
            self._control("-i", "off")
        self._control("-d")
        made = await _calls(self.redis, command) - before
        if made != n:
            raise AssertionError(f"{made} {command} calls counted, {n} expected")
        return self._last_dump_total() / n


def under_callgrind(out: Path) -> tuple[str, ...]:
    """The command to start redis-server under, for Instructions: callgrind, counting off until asked."""
    return ("valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}")


async def _build(ledger: Ledger, account: str, lots: int, holds: int) -> None:
    await ledger.create_account(account, f"card-{account}", _rid(), "0" * 32)
    for i in range(lots):
        # A day apart: every lot its own expiry, so none merges with another.
        await ledger.earn(account, points=1_000_000, expire_ms=NOW_MS + (i + 30) * DAY_MS, kind="R", pos=POS,
                          request_id=_rid(), fingerprint="g" * 32, grant=True)  # fmt: skip
    for _ in range(holds):
        await ledger.authorize(account, points=1, ttl_ms=7 * 24 * HOUR_MS, pos=POS, request_id=_rid(),
                               fingerprint="h" * 32)  # fmt: skip


async def _authorize_cost(meter: Meter, ledger: Ledger, account: str, calls: int) -> float:
    held: list[int] = []

    async def authorizations() -> None:
        for _ in range(calls):
            hold = await ledger.authorize(account, points=1, ttl_ms=15 * 60_000, pos=POS, request_id=_rid(),
                                          fingerprint="h" * 32)  # fmt: skip
            held.append(hold.tx)

    cost = await meter.per_call(authorizations, "fcall", calls)
    for tx in held:
        await ledger.void(account, tx, request_id=_rid(), fingerprint="v" * 32)
    return cost


async def _balance_cost(meter: Meter, ledger: Ledger, account: str, calls: int) -> float:
    async def balances() -> None:
        for _ in range(calls):
            await ledger.balance(account)

    return await meter.per_call(balances, "fcall", calls)


async def _reference_cost(meter: Meter, redis: Redis, calls: int) -> float:
    """The echo + 1 Redis call reference's call, made as that reference makes it with
    --tick-pipeline: one EVALSHA per call through the tick pipeline."""
    sha = await redis.script_load(REFERENCE_SCRIPT)
    pipeline = TickPipeline(redis)

    async def touches() -> None:
        for _ in range(calls):
            await pipeline.execute("EVALSHA", sha, 1, reference_key())

    await touches()  # opens the pipeline's connection, not measured
    return await meter.per_call(touches, "evalsha", calls)


SHAPES = [("1 lot", 1, 0), ("100 lots", 100, 0), ("1,000 lots", 1_000, 0), ("1,000 open holds", 1, 1_000)]


async def measure(
    redis: Redis, meter: Meter, calls: int, shapes: list[tuple[str, int, int]] = SHAPES
) -> tuple[list[tuple[str, float, float]], float]:
    """(name, AuthorizeHold, GetBalance) per shape, and the reference call's cost."""
    await redis.flushall()
    ledger = Ledger(redis, Keyspace(16), ManualClock(NOW_MS), LedgerSettings(shards=16))
    rows = []
    for i, (name, lots, holds) in enumerate(shapes):
        account = f"size-{i}"
        await _build(ledger, account, lots, holds)
        # One call first: loads the library and resolves nothing else's lazy costs.
        await ledger.balance(account)
        rows.append(
            (
                name,
                await _authorize_cost(meter, ledger, account, calls),
                await _balance_cost(meter, ledger, account, calls),
            )
        )
    return rows, await _reference_cost(meter, redis, calls)


def table(rows: list[tuple[str, float, float]], reference: float, unit: str) -> str:
    base_auth, base_balance = rows[0][1], rows[0][2]
    head_auth, head_balance = f"AuthorizeHold {unit}", f"GetBalance {unit}"
    lines = [f"{'account':<18} {head_auth:>26} {'× 1 lot':>8} {head_balance:>23} {'× 1 lot':>8}"]
    for name, auth, balance in rows:
        lines.append(
            f"{name:<18} {auth:>26,.1f} {auth / base_auth:>8.2f} {balance:>23,.1f} {balance / base_balance:>8.2f}"
        )
    lines.append(
        f"the echo + 1 Redis call reference's call: {reference:,.1f} {unit} "
        f"(AuthorizeHold on 1 lot: {base_auth / reference:.1f}×)"
    )
    return "\n".join(lines)


async def _run(url: str, meter_of: Callable[[Redis], Meter], calls: int) -> str:
    redis = Redis.from_url(url)
    try:
        meter = meter_of(redis)
        await meter.prepare()
        rows, reference = await measure(redis, meter, calls)
        return f"{meter.title}\n{table(rows, reference, meter.unit)}"
    finally:
        await redis.aclose()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.account_size", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, help="measured calls per account and RPC (default: 200, or 100 "
                        "with --instructions: a multiple of 50, as Redis steps Lua's garbage collector after "
                        "every 50th script call)")  # fmt: skip
    parser.add_argument("--instructions", action="store_true",
                        help="count the instructions Redis executes (valgrind's callgrind), not time")  # fmt: skip
    args = parser.parse_args(argv)
    args.calls = args.calls or (100 if args.instructions else 200)
    if args.instructions and not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        parser.error("--instructions needs valgrind (apt-get install valgrind)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pointauth-account-size-") as tmp:
        out = Path(tmp) / "callgrind.out"
        server = RedisServer(Path(tmp) / "redis", wrapper=under_callgrind(out) if args.instructions else ()).start()
        try:
            pid = server.proc.pid if server.proc else 0

            def meter_of(redis: Redis) -> Meter:
                return Instructions(redis, pid, out) if args.instructions else Time(redis)

            print(asyncio.run(_run(server.url, meter_of, args.calls)))
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
