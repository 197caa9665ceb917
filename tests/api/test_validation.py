"""Request validation (api/validation.py) without a server: each rule at its bounds, and every
violation of a request collected into one INVALID_ARGUMENT naming each field."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from pointauth.server.api.errors import ApiError
from pointauth.server.api.validation import MAX_AMOUNT, MAX_POINTS, MAX_TIMESTAMP_SECONDS, Violations
from pointauth.server.domain.ids import CARD_RULE, ID_RULE
from pointauth.server.domain.reasons import ErrorReason
from pointauth.server.ledger import PointOfSaleRef
from pointauth.v1 import common_pb2

RID = "0b8f6d3e-3a4c-4b8e-9a51-5f2c7d9e1a20"
NOT_A_UUID = "must be a UUID, e.g. 0b8f6d3e-3a4c-4b8e-9a51-5f2c7d9e1a20"
NOT_CANONICAL = "must be a UUID in its canonical 8-4-4-4-12 form"
BAD_TIMESTAMP = "must be a valid timestamp between 1970-01-01 and 9999-12-31"


def test_the_bounds() -> None:
    assert MAX_POINTS == MAX_AMOUNT == 1_000_000_000_000_000
    assert datetime.fromtimestamp(MAX_TIMESTAMP_SECONDS, tz=UTC).isoformat() == "9999-12-31T23:59:59+00:00"


# --- request_id --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (RID, RID),
        (RID.upper(), RID),  # canonical in either case, kept in lower case
        ("0B8f6D3e-3a4C-4b8e-9A51-5f2c7d9e1a20", RID),
        ("00000000-0000-4000-8000-000000000007", "00000000-0000-4000-8000-000000000007"),
    ],
)
def test_request_id_in_canonical_form(value: str, expected: str) -> None:
    v = Violations()
    assert v.request_id(value) == expected
    assert v.items == []


@pytest.mark.parametrize(
    ("value", "description"),
    [
        ("", NOT_A_UUID),
        ("not-a-uuid", NOT_A_UUID),
        (RID[:-1], NOT_A_UUID),  # 31 hex digits
        (RID + "0", NOT_A_UUID),
        (RID.replace("a", "g", 1), NOT_A_UUID),
        ("0b8f6d3e3a4c4b8e9a515f2c7d9e1a20", NOT_CANONICAL),  # the same UUID without hyphens
        ("{" + RID + "}", NOT_CANONICAL),
        ("urn:uuid:" + RID, NOT_CANONICAL),
        ("0b8f6d3e3a4c-4b8e-9a51-5f2c-7d9e1a20", NOT_CANONICAL),  # hyphens in the wrong places
        ("０" + RID[1:], NOT_CANONICAL),  # a fullwidth digit, which Python's int() reads as 0
    ],
)
def test_request_id_other_forms(value: str, description: str) -> None:
    v = Violations()
    assert v.request_id(value) == ""
    assert v.items == [("request_id", description)]


# --- timestamps --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "nanos", "expected_ms"),
    [
        (0, 0, 0),
        (0, 999_999, 0),  # below a millisecond: truncated
        (0, 1_000_000, 1),
        (1_795_000_000, 123_456_789, 1_795_000_000_123),
        (MAX_TIMESTAMP_SECONDS, 999_999_999, 253_402_300_799_999),  # 9999-12-31T23:59:59.999Z
    ],
)
def test_timestamp_within_bounds(seconds: int, nanos: int, expected_ms: int) -> None:
    v = Violations()
    assert v.timestamp("purchase_time", Timestamp(seconds=seconds, nanos=nanos)) == expected_ms
    assert v.items == []


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(-1, 0), (-1, 999_999_999), (MAX_TIMESTAMP_SECONDS + 1, 0), (0, 1_000_000_000), (0, -1), (5, -1)],
)
def test_timestamp_out_of_bounds(seconds: int, nanos: int) -> None:
    v = Violations()
    assert v.timestamp("purchase_time", Timestamp(seconds=seconds, nanos=nanos)) == 0
    assert v.items == [("purchase_time", BAD_TIMESTAMP)]


def test_timestamp_not_after() -> None:
    limit = 1_795_000_000_000
    v = Violations()
    assert v.timestamp("t", Timestamp(seconds=1_795_000_000), not_after_ms=limit) == limit  # the bound itself
    # Less than a millisecond past the bound truncates onto it: accepted.
    assert v.timestamp("t", Timestamp(seconds=1_795_000_000, nanos=999_999), not_after_ms=limit) == limit
    assert v.timestamp("t", Timestamp(seconds=0), not_after_ms=limit) == 0
    assert v.items == []
    assert v.timestamp("t", Timestamp(seconds=1_795_000_000, nanos=1_000_000), not_after_ms=limit) == 0
    assert v.timestamp("u", Timestamp(seconds=1_795_000_001), not_after_ms=limit) == 0
    assert v.items == [("t", "must not lie in the future"), ("u", "must not lie in the future")]


def test_a_timestamp_out_of_bounds_is_one_violation_even_with_not_after() -> None:
    v = Violations()
    assert v.timestamp("t", Timestamp(seconds=MAX_TIMESTAMP_SECONDS + 1), not_after_ms=0) == 0
    assert v.items == [("t", BAD_TIMESTAMP)]


# --- durations ---------------------------------------------------------------------------------

WEEK_S = 604_800


@pytest.mark.parametrize(
    ("seconds", "nanos", "expected_ms"),
    [
        (1, 0, 1_000),  # the lower bound
        (0, 999_999_999, None),  # 999 ms: below it
        (1, 999_999, 1_000),  # sub-millisecond parts are truncated
        (900, 500_000_000, 900_500),
        (WEEK_S, 0, 604_800_000),  # the upper bound
        (WEEK_S, 999_999, 604_800_000),  # truncated onto it
        (WEEK_S, 1_000_000, None),  # 1 ms past it
        (WEEK_S + 1, 0, None),
        (0, 0, None),
        (1, 1_000_000_000, None),  # nanos out of range, though 2 s would be within bounds
        (5, -1, None),  # negative nanos with positive seconds: not a valid Duration
        (0, -500_000_000, None),  # a valid but negative Duration
        (-1, 0, None),
        (-10, -500_000_000, None),
    ],
)
def test_duration_bounds(seconds: int, nanos: int, expected_ms: int | None) -> None:
    v = Violations()
    result = v.duration_ms("hold_ttl", Duration(seconds=seconds, nanos=nanos), 1, WEEK_S)
    if expected_ms is None:
        assert result == 0
        assert v.items == [("hold_ttl", "must be a duration between 1 s and 604800 s")]
    else:
        assert result == expected_ms
        assert v.items == []


# --- points ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "description"),
    [
        (-5, "must be greater than 0"),
        (0, "must be greater than 0"),
        (1, None),
        (10**15, None),
        (10**15 + 1, "must be at most 1000000000000000"),
        (2**63 - 1, "must be at most 1000000000000000"),
    ],
)
def test_points_bounds(value: int, description: str | None) -> None:
    v = Violations()
    assert v.points("points", value) == value  # returned as is; the violation stops the request
    assert v.items == ([] if description is None else [("points", description)])


# --- ids ---------------------------------------------------------------------------------------


def test_identifier_and_card_number_rules() -> None:
    v = Violations()
    assert v.identifier("account_id", "member-1") == "member-1"
    assert v.card_number("card_number", "9100000000000001") == "9100000000000001"
    assert v.items == []
    v.identifier("account_id", "")
    v.identifier("account_id", "null")
    v.card_number("card_number", "")
    v.card_number("card_number", "12_4")
    assert v.items == [
        ("account_id", "is required"),
        ("account_id", f"must be {ID_RULE}"),
        ("card_number", "is required"),
        ("card_number", f"must be {CARD_RULE}"),
    ]


def test_transaction_field() -> None:
    v = Violations()
    assert v.transaction("transaction_id", "member-1.42") == ("member-1", 42)
    assert v.items == []
    assert v.transaction("transaction_id", "") == ("", 0)
    assert v.transaction("hold_id", "member-1.0") == ("", 0)
    assert v.items == [("transaction_id", "is required"), ("hold_id", "is not a pointauth transaction id")]


# --- lot kinds ---------------------------------------------------------------------------------


def test_lot_kinds() -> None:
    v = Violations()
    assert v.lot_kind("kind", common_pb2.LOT_KIND_REGULAR) == "R"
    assert v.lot_kind("kind", common_pb2.LOT_KIND_LIMITED_TIME) == "L"
    assert v.items == []
    assert v.lot_kind("kind", common_pb2.LOT_KIND_UNSPECIFIED) == "R"
    assert v.lot_kind("kind", 99) == "R"
    assert v.items == [("kind", "must be LOT_KIND_REGULAR or LOT_KIND_LIMITED_TIME")] * 2


# --- point_of_sale -----------------------------------------------------------------------------

CHANNEL_RULE = "must be one of the Channel values other than CHANNEL_UNSPECIFIED"


def test_point_of_sale_valid() -> None:
    v = Violations()
    pos = common_pb2.PointOfSale(
        company_id="acme", store_id="store-1", terminal_id="till_3", channel=common_pb2.CHANNEL_KIOSK
    )
    assert v.point_of_sale(pos) == PointOfSaleRef("acme", "store-1", "till_3", common_pb2.CHANNEL_KIOSK)
    assert v.items == []


def test_point_of_sale_missing() -> None:
    v = Violations()
    assert v.point_of_sale(None) is None
    assert v.items == [("point_of_sale", "is required")]
    optional = Violations()
    assert optional.point_of_sale(None, required=False) is None
    assert optional.items == []


@pytest.mark.parametrize("channel", [common_pb2.CHANNEL_UNSPECIFIED, 99])
def test_point_of_sale_every_field_named(channel: int) -> None:
    v = Violations()
    pos = common_pb2.PointOfSale(company_id="", store_id="-store", terminal_id="NULL", channel=channel)  # type: ignore[arg-type]
    assert v.point_of_sale(pos) == PointOfSaleRef("", "-store", "NULL", channel)
    assert v.items == [
        ("point_of_sale.channel", CHANNEL_RULE),
        ("point_of_sale.company_id", "is required"),
        ("point_of_sale.store_id", f"must be {ID_RULE}"),
        ("point_of_sale.terminal_id", f"must be {ID_RULE}"),
    ]


# --- collecting --------------------------------------------------------------------------------


def test_no_violations_raise_nothing() -> None:
    v = Violations()
    v.request_id(RID)
    v.points("points", 5)
    v.raise_if_any()
    assert v.items == []


def test_every_violation_is_collected_into_one_error() -> None:
    v = Violations()
    v.request_id("{" + RID + "}")
    v.card_number("card_number", "12")
    v.points("points", 0)
    v.timestamp("purchase_time", Timestamp(seconds=2_000), not_after_ms=1_000_000)
    v.duration_ms("hold_ttl", Duration(seconds=1, nanos=1_000_000_000), 1, WEEK_S)
    v.lot_kind("kind", 0)
    v.point_of_sale(common_pb2.PointOfSale(company_id="acme", store_id="s", terminal_id="t"))
    with pytest.raises(ApiError) as raised:
        v.raise_if_any()
    error = raised.value
    expected = [
        ("request_id", NOT_CANONICAL),
        ("card_number", f"must be {CARD_RULE}"),
        ("points", "must be greater than 0"),
        ("purchase_time", "must not lie in the future"),
        ("hold_ttl", "must be a duration between 1 s and 604800 s"),
        ("kind", "must be LOT_KIND_REGULAR or LOT_KIND_LIMITED_TIME"),
        ("point_of_sale.channel", CHANNEL_RULE),
    ]
    assert error.violations == expected
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == ErrorReason.INVALID_ARGUMENT
    assert error.message == (
        "invalid request: request_id, card_number, points, purchase_time, hold_ttl, kind, point_of_sale.channel"
    )
    assert error.metadata == {}
    assert error.retry_delay_ms is None
