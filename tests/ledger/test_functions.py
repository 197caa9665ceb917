"""The ledger as a Redis Functions library: named by a hash of its source, loaded once per
version, kept by Redis across a restart, loaded again when Redis has lost it, and two releases'
libraries serving the same accounts side by side during a rolling deploy."""

from __future__ import annotations

import asyncio
import hashlib
import io
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from pointauth.server.app import PointauthServer
from pointauth.server.clock import ManualClock
from pointauth.server.config import LedgerSettings, Settings
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.ledger import LIBRARY, Keyspace, Ledger, LedgerLibrary, PointOfSaleRef, drop_other_libraries
from pointauth.server.ledger._ledger import SCRIPT_SOURCE
from pointauth.server.ops import prune_functions_command
from tests.helpers import events
from tests.journal.support import fingerprint

TILL = PointOfSaleRef("acme", "store-1", "till-1", 1)
DAY_MS = 86_400_000
# The next release: the same script with one more comment, so another version of the library.
NEXT = LedgerLibrary.from_template(SCRIPT_SOURCE.replace("\n", "\n-- the next release\n", 1))


@pytest.fixture(autouse=True)
async def no_functions(redis: Redis) -> None:
    """FLUSHALL (the redis fixture's) keeps functions: each test starts without any, and counts
    the commands Redis runs from here on."""
    await redis.function_flush()
    await redis.config_resetstat()


async def libraries(redis: Redis) -> dict[str, dict[str, list[str]]]:
    """Library name -> function name -> flags, as FUNCTION LIST shows them."""
    listed: dict[str, dict[str, list[str]]] = {}
    for entry in await redis.function_list():
        library = _pairs(entry)
        functions = [_pairs(function) for function in library["functions"]]
        listed[library["library_name"].decode()] = {
            f["name"].decode(): [flag.decode() for flag in f["flags"]] for f in functions
        }
    return listed


def _pairs(flat: list[Any]) -> dict[str, Any]:
    return {key.decode(): value for key, value in zip(flat[::2], flat[1::2], strict=True)}


async def calls(redis: Redis, command: str) -> int:
    """How often Redis ran `command` since the last CONFIG RESETSTAT (or its start)."""
    stats: dict[str, dict[str, int]] = await redis.info("commandstats")
    return stats.get(f"cmdstat_{command}", {}).get("calls", 0)


async def open_member(ledger: Ledger, account: str, card: str, points: int) -> None:
    await ledger.create_account(account, card, f"open-{account}", fingerprint(f"open-{account}"))
    await ledger.earn(
        account, points=points, expire_ms=ledger.clock.now_ms() + 30 * DAY_MS, kind="R", pos=TILL,
        request_id=f"grant-{account}", fingerprint=fingerprint(f"grant-{account}"), grant=True,
    )  # fmt: skip


def test_the_library_and_its_functions_are_named_by_a_hash_of_the_source() -> None:
    version = hashlib.sha256(SCRIPT_SOURCE.encode()).hexdigest()[:16]
    assert (LIBRARY.version, LIBRARY.name, LIBRARY.ledger_function, LIBRARY.release_card_function) == (
        version,
        f"pointauth_{version}",
        f"pointauth_ledger_{version}",
        f"pointauth_release_card_{version}",
    )
    assert LIBRARY.source.startswith(f"#!lua name=pointauth_{version}\n")
    assert "$VERSION" not in LIBRARY.source
    # Any change to the file, even a comment, is another version: nobody has to bump it.
    assert NEXT.version != LIBRARY.version
    with pytest.raises(ValueError, match="starts with"):
        LedgerLibrary.from_template("return 1")


