"""Bursts above every pool size, load shedding, a Redis outage and unexpected faults: each call
gets a clear status with exactly one ErrorInfo, and a refused call changes nothing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
import msgspec
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from pointauth.client import (
    OverloadedError,
    PointauthError,
    PointsClient,
    UnavailableError,
    error_from_rpc,
)
from pointauth.server.api.boundary import ErrorBoundary
from pointauth.server.app import PointauthServer
from pointauth.server.clock import ManualClock
from pointauth.server.config import Settings
from pointauth.server.devstack.stack import EmbeddedStack
from tests.conftest import DAY_MS, STORE, at


def _outcome(result: object) -> str:
    if isinstance(result, PointauthError):
        return result.reason
    assert not isinstance(result, BaseException), result
    return "OK"


async def _open_member(client: PointsClient, clock: ManualClock, account: str, card: str, points: int) -> None:
    await client.create_account(account, card)
    await client.grant_points(card, points, at(clock.now_ms() + 30 * DAY_MS), STORE)


@pytest.mark.parametrize("round_", range(3))
async def test_200_concurrent_holds_of_7_on_1000_points(client: PointsClient, clock: ManualClock, round_: int) -> None:
    # 200 calls, three times the Redis pool (64): the burst queues for connections instead of failing.
    card = f"400000000000100{round_}"
    await _open_member(client, clock, f"burst-{round_}", card, 1000)
    results = await asyncio.gather(*(client.authorize_hold(card, STORE, 7) for _ in range(200)), return_exceptions=True)
    assert Counter(_outcome(r) for r in results) == {"OK": 142, "INSUFFICIENT_POINTS": 58}
    balance = await client.get_balance(card)
    assert (balance.balance.available_points, balance.balance.held_points) == (6, 994)


async def test_300_one_point_redeems_in_flight_all_succeed(
    client: PointsClient, clock: ManualClock, redis: Redis
) -> None:
    await _open_member(client, clock, "burst-redeem", "4000000000002000", 1000)
    # Writes wait for a moment, so all 300 are surely in flight together.
    await redis.client_pause(300, all=False)
    results = await asyncio.gather(
        *(client.redeem_points("4000000000002000", STORE, 1) for _ in range(300)), return_exceptions=True
    )
    assert Counter(_outcome(r) for r in results) == {"OK": 300}
    assert (await client.get_balance("4000000000002000")).balance.available_points == 700


@pytest.fixture
async def tuned(
    request: pytest.FixtureRequest, settings: Settings, clock: ManualClock, redis: Redis, group: object
) -> AsyncIterator[PointsClient]:
    """A server with the settings the test names (section -> field -> value), and a client."""
    changes: dict[str, dict[str, Any]] = request.param
    tuned = msgspec.structs.replace(
        settings,
        **{
            section: msgspec.structs.replace(getattr(settings, section), **fields)
            for section, fields in changes.items()
        },
    )
    async with (
        PointauthServer(tuned, clock, sweeper=False) as server,
        PointsClient(f"127.0.0.1:{server.port}", plaintext=True) as client,
    ):
        yield client


@pytest.mark.parametrize("tuned", [{"server": {"max_in_flight": 50, "overload_retry_ms": 250}}], indirect=True)
async def test_calls_beyond_max_in_flight_are_shed_with_a_retry_hint(
    tuned: PointsClient, clock: ManualClock, redis: Redis
) -> None:
    await _open_member(tuned, clock, "shed-1", "4000000000003000", 1000)
    await redis.client_pause(1000, all=False)  # the first 50 calls stay in flight meanwhile
    results = await asyncio.gather(
        *(tuned.authorize_hold("4000000000003000", STORE, 1) for _ in range(200)), return_exceptions=True
    )
    shed = [r for r in results if isinstance(r, OverloadedError)]
    assert Counter(_outcome(r) for r in results) == {"OK": 50, "SERVER_OVERLOADED": 150}
    assert {(e.code, e.retry_delay, e.metadata["retry_delay_ms"]) for e in shed} == {
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 0.25, "250")
    }
    balance = await tuned.get_balance("4000000000003000")
    assert (balance.balance.available_points, balance.balance.held_points) == (950, 50)


@pytest.mark.parametrize("channels", [1, 4])
async def test_a_burst_of_3000_on_one_or_four_connections_is_run_or_shed_by_the_boundary(
    server: PointauthServer, client: PointsClient, clock: ManualClock, redis: Redis, channels: int
) -> None:
    """Three times max_in_flight at once, on one connection (past its stream limit as it was) or on
    four (past gRPC's queue of calls not yet started, as it was): each call is run, or shed with
    SERVER_OVERLOADED and a retry hint; gRPC itself refuses none (UNAVAILABLE, or CANCELLED,
    without an ErrorInfo), as it did past 1,000."""
    await _open_member(client, clock, "burst-3000", "4000000000005000", 10_000)
    async with contextlib.AsyncExitStack() as more:
        clients = [client] + [
            await more.enter_async_context(PointsClient(f"127.0.0.1:{server.port}", plaintext=True))
            for _ in range(channels - 1)
        ]
        await redis.client_pause(1000, all=False)  # the first 1,000 calls stay in flight meanwhile
        results = await asyncio.gather(
            *(clients[i % channels].authorize_hold("4000000000005000", STORE, 1) for i in range(3000)),
            return_exceptions=True,
        )
    outcomes = Counter(_outcome(r) for r in results)
    assert set(outcomes) == {"OK", "SERVER_OVERLOADED"}, outcomes
    shed = [r for r in results if isinstance(r, OverloadedError)]
    assert len(shed) == outcomes["SERVER_OVERLOADED"]
    assert {(e.code, e.retry_delay) for e in shed} == {(grpc.StatusCode.RESOURCE_EXHAUSTED, 0.2)}
    balance = await client.get_balance("4000000000005000")
    assert (balance.balance.available_points, balance.balance.held_points) == (
        10_000 - outcomes["OK"],
        outcomes["OK"],
    )


@pytest.mark.parametrize("tuned", [{"redis": {"pipeline_batches": 1, "pool_wait_seconds": 0.3}}], indirect=True)
async def test_a_call_not_sent_to_redis_within_the_wait_is_shed(
    tuned: PointsClient, clock: ManualClock, redis: Redis
) -> None:
    await _open_member(tuned, clock, "shed-2", "4000000000004000", 1000)
    await redis.client_pause(1500, all=False)
    # The one batch allowed in flight holds the first redeem; the next 19 wait for it past 0.3 s.
    first = asyncio.create_task(tuned.redeem_points("4000000000004000", STORE, 1))
    await asyncio.sleep(0.2)
    results = await asyncio.gather(
        first, *(tuned.redeem_points("4000000000004000", STORE, 1) for _ in range(19)), return_exceptions=True
    )
    assert Counter(_outcome(r) for r in results) == {"OK": 1, "SERVER_OVERLOADED": 19}
    assert {type(r) for r in results if isinstance(r, BaseException)} == {OverloadedError}
    assert (await tuned.get_balance("4000000000004000")).balance.available_points == 999


async def test_a_redis_outage_is_unavailable_and_the_server_recovers_after_it(
    client: PointsClient, clock: ManualClock, stack: EmbeddedStack
) -> None:
    await _open_member(client, clock, "outage-1", "4000000000005000", 1000)
    # Fill the pool with connections that the restart will leave dead.
    await asyncio.gather(*(client.get_balance("4000000000005000") for _ in range(64)))
    assert stack.redis.proc is not None
    stack.redis.proc.kill()
    stack.redis.proc.wait()
    try:
        calls: tuple[Awaitable[object], ...] = (
            client.get_balance("4000000000005000"),
            client.redeem_points("4000000000005000", STORE, 1),
            client.authorize_hold("4000000000005000", STORE, 1),
        )
        for call in calls:
            with pytest.raises(UnavailableError) as raised:
                await call
            assert (raised.value.reason, raised.value.metadata["backend"]) == ("BACKEND_UNAVAILABLE", "Redis")
            assert raised.value.retry_delay == 0.2
    finally:
        stack.redis.start()
    # Every pooled connection died with the old process: none of them may fail a call now.
    balances = await asyncio.gather(*(client.get_balance("4000000000005000") for _ in range(100)))
    assert {b.balance.available_points for b in balances} == {1000}
    redeemed = await client.redeem_points("4000000000005000", STORE, 1)
    assert redeemed.balance.available_points == 999


class _Faulty:
    """A service whose handlers fail in the ways a bug or an outage would."""

    SECRET = "password=hunter2 at /srv/pointauth/internal.py:42"

    async def crash(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        raise RuntimeError(self.SECRET)

    async def lose_redis(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        raise RedisConnectionError(self.SECRET)


@pytest.fixture
async def faulty_port() -> AsyncIterator[int]:
    faulty = _Faulty()
    server = grpc.aio.server(interceptors=[ErrorBoundary(max_in_flight=10, retry_delay_ms=100, max_message_bytes=1024)])
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(method, request_deserializer=bytes, response_serializer=bytes)
        for name, method in (("Crash", faulty.crash), ("LoseRedis", faulty.lose_redis))
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("pointauth.test.Faulty", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield port
    await server.stop(None)


@pytest.mark.parametrize(
    ("method", "code", "reason"),
    [
        ("Crash", grpc.StatusCode.INTERNAL, "INTERNAL_ERROR"),
        ("LoseRedis", grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE"),
    ],
)
async def test_unexpected_failures_get_one_error_info_and_leak_nothing(
    faulty_port: int, method: str, code: grpc.StatusCode, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{faulty_port}") as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"/pointauth.test.Faulty/{method}")
        with caplog.at_level(logging.WARNING), pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(b"")
    error = error_from_rpc(raised.value.code(), raised.value.details() or "", raised.value.trailing_metadata())
    assert (error.code, error.reason) == (code, reason)
    assert "hunter2" not in (raised.value.details() or "")
    assert all("hunter2" not in value for value in error.metadata.values())
    assert _Faulty.SECRET in caplog.text  # the operator sees it in the log
