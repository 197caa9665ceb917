"""The account-size benchmark's instruction meter: redis-server under callgrind, counting only
while the measured calls run, and refusing a window whose calls are not the ones declared."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from loadtest import account_size
from loadtest.echo_server import REFERENCE_SCRIPT, reference_key
from pointauth.server.devstack.stack import RedisServer
from pointauth.server.ledger.pipeline import TickPipeline


@pytest.fixture
async def meter(tmp_path: Path) -> AsyncIterator[account_size.Instructions]:
    out = tmp_path / "callgrind.out"
    server = RedisServer(tmp_path / "redis", wrapper=account_size.under_callgrind(out)).start()
    redis = Redis.from_url(server.url)
    try:
        assert server.proc is not None
        instructions = account_size.Instructions(redis, server.proc.pid, out)
        await instructions.prepare()
        yield instructions
    finally:
        await redis.aclose()
        server.stop()


async def test_instructions_are_per_call_and_count_nothing_outside_the_calls(
    meter: account_size.Instructions,
) -> None:
    sha = await meter.redis.script_load(REFERENCE_SCRIPT)
    pipeline = TickPipeline(meter.redis)
    key = reference_key()  # one key: the first INCR creates it, the measured ones only count

    def touches(n: int) -> account_size.Calls:
        async def run() -> None:
            for _ in range(n):
                await pipeline.execute("EVALSHA", sha, 1, key)

        return run

    await touches(50)()  # the pipeline's connection, the script's first run: not measured
    # Windows of multiples of 50 calls: Redis runs a step of Lua's garbage collector after every
    # 50th script call, so each such window holds the same number of steps.
    first = await meter.per_call(touches(200), "evalsha", 200)
    # Work between two windows, as much as some 1,000 of the calls (a script counting to 10^6,
    # which leaves the data as it was), is not counted...
    assert await meter.redis.eval("local n = 0 for i = 1, 1000000 do n = n + 1 end return n", 0) == 1_000_000
    again = await meter.per_call(touches(200), "evalsha", 200)
    # ...and a window twice as long counts twice as much. Not to the instruction: a garbage
    # collector's step does more or less work as the heap has more or less garbage.
    longer = await meter.per_call(touches(400), "evalsha", 400)
    assert abs(again / first - 1) < 0.03, (first, again)
    assert abs(longer / first - 1) < 0.03, (first, longer)


async def test_a_window_whose_calls_are_not_the_ones_declared_is_refused(
    meter: account_size.Instructions,
) -> None:
    async def three_pings_and_a_get() -> None:
        for _ in range(3):
            await meter.redis.ping()
        await meter.redis.get("k")

    with pytest.raises(AssertionError, match=r"^3 ping calls counted, 2 expected$"):
        await meter.per_call(three_pings_and_a_get, "ping", 2)


async def test_the_table_sets_each_account_against_one_lot_and_the_reference(
    meter: account_size.Instructions,
) -> None:
    rows, reference = await account_size.measure(
        meter.redis, meter, calls=3, shapes=[("1 lot", 1, 0), ("30 lots", 30, 0)]
    )
    assert [name for name, _, _ in rows] == ["1 lot", "30 lots"]
    (_, auth_1, balance_1), (_, auth_30, balance_30) = rows
    lines = account_size.table(rows, reference, meter.unit).splitlines()
    assert lines[1].split() == ["1", "lot", f"{auth_1:,.1f}", "1.00", f"{balance_1:,.1f}", "1.00"]
    assert lines[2].split() == [
        "30", "lots",
        f"{auth_30:,.1f}", f"{auth_30 / auth_1:.2f}",
        f"{balance_30:,.1f}", f"{balance_30 / balance_1:.2f}",
    ]  # fmt: skip
    assert lines[3] == (
        f"the echo + 1 Redis call reference's call: {reference:,.1f} instructions "
        f"(AuthorizeHold on 1 lot: {auth_1 / reference:.1f}×)"
    )
    # A balance of 30 lots answers a page of 20 where one of 1 lot answers 1: Redis reads and
    # passes on 19 lots more.
    assert balance_30 > balance_1