async def test_the_library_is_loaded_once_per_version(
    ledger: Ledger, redis: Redis, stack: EmbeddedStack, keyspace: Keyspace, clock: ManualClock
) -> None:
    assert await ledger.load() is True
    assert await ledger.load() is False
    async with Redis.from_url(stack.redis.url) as other:
        assert await Ledger(other, keyspace, clock, ledger.settings).load() is False
    # No flags: every function writes, and Redis Cluster would refuse keys spanning slots.
    functions = (
        LIBRARY.ledger_function,
        LIBRARY.release_card_function,
        LIBRARY.move_card_function,
        LIBRARY.take_budget_function,
        LIBRARY.settle_budget_function,
        LIBRARY.give_budget_function,
    )
    assert await libraries(redis) == {LIBRARY.name: {function: [] for function in functions}}
    assert await calls(redis, "function|load") == 3


async def test_processes_starting_at_once_all_load_successfully(
    redis: Redis, stack: EmbeddedStack, keyspace: Keyspace, clock: ManualClock, ledger_settings: LedgerSettings
) -> None:
    clients = [Redis.from_url(stack.redis.url) for _ in range(8)]
    try:
        # Writes wait a moment, so the eight loads reach Redis together: one wins, seven find
        # the library there, and none of them fails.
        await redis.client_pause(200, all=False)
        loaded = await asyncio.gather(*(Ledger(c, keyspace, clock, ledger_settings).load() for c in clients))
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    assert sorted(loaded) == [False] * 7 + [True]
    assert list(await libraries(redis)) == [LIBRARY.name]


async def test_a_server_loads_its_library_at_start(server: PointauthServer, redis: Redis) -> None:
    assert list(await libraries(redis)) == [LIBRARY.name]


async def test_the_library_survives_a_restart_from_the_aof(
    ledger: Ledger, stack: EmbeddedStack, keyspace: Keyspace, clock: ManualClock
) -> None:
    assert await ledger.load() is True
    await open_member(ledger, "restart-1", "4000000000009001", 100)
    stack.redis.kill()  # SIGKILL, as a crash
    stack.redis.start()
    async with Redis.from_url(stack.redis.url) as fresh:
        assert list(await libraries(fresh)) == [LIBRARY.name]
        after = Ledger(fresh, keyspace, clock, ledger.settings)
        assert (await after.balance("restart-1")).available == 100
        # The call found its function: nothing was loaded again.
        assert (await calls(fresh, "fcall"), await calls(fresh, "function|load")) == (1, 0)


async def test_calls_load_the_library_again_when_redis_has_lost_it(
    ledger: Ledger, redis: Redis, keyspace: Keyspace
) -> None:
    # Nothing loaded it: the first call loads it, as after a restart without data.
    await open_member(ledger, "lost-1", "4000000000009002", 100)
    await redis.function_flush()
    assert (await ledger.balance("lost-1")).available == 100
    bucket = keyspace.card_bucket("4000000000009002")
    await redis.function_flush()
    await ledger._release_card(bucket, "4000000000009002", "someone-else")  # names another account: kept
    assert await redis.hget(bucket, "4000000000009002") == b"lost-1"
    await redis.function_flush()
    await ledger._release_card(bucket, "4000000000009002", "lost-1")
    assert await redis.hget(bucket, "4000000000009002") is None
    assert list(await libraries(redis)) == [LIBRARY.name]
    # One load per loss (the first call, then three flushes), and each lost call ran again once.
    assert (await calls(redis, "function|load"), await calls(redis, "fcall")) == (4, 2 + 1 + 2 + 2 + 2)


async def test_an_error_other_than_a_missing_function_is_raised_and_loads_nothing(ledger: Ledger, redis: Redis) -> None:
    await open_member(ledger, "error-1", "4000000000009003", 100)
    await redis.config_resetstat()
    with pytest.raises(ResponseError, match=r"attempt to call field .* \(a nil value\)"):
        await ledger._call("no_such_op", "error-1", {})
    assert (await calls(redis, "fcall"), await calls(redis, "function|load")) == (1, 0)


