"""Request validation: every problem of a request is collected and named by its field path, so
a POS developer fixes them all at once. Nothing reaches the ledger before this passes."""

from __future__ import annotations

import re
import uuid

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from pointauth.server.api.errors import ApiError
from pointauth.server.ledger import PointOfSaleRef, parse_transaction_id
from pointauth.v1 import common_pb2

# Lua numbers are doubles: amounts and balances stay far below 2^53 so every point is exact.
MAX_POINTS = 10**15
MAX_AMOUNT = 10**15
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Timestamps a till can mean: from 1970 to the year 9999 (google.protobuf.Timestamp's range).
MAX_TIMESTAMP_SECONDS = 253_402_300_799


class Violations:
    """Collects field violations; `raise_if_any` turns them into one INVALID_ARGUMENT."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, field: str, description: str) -> None:
        self.items.append((field, description))

    def raise_if_any(self) -> None:
        if self.items:
            fields = ", ".join(field for field, _ in self.items)
            raise ApiError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_ARGUMENT",
                f"invalid request: {fields}",
                violations=self.items,
            )

    def request_id(self, value: str) -> str:
        try:
            parsed = uuid.UUID(value)
        except ValueError:
            self.add("request_id", "must be a UUID, e.g. 0b8f6d3e-3a4c-4b8e-9a51-5f2c7d9e1a20")
            return ""
        if str(parsed) != value.lower():
            self.add("request_id", "must be a UUID in its canonical 8-4-4-4-12 form")
            return ""
        return str(parsed)

    def identifier(self, field: str, value: str) -> str:
        if not value:
            self.add(field, "is required")
        elif not ID_PATTERN.match(value):
            self.add(field, "must be 1 to 64 characters of A-Z, a-z, 0-9, '_' or '-'")
        return value

    def points(self, field: str, value: int) -> int:
        if value <= 0:
            self.add(field, "must be greater than 0")
        elif value > MAX_POINTS:
            self.add(field, f"must be at most {MAX_POINTS}")
        return value

    def transaction(self, field: str, value: str) -> tuple[str, int]:
        parsed = parse_transaction_id(value)
        if parsed is None:
            self.add(field, "is required" if not value else "is not a pointauth transaction id")
            return "", 0
        return parsed

    def timestamp(self, field: str, value: Timestamp) -> int:
        if not 0 <= value.seconds <= MAX_TIMESTAMP_SECONDS or not 0 <= value.nanos < 1_000_000_000:
            self.add(field, "is not a valid timestamp")
            return 0
        return value.seconds * 1000 + value.nanos // 1_000_000

    def duration_ms(self, field: str, value: Duration, low_s: int, high_s: int) -> int:
        total_ms = value.seconds * 1000 + value.nanos // 1_000_000
        if not low_s * 1000 <= total_ms <= high_s * 1000 or value.nanos < 0:
            self.add(field, f"must be between {low_s} s and {high_s} s")
        return total_ms

    def lot_kind(self, field: str, value: int) -> str:
        if value == common_pb2.LOT_KIND_REGULAR:
            return "R"
        if value == common_pb2.LOT_KIND_LIMITED_TIME:
            return "L"
        self.add(field, "must be LOT_KIND_REGULAR or LOT_KIND_LIMITED_TIME")
        return ""

    def point_of_sale(self, pos: common_pb2.PointOfSale | None, required: bool = True) -> PointOfSaleRef | None:
        """`pos` is None when the request has no point_of_sale."""
        if pos is None:
            if required:
                self.add("point_of_sale", "is required")
            return None
        if pos.channel == common_pb2.CHANNEL_UNSPECIFIED or pos.channel not in common_pb2.Channel.values():
            self.add(
                "point_of_sale.channel",
                "must be one of the Channel values other than CHANNEL_UNSPECIFIED",
            )
        return PointOfSaleRef(
            company_id=self.identifier("point_of_sale.company_id", pos.company_id),
            store_id=self.identifier("point_of_sale.store_id", pos.store_id),
            terminal_id=self.identifier("point_of_sale.terminal_id", pos.terminal_id),
            channel=pos.channel,
        )
