"""Limits that bound what one call can cost: the body's size, the basket's lines, and a deadline
that passed before the call could start. Each refusal has exactly one ErrorInfo and changes
nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import msgspec
import pytest
from google.rpc import error_details_pb2, status_pb2
from redis.asyncio import Redis

from pointauth.client import InvalidArgumentError, PointsClient
from pointauth.server.api.boundary import ErrorBoundary
from pointauth.server.app import PointauthServer
from pointauth.server.clock import ManualClock
from pointauth.server.config import Settings
from pointauth.server.domain.group import Entry
from pointauth.server.ledger import Keyspace
from pointauth.v1 import points_service_pb2 as pb
from tests.api.test_group import error_infos
from tests.conftest import STORE, at
from tests.helpers import account_state, stream_events

MAX_BYTES = 4096


@pytest.fixture
async def small_server(
    settings: Settings, clock: ManualClock, redis: Redis, group: tuple[Entry, ...]
) -> AsyncIterator[PointauthServer]:
    small = msgspec.structs.replace(
        settings, server=msgspec.structs.replace(settings.server, max_message_bytes=MAX_BYTES)
    )
    async with PointauthServer(small, clock, sweeper=False) as running:
        yield running


async def _get_balance(server: PointauthServer, body: bytes) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call: Any = channel.unary_unary("/pointauth.v1.PointsService/GetBalance")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(body)
    return raised.value


async def test_a_body_over_the_limit_is_refused_unparsed_with_one_error_info(small_server: PointauthServer) -> None:
    at_limit = pb.GetBalanceRequest(card_number="4000000000000001", page_token="x" * (MAX_BYTES - 30))
    over = pb.GetBalanceRequest(card_number="4000000000000001", page_token="x" * MAX_BYTES)
    assert at_limit.ByteSize() <= MAX_BYTES < over.ByteSize()
    # At the limit the body is parsed and checked as usual (this page token is not one).
    assert [i.reason for i in error_infos(await _get_balance(small_server, at_limit.SerializeToString()))] == [
        "INVALID_ARGUMENT"
    ]
    error = await _get_balance(small_server, over.SerializeToString())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [(i.reason, dict(i.metadata)) for i in error_infos(error)] == [
        ("REQUEST_TOO_LARGE", {"max_bytes": str(MAX_BYTES)})
    ]


async def test_a_body_far_over_the_limit_is_dropped_by_grpc_itself(small_server: PointauthServer) -> None:
    error = await _get_balance(small_server, b"\x0a" + b"x" * (4 * MAX_BYTES + 1))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_infos(error) == []  # gRPC's own answer: documented with server.max_message_bytes


async def test_a_basket_of_too_many_lines_is_invalid_naming_basket_and_changes_nothing(
    client: PointsClient, member: str, clock: ManualClock, redis: Redis, keyspace: Keyspace
) -> None:
    before = (await account_state(redis, keyspace, "member-1"), await stream_events(redis, keyspace, "member-1"))
    lines = [pb.BasketLine(sku=f"sku-{i}", category="food", quantity=1, amount=1) for i in range(501)]
    with pytest.raises(InvalidArgumentError) as raised:
        await client.earn_points(member, STORE, 501, at(clock.now_ms()), basket=lines)
    assert (raised.value.reason, raised.value.field_violations) == ("INVALID_ARGUMENT", {"basket": "at most 500 lines"})
    assert (
        await account_state(redis, keyspace, "member-1"),
        await stream_events(redis, keyspace, "member-1"),
    ) == before
    earned = await client.earn_points(member, STORE, 500, at(clock.now_ms()), basket=lines[:500])
    assert earned.earned_points == 5


class _Context:
    """A call whose deadline has passed by the time the server starts it."""

    def __init__(self) -> None:
        self.status: grpc.Status | None = None

    def time_remaining(self) -> float:
        return 0.0

    async def abort_with_status(self, status: grpc.Status) -> None:
        self.status = status
        raise grpc.aio.AbortError()


async def test_a_call_whose_deadline_passed_is_not_started() -> None:
    started = []

    async def behavior(request: bytes, context: Any) -> bytes:
        started.append(request)
        return request

    async def continuation(details: Any) -> Any:
        return grpc.unary_unary_rpc_method_handler(behavior, request_deserializer=bytes, response_serializer=bytes)

    boundary = ErrorBoundary(max_in_flight=10, retry_delay_ms=100, max_message_bytes=MAX_BYTES)
    details: Any = type("Details", (), {"method": "/pointauth.v1.PointsService/RedeemPoints"})()
    handler: Any = await boundary.intercept_service(continuation, details)
    context = _Context()
    with pytest.raises(grpc.aio.AbortError):
        await handler.unary_unary(b"request", context)
    assert started == []
    assert context.status is not None
    assert context.status.code == grpc.StatusCode.DEADLINE_EXCEEDED
    details = status_pb2.Status.FromString(dict(context.status.trailing_metadata)["grpc-status-details-bin"]).details
    infos = [error_details_pb2.ErrorInfo() for _ in details]
    assert [info.reason for info, packed in zip(infos, details, strict=True) if packed.Unpack(info)] == [
        "DEADLINE_PASSED"
    ]