async def test_two_releases_serve_the_same_accounts_at_once(
    redis: Redis, stack: EmbeddedStack, keyspace: Keyspace, clock: ManualClock, ledger_settings: LedgerSettings
) -> None:
    async with Redis.from_url(stack.redis.url) as old_redis, Redis.from_url(stack.redis.url) as new_redis:
        old = Ledger(old_redis, keyspace, clock, ledger_settings)
        new = Ledger(new_redis, keyspace, clock, ledger_settings, library=NEXT)
        accounts = ["roll-0", "roll-1"]
        assert await old.load() is True
        for i, account in enumerate(accounts):
            await open_member(old, account, f"400000000000910{i}", 1000)

        def each(ledgers: list[Ledger], count: int) -> list[tuple[Ledger, str, str]]:
            """(ledger, account, request id) for `count` calls spread over ledgers and accounts."""
            return [(ledgers[i % len(ledgers)], accounts[i // len(ledgers) % 2], f"r{i}") for i in range(count)]

        # The deploy: a new server loads its library while the old one serves (all in flight at once).
        await redis.client_pause(200, all=False)
        loaded, *_ = await asyncio.gather(
            new.load(),
            *(lg.redeem(a, points=1, pos=TILL, request_id=f"redeem-{r}", fingerprint=fingerprint(r))
              for lg, a, r in each([old], 20)),
        )  # fmt: skip
        assert loaded is True
        # Both serve together; holds one release authorized, the other captures.
        await redis.client_pause(200, all=False)
        holds = await asyncio.gather(
            *(lg.authorize(a, points=10, ttl_ms=60_000, pos=TILL, request_id=f"hold-{r}", fingerprint=fingerprint(r))
              for lg, a, r in each([old, new], 20)),
        )  # fmt: skip
        other = {old: new, new: old}
        await redis.client_pause(200, all=False)
        await asyncio.gather(
            *(other[lg].capture(a, hold.tx, points=4, request_id=f"cap-{r}", fingerprint=fingerprint(r))
              for (lg, a, r), hold in zip(each([old, new], 20), holds, strict=True)),
        )  # fmt: skip
        for account in accounts:
            balance = await new.balance(account)
            assert (balance.available, balance.held) == (1000 - 10 - 10 * 4, 0)
            assert [e["seq"] for e in await events(redis, keyspace, account)] == list(range(1, 2 + 10 + 10 + 10 + 1))

    assert set(await libraries(redis)) == {LIBRARY.name, NEXT.name}
    # Nothing the old servers call was replaced, and no call ever missed its function.
    listed = await redis.function_list(library=LIBRARY.name, withcode=True)
    assert _pairs(listed[0])["library_code"].decode() == LIBRARY.source
    assert await calls(redis, "function|load") == 2


async def test_pruning_keeps_this_release_and_an_older_server_loads_its_own_again(
    ledger: Ledger, redis: Redis, keyspace: Keyspace, clock: ManualClock, settings: Settings
) -> None:
    other_release = Ledger(redis, keyspace, clock, ledger.settings, library=NEXT)
    assert (await ledger.load(), await other_release.load()) == (True, True)
    # Another application's library with a name like ours is not ours to delete.
    unrelated = "#!lua name=pointauth_tools\nredis.register_function('pointauth_tools_ping', function() return 1 end)"
    await redis.function_load(unrelated)
    out = io.StringIO()
    # The command runs its own event loop, as from the command line.
    assert await asyncio.to_thread(prune_functions_command, settings, out) == 0
    assert out.getvalue() == f"kept {LIBRARY.name}; deleted {NEXT.name}\n"
    assert set(await libraries(redis)) == {LIBRARY.name, "pointauth_tools"}
    assert await drop_other_libraries(redis) == []
    # A server of the pruned release, still running, serves on: its next call loads its library.
    await open_member(other_release, "pruned-1", "4000000000009201", 100)
    assert set(await libraries(redis)) == {LIBRARY.name, NEXT.name, "pointauth_tools"}
