"""A table of bad requests: each is INVALID_ARGUMENT naming its field, and changes nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from redis.asyncio import Redis

from pointauth.client import error_from_rpc
from pointauth.server.app import PointauthServer
from pointauth.server.ledger import Keyspace
from pointauth.v1 import admin_service_pb2 as admin_pb
from pointauth.v1 import common_pb2
from pointauth.v1 import points_service_pb2 as pb
from tests.conftest import CARD, STORE
from tests.helpers import account_state, events

RID = "0b8f6d3e-3a4c-4b8e-9a51-5f2c7d9e1a20"
NOW = Timestamp(seconds=1_795_000_000)


def pos(**changes: Any) -> common_pb2.PointOfSale:
    fields: dict[str, Any] = {
        "company_id": "acme",
        "store_id": "store-1",
        "terminal_id": "till-1",
        "channel": common_pb2.CHANNEL_STORE,
    }
    fields.update(changes)
    return common_pb2.PointOfSale(**fields)


def redeem(**changes: Any) -> pb.RedeemPointsRequest:
    fields: dict[str, Any] = {"request_id": RID, "card_number": CARD, "point_of_sale": STORE, "points": 10}
    fields.update(changes)
    return pb.RedeemPointsRequest(**fields)


def authorize(**changes: Any) -> pb.AuthorizeHoldRequest:
    fields: dict[str, Any] = {"request_id": RID, "card_number": CARD, "point_of_sale": STORE, "points": 10}
    fields.update(changes)
    return pb.AuthorizeHoldRequest(**fields)


def earn(**changes: Any) -> pb.EarnPointsRequest:
    fields: dict[str, Any] = {
        "request_id": RID,
        "card_number": CARD,
        "point_of_sale": STORE,
        "purchase_amount": 1000,
        "purchase_time": NOW,
    }
    fields.update(changes)
    return pb.EarnPointsRequest(**fields)


def grant(**changes: Any) -> admin_pb.GrantPointsRequest:
    fields: dict[str, Any] = {
        "request_id": RID,
        "card_number": CARD,
        "points": 10,
        "kind": common_pb2.LOT_KIND_REGULAR,
        "expire_time": Timestamp(seconds=1_900_000_000),
        "point_of_sale": STORE,
    }
    fields.update(changes)
    return admin_pb.GrantPointsRequest(**fields)


def create(**changes: Any) -> admin_pb.CreateAccountRequest:
    fields: dict[str, Any] = {"request_id": RID, "account_id": "member-2", "card_number": "4000000000000002"}
    fields.update(changes)
    return admin_pb.CreateAccountRequest(**fields)


# (case, method, request, fields the error must name)
# ruff: noqa: E501 (one case a line reads best as a table)
CASES: list[tuple[str, str, Any, set[str]]] = [
    ("zero points", "RedeemPoints", redeem(points=0), {"points"}),
    ("negative points", "RedeemPoints", redeem(points=-5), {"points"}),
    ("points beyond the exact range", "RedeemPoints", redeem(points=2**53), {"points"}),
    ("int64 max points", "AuthorizeHold", authorize(points=2**63 - 1), {"points"}),
    ("int64 min points", "AuthorizeHold", authorize(points=-(2**63)), {"points"}),
    ("empty card", "RedeemPoints", redeem(card_number=""), {"card_number"}),
    ("over-long card", "RedeemPoints", redeem(card_number="4" * 65), {"card_number"}),
    ("card with spaces", "RedeemPoints", redeem(card_number="4000 0000"), {"card_number"}),
    ("missing request_id", "RedeemPoints", redeem(request_id=""), {"request_id"}),
    ("malformed request_id", "RedeemPoints", redeem(request_id="retry-1"), {"request_id"}),
    ("request_id in braces", "RedeemPoints", redeem(request_id="{" + RID + "}"), {"request_id"}),
    ("missing point_of_sale", "RedeemPoints", redeem(point_of_sale=None), {"point_of_sale"}),
    ("unspecified channel", "RedeemPoints", redeem(point_of_sale=pos(channel=0)), {"point_of_sale.channel"}),
    ("unknown channel", "RedeemPoints", redeem(point_of_sale=pos(channel=42)), {"point_of_sale.channel"}),
    ("empty store", "RedeemPoints", redeem(point_of_sale=pos(store_id="")), {"point_of_sale.store_id"}),
    ("over-long terminal", "AuthorizeHold", authorize(point_of_sale=pos(terminal_id="t" * 65)), {"point_of_sale.terminal_id"}),
    ("several at once", "RedeemPoints", redeem(points=0, card_number=""), {"points", "card_number"}),
    ("hold ttl too long", "AuthorizeHold", authorize(hold_ttl=Duration(seconds=8 * 86400)), {"hold_ttl"}),
    ("hold ttl zero", "AuthorizeHold", authorize(hold_ttl=Duration(seconds=0)), {"hold_ttl"}),
    ("negative purchase", "EarnPoints", earn(purchase_amount=-1), {"purchase_amount"}),
    ("missing purchase time", "EarnPoints", earn(purchase_time=None), {"purchase_time"}),
    ("invalid purchase time", "EarnPoints", earn(purchase_time=Timestamp(seconds=-1)), {"purchase_time"}),
    ("malformed hold id", "CaptureHold", pb.CaptureHoldRequest(request_id=RID, hold_id="member-1"), {"hold_id"}),
    ("empty hold id", "VoidHold", pb.VoidHoldRequest(request_id=RID, hold_id=""), {"hold_id"}),
    ("zero capture", "CaptureHold", pb.CaptureHoldRequest(request_id=RID, hold_id="member-1.3", points=0), {"points"}),
    ("refund of nothing", "RefundTransaction", pb.RefundTransactionRequest(request_id=RID, transaction_id="x"), {"transaction_id"}),
    ("negative refund", "RefundTransaction", pb.RefundTransactionRequest(request_id=RID, transaction_id="member-1.2", points=-1), {"points"}),
    ("balance without card", "GetBalance", pb.GetBalanceRequest(), {"card_number"}),
    ("receipt of garbage", "GetReceipt", pb.GetReceiptRequest(transaction_id="member-1.0"), {"transaction_id"}),
    ("unspecified lot kind", "GrantPoints", grant(kind=0), {"kind"}),
    ("unknown lot kind", "GrantPoints", grant(kind=7), {"kind"}),
    ("grant without expiry", "GrantPoints", grant(expire_time=None), {"expire_time"}),
    ("account id with a dot", "CreateAccount", create(account_id="a.b"), {"account_id"}),
    ("account id that is a dot", "CreateAccount", create(account_id="."), {"account_id"}),
    ("account id -1", "CreateAccount", create(account_id="-1"), {"account_id"}),
    ("account id NULL", "CreateAccount", create(account_id="NULL"), {"account_id"}),
    ("account id undefined", "CreateAccount", create(account_id="undefined"), {"account_id"}),
    ("card -1", "CreateAccount", create(card_number="-1"), {"card_number"}),
    ("card too short", "CreateAccount", create(card_number="123"), {"card_number"}),
    ("card ending in a dash", "CreateAccount", create(card_number="4000-"), {"card_number"}),
    ("card null", "RedeemPoints", redeem(card_number="null"), {"card_number"}),
    ("store None", "RedeemPoints", redeem(point_of_sale=pos(store_id="None")), {"point_of_sale.store_id"}),
    ("company starting with a dash", "EarnPoints", earn(point_of_sale=pos(company_id="-acme")), {"point_of_sale.company_id"}),
    ("purchase in the year 9999", "EarnPoints", earn(purchase_time=Timestamp(seconds=253_402_128_000)), {"purchase_time"}),
    ("purchase at the last second of 9999", "EarnPoints", earn(purchase_time=Timestamp(seconds=253_402_300_799)), {"purchase_time"}),
    ("purchase beyond the skew", "EarnPoints", earn(purchase_time=Timestamp(seconds=NOW.seconds + 301)), {"purchase_time"}),
    ("purchase time nanos out of range", "EarnPoints", earn(purchase_time=Timestamp(seconds=NOW.seconds, nanos=10**9)), {"purchase_time"}),
    ("grant expiry nanos out of range", "GrantPoints", grant(expire_time=Timestamp(seconds=1_900_000_000, nanos=-1)), {"expire_time"}),
    ("grant expiry after 9999", "GrantPoints", grant(expire_time=Timestamp(seconds=253_402_300_800)), {"expire_time"}),
    ("hold ttl nanos of a whole second", "AuthorizeHold", authorize(hold_ttl=Duration(seconds=1, nanos=10**9)), {"hold_ttl"}),
    ("hold ttl with negative nanos", "AuthorizeHold", authorize(hold_ttl=Duration(seconds=60, nanos=-1)), {"hold_ttl"}),
    ("negative hold ttl", "AuthorizeHold", authorize(hold_ttl=Duration(seconds=-60)), {"hold_ttl"}),
]  # fmt: skip


def _method(channel: grpc.aio.Channel, name: str) -> Callable[..., Any]:
    """A raw call, so that requests the SDK would never build still reach the server."""
    service = "AdminService" if name in ("GrantPoints", "CreateAccount") else "PointsService"
    return channel.unary_unary(
        f"/pointauth.v1.{service}/{name}",
        request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
        response_deserializer=lambda raw: raw,
    )


METHODS = [
    *(m.name for m in pb.DESCRIPTOR.services_by_name["PointsService"].methods),
    *(m.name for m in admin_pb.DESCRIPTOR.services_by_name["AdminService"].methods),
]
# Field 1, length 5, but only two bytes follow: no parser can read it.
TRUNCATED = b"\x0a\x05ab"
# Field 1 (a string in every request: request_id, card_number, ...) holding bytes that are not UTF-8.
NOT_UTF8 = b"\x0a\x02\xff\xfe"


@pytest.mark.parametrize("method", METHODS)
async def test_a_body_that_is_not_protobuf_is_invalid_argument(
    server: PointauthServer, member: str, redis: Redis, keyspace: Keyspace, method: str
) -> None:
    keys_before = sorted(await redis.keys("*"))
    state_before = await account_state(redis, keyspace, "member-1")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for body in (TRUNCATED, NOT_UTF8):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await _method(channel, method)(body)
            error = error_from_rpc(raised.value.code(), raised.value.details() or "", raised.value.trailing_metadata())
            assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST"), method
    assert sorted(await redis.keys("*")) == keys_before
    assert await account_state(redis, keyspace, "member-1") == state_before


@pytest.mark.parametrize(("case", "method", "request_message", "fields"), CASES, ids=[c[0] for c in CASES])
async def test_bad_input_is_invalid_argument_and_changes_nothing(
    server: PointauthServer,
    member: str,
    redis: Redis,
    keyspace: Keyspace,
    case: str,
    method: str,
    request_message: Any,
    fields: set[str],
) -> None:
    state_before = await account_state(redis, keyspace, "member-1")
    events_before = await events(redis, keyspace, "member-1")
    keys_before = sorted(await redis.keys("*"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = _method(channel, method)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(request_message)
    error = error_from_rpc(raised.value.code(), raised.value.details() or "", raised.value.trailing_metadata())
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, case
    assert error.reason == "INVALID_ARGUMENT"
    assert set(error.field_violations) == fields
    assert await account_state(redis, keyspace, "member-1") == state_before
    assert await events(redis, keyspace, "member-1") == events_before
    assert sorted(await redis.keys("*")) == keys_before
