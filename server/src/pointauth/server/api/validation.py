"""Request validation: every problem of a request is collected and named by its field path, so
a POS developer fixes them all at once. Nothing reaches the ledger before this passes."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from pointauth.server.api.errors import ApiError
from pointauth.server.domain import ids
from pointauth.server.domain.earning import BasketLine
from pointauth.server.domain.reasons import ErrorReason
from pointauth.server.ledger import LotKindCode, PointOfSaleRef
from pointauth.v1 import common_pb2, points_service_pb2

# Lua numbers are doubles: amounts and balances stay far below 2^53 so every point is exact.
MAX_POINTS = 10**15
MAX_AMOUNT = 10**15
# Timestamps a till can mean: from 1970 to the end of the year 9999 (google.protobuf.Timestamp's
# own upper bound); each field may narrow this (a purchase can't lie in the future).
MAX_TIMESTAMP_SECONDS = 253_402_300_799
MAX_BASKET_LINES = 500
MAX_LABEL = 64
MAX_REPORTED_VIOLATIONS = 20
"""Field violations an INVALID_ARGUMENT names at most (metadata `violations` counts them all)."""
CHANNELS = frozenset(common_pb2.Channel.values()) - {common_pb2.CHANNEL_UNSPECIFIED}
"""The channels a point of sale or a campaign may name (built once: every till call checks one)."""


class Violations:
    """Collects field violations; `raise_if_any` turns them into one INVALID_ARGUMENT."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, field: str, description: str) -> None:
        self.items.append((field, description))

    def raise_if_any(self) -> None:
        if self.items:
            # The answer travels in trailers, which clients cap (16 KiB by default in gRPC): a
            # request with hundreds of bad fields is told the first ones and how many more.
            shown, omitted = self.items[:MAX_REPORTED_VIOLATIONS], len(self.items) - MAX_REPORTED_VIOLATIONS
            fields = ", ".join(field for field, _ in shown) + (f" and {omitted} more" if omitted > 0 else "")
            raise ApiError(
                grpc.StatusCode.INVALID_ARGUMENT,
                ErrorReason.INVALID_ARGUMENT,
                f"invalid request: {fields}",
                {"violations": str(len(self.items))} if omitted > 0 else None,
                violations=shown,
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
        elif not ids.is_id(value):
            self.add(field, f"must be {ids.ID_RULE}")
        return value

    def card_number(self, field: str, value: str) -> str:
        if not value:
            self.add(field, "is required")
        elif not ids.is_card_number(value):
            self.add(field, f"must be {ids.CARD_RULE}")
        return value

    def points(self, field: str, value: int) -> int:
        if value <= 0:
            self.add(field, "must be greater than 0")
        elif value > MAX_POINTS:
            self.add(field, f"must be at most {MAX_POINTS}")
        return value

    def transaction(self, field: str, value: str) -> tuple[str, int]:
        parsed = ids.parse_transaction_id(value)
        if parsed is None:
            self.add(field, "is required" if not value else "is not a pointauth transaction id")
            return "", 0
        return parsed

    def timestamp(self, field: str, value: Timestamp, *, not_after_ms: int | None = None) -> int:
        """Milliseconds since the epoch; a Timestamp outside 1970..9999 (or after `not_after_ms`)
        or with nanos outside 0..999,999,999 is a violation."""
        if not 0 <= value.seconds <= MAX_TIMESTAMP_SECONDS or not 0 <= value.nanos < 1_000_000_000:
            self.add(field, "must be a valid timestamp between 1970-01-01 and 9999-12-31")
            return 0
        ms = value.seconds * 1000 + value.nanos // 1_000_000
        if not_after_ms is not None and ms > not_after_ms:
            self.add(field, "must not lie in the future")
            return 0
        return ms

    def duration_ms(self, field: str, value: Duration, low_s: int, high_s: int) -> int:
        # A valid Duration has nanos within ±999,999,999 of the sign of seconds; only positive
        # spans make sense here.
        total_ms = value.seconds * 1000 + value.nanos // 1_000_000
        valid = value.seconds >= 0 and 0 <= value.nanos < 1_000_000_000
        if not valid or not low_s * 1000 <= total_ms <= high_s * 1000:
            self.add(field, f"must be a duration between {low_s} s and {high_s} s")
            return 0
        return total_ms

    def lot_kind(self, field: str, value: int) -> LotKindCode:
        if value == common_pb2.LOT_KIND_REGULAR:
            return "R"
        if value == common_pb2.LOT_KIND_LIMITED_TIME:
            return "L"
        self.add(field, "must be LOT_KIND_REGULAR or LOT_KIND_LIMITED_TIME")
        return "R"

    def point_of_sale(self, pos: common_pb2.PointOfSale | None, required: bool = True) -> PointOfSaleRef | None:
        """`pos` is None when the request has no point_of_sale."""
        if pos is None:
            if required:
                self.add("point_of_sale", "is required")
            return None
        if pos.channel not in CHANNELS:
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

    def basket(self, lines: Sequence[points_service_pb2.BasketLine], purchase_amount: int) -> tuple[BasketLine, ...]:
        """The basket's lines; their amounts must add up to the purchase amount."""
        if len(lines) > MAX_BASKET_LINES:
            self.add("basket", f"at most {MAX_BASKET_LINES} lines")
            return ()
        out = []
        for i, line in enumerate(lines):
            if len(line.sku) > MAX_LABEL or len(line.category) > MAX_LABEL:
                self.add(f"basket[{i}]", f"sku and category are at most {MAX_LABEL} characters")
            if line.quantity < 1:
                self.add(f"basket[{i}].quantity", "must be at least 1")
            if not 0 <= line.amount <= MAX_AMOUNT:
                self.add(f"basket[{i}].amount", f"must be between 0 and {MAX_AMOUNT}")
            out.append(BasketLine(line.sku, line.category, line.quantity, line.amount, earns=not line.non_earning))
        if out and sum(line.amount for line in out) != purchase_amount:
            self.add("purchase_amount", "must be the sum of the basket's line amounts")
        return tuple(out)
