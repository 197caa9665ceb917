"""Ledger records to pointauth.v1 messages, and what every servicer shares."""

from __future__ import annotations

import base64
import binascii
import hashlib

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from pointauth.server.ledger import LotEntry, OpResult, PointOfSaleRef
from pointauth.server.ledger.codec import CouponEntry, EarnLineEntry
from pointauth.server.rules.receipt import ReceiptLine
from pointauth.v1 import common_pb2, points_service_pb2

_KINDS = {"R": common_pb2.LOT_KIND_REGULAR, "L": common_pb2.LOT_KIND_LIMITED_TIME}


def timestamp(ms: int) -> Timestamp:
    return Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def lot(entry: LotEntry) -> common_pb2.Lot:
    return common_pb2.Lot(
        lot_id=str(entry.lot_id),
        points=entry.points,
        expire_time=timestamp(entry.expire_ms),
        kind=_KINDS[entry.kind],
        issuer_id=entry.issuer_id,
    )


def lot_effects(entries: list[LotEntry]) -> list[common_pb2.LotEffect]:
    return [
        common_pb2.LotEffect(
            lot_id=str(e.lot_id),
            delta_points=e.points,
            expire_time=timestamp(e.expire_ms),
            kind=_KINDS[e.kind],
            issuer_id=e.issuer_id,
        )
        for e in entries
    ]


def balance(result: OpResult) -> common_pb2.BalanceSummary:
    return common_pb2.BalanceSummary(available_points=result.available, held_points=result.held)


def point_of_sale(ref: PointOfSaleRef | None) -> common_pb2.PointOfSale | None:
    if ref is None:
        return None
    return common_pb2.PointOfSale(
        company_id=ref.company_id,
        store_id=ref.store_id,
        terminal_id=ref.terminal_id,
        channel=common_pb2.Channel.ValueType(ref.channel),
    )


def fingerprint(method: str, request: Message) -> str:
    """What makes two requests with one request_id "the same": everything but the id.

    Clears request_id on the request itself (the handler has read it already): no copy."""
    request.ClearField("request_id")
    digest = hashlib.blake2b(method.encode(), digest_size=16)
    digest.update(request.SerializeToString(deterministic=True))
    return digest.hexdigest()


# A GetBalance page token names the page's last lot (its expiry, kind and id): the next page
# starts after it in spending order. Opaque to clients; urlsafe base64 of "<ms>:<kind>:<id>".


def lot_page_token(entry: LotEntry) -> str:
    return base64.urlsafe_b64encode(f"{entry.expire_ms}:{entry.kind}:{entry.lot_id}".encode()).decode()


def parse_lot_page_token(token: str) -> LotEntry | None:
    """The lot a page token names (points and issuer unknown: 0 and ""), None if not a token."""
    try:
        expire_ms, kind, lot_id = base64.urlsafe_b64decode(token.encode()).decode().split(":")
        values = int(expire_ms), int(lot_id)
        if not all(0 <= value < 2**53 for value in values):  # what a Lua number holds exactly
            return None
        if kind == "R":
            return LotEntry(values[1], 0, values[0], "R", "")
        if kind == "L":
            return LotEntry(values[1], 0, values[0], "L", "")
        return None
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None


def breakdown(lines: list[EarnLineEntry], lots: list[LotEntry]) -> list[points_service_pb2.RulePoints]:
    """What each rule gave, with the lot its points went to (the earn's lot effects name it)."""
    by_id = {lot.lot_id: lot for lot in lots}
    out = []
    for line in lines:
        message = points_service_pb2.RulePoints(rule_id=line.rule, points=line.points, note=line.note)
        lot = by_id.get(line.lot_id)
        if lot is not None:
            message.lot_id = str(lot.lot_id)
            message.kind = _KINDS[lot.kind]
            message.expire_time.CopyFrom(timestamp(lot.expire_ms))
        out.append(message)
    return out


_LINE_KINDS = {
    "earned": points_service_pb2.RECEIPT_LINE_KIND_EARNED,
    "balance": points_service_pb2.RECEIPT_LINE_KIND_BALANCE,
    "expiring": points_service_pb2.RECEIPT_LINE_KIND_EXPIRING,
    "rank": points_service_pb2.RECEIPT_LINE_KIND_RANK,
    "birthday": points_service_pb2.RECEIPT_LINE_KIND_BIRTHDAY,
    "coupon": points_service_pb2.RECEIPT_LINE_KIND_COUPON,
}


def receipt_lines(lines: list[ReceiptLine]) -> list[points_service_pb2.ReceiptLine]:
    return [points_service_pb2.ReceiptLine(kind=_LINE_KINDS[line.kind], text=line.text) for line in lines]


def coupon(entry: CouponEntry) -> points_service_pb2.Coupon:
    message = points_service_pb2.Coupon(
        coupon_id=entry.coupon_id,
        campaign_id=entry.campaign_id,
        issue_time=timestamp(entry.issued_ms),
        expire_time=timestamp(entry.expire_ms),
    )
    if entry.used_ms:
        message.use_time.CopyFrom(timestamp(entry.used_ms))
    return message
