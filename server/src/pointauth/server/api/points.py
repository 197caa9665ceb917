"""PointsService: earn, hold, capture, void, redeem, refund, balance and receipt."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from pointauth.server.api import convert
from pointauth.server.api.access import caller_company
from pointauth.server.api.convert import fingerprint
from pointauth.server.api.validation import MAX_AMOUNT, Violations
from pointauth.server.config import LedgerSettings
from pointauth.server.domain.ids import transaction_id
from pointauth.server.ledger import TransactionRecord
from pointauth.server.services.points import PointsService
from pointauth.v1 import common_pb2, points_service_pb2_grpc
from pointauth.v1 import points_service_pb2 as pb

Context = grpc.aio.ServicerContext[Any, Any]

# Lots per GetBalance page: a till shows the soonest-expiring few; the cost of a page does not
# grow with the account.
DEFAULT_LOT_PAGE = 20
MAX_LOT_PAGE = 500

_TRANSACTION_TYPES = {
    "EARN": pb.TRANSACTION_TYPE_EARN,
    "GRANT": pb.TRANSACTION_TYPE_GRANT,
    "HOLD": pb.TRANSACTION_TYPE_HOLD,
    "CAPTURE": pb.TRANSACTION_TYPE_CAPTURE,
    "REDEMPTION": pb.TRANSACTION_TYPE_REDEMPTION,
    "REFUND": pb.TRANSACTION_TYPE_REFUND,
    "VISIT": pb.TRANSACTION_TYPE_VISIT,
}
_HOLD_STATES = {
    "HELD": pb.HOLD_STATE_HELD,
    "CAPTURED": pb.HOLD_STATE_CAPTURED,
    "VOIDED": pb.HOLD_STATE_VOIDED,
    "EXPIRED": pb.HOLD_STATE_EXPIRED,
}


class PointsServicer(points_service_pb2_grpc.PointsServiceServicer):
    """Validates each request, hands it to the use case, and shapes the answer."""

    def __init__(self, points: PointsService, settings: LedgerSettings) -> None:
        self.points = points
        self.settings = settings

    async def EarnPoints(self, request: pb.EarnPointsRequest, context: Context) -> pb.EarnPointsResponse:
        v = Violations()
        request_id = v.request_id(request.request_id)
        card = v.card_number("card_number", request.card_number)
        pos = v.point_of_sale(request.point_of_sale if request.HasField("point_of_sale") else None)
        if request.purchase_amount < 0 or request.purchase_amount > MAX_AMOUNT:
            v.add("purchase_amount", f"must be between 0 and {MAX_AMOUNT}")
        purchase_ms = self._purchase_ms(v, request.purchase_time if request.HasField("purchase_time") else None)
        basket = v.basket(request.basket, request.purchase_amount)
        v.raise_if_any()
        assert pos is not None
        earned = await self.points.earn(
            card,
            purchase_amount=request.purchase_amount,
            purchase_ms=purchase_ms,
            pos=pos,
            request_id=request_id,
            fingerprint=fingerprint("EarnPoints", request),
            basket=basket,
        )
        result = earned.result
        return pb.EarnPointsResponse(
            transaction_id=transaction_id(earned.account_id, result.tx),
            earned_points=result.pts,
            lot=convert.lot(result.lots[0]) if result.lots else None,
            balance=convert.balance(result),
            breakdown=convert.breakdown(result.lines, result.lots),
            rule_set_version=result.rules,
            rank_id=result.rank,
            rank_upgraded=result.up,
            coupons=[convert.coupon(c) for c in result.coupons],
            receipt_lines=convert.receipt_lines(await self.points.receipt_lines(result, earned=True)),
        )

    async def CheckIn(self, request: pb.CheckInRequest, context: Context) -> pb.CheckInResponse:
        v = Violations()
        request_id = v.request_id(request.request_id)
        card = v.card_number("card_number", request.card_number)
        pos = v.point_of_sale(request.point_of_sale if request.HasField("point_of_sale") else None)
        visit_ms = self._purchase_ms(v, request.visit_time if request.HasField("visit_time") else None, "visit_time")
        v.raise_if_any()
        assert pos is not None
        earned = await self.points.check_in(
            card, visit_ms=visit_ms, pos=pos, request_id=request_id, fingerprint=fingerprint("CheckIn", request)
        )
        result = earned.result
        return pb.CheckInResponse(
            transaction_id=transaction_id(earned.account_id, result.tx),
            earned_points=result.pts,
            breakdown=convert.breakdown(result.lines, result.lots),
            balance=convert.balance(result),
            rule_set_version=result.rules,
        )

    async def UseCoupon(self, request: pb.UseCouponRequest, context: Context) -> pb.UseCouponResponse:
        v = Violations()
        request_id = v.request_id(request.request_id)
        card = v.card_number("card_number", request.card_number)
        if not 1 <= len(request.coupon_id) <= 100:
            v.add("coupon_id", "is required: a coupon id of the member's (at most 100 characters)")
        pos = v.point_of_sale(request.point_of_sale if request.HasField("point_of_sale") else None)
        v.raise_if_any()
        assert pos is not None
        _, used = await self.points.use_coupon(
            card, request.coupon_id, pos=pos, request_id=request_id, fingerprint=fingerprint("UseCoupon", request)
        )
        return pb.UseCouponResponse(coupon=convert.coupon(used))

    async def SimulateEarn(self, request: pb.SimulateEarnRequest, context: Context) -> pb.SimulateEarnResponse:
        v = Violations()
        card = v.card_number("card_number", request.card_number) if request.card_number else None
        pos = v.point_of_sale(request.point_of_sale if request.HasField("point_of_sale") else None)
        if request.purchase_amount < 0 or request.purchase_amount > MAX_AMOUNT:
            v.add("purchase_amount", f"must be between 0 and {MAX_AMOUNT}")
        purchase_ms = self.points.clock.now_ms()
        if request.HasField("purchase_time"):
            purchase_ms = v.timestamp("purchase_time", request.purchase_time)
        basket = v.basket(request.basket, request.purchase_amount)
        v.raise_if_any()
        assert pos is not None
        version, lines, coupons = await self.points.simulate(
            card, purchase_amount=request.purchase_amount, purchase_ms=purchase_ms, pos=pos, basket=basket
        )
        return pb.SimulateEarnResponse(
            earned_points=sum(line.points for line in lines),
            breakdown=convert.breakdown(lines, []),
            rule_set_version=version,
            coupon_campaign_ids=coupons,
        )

    async def AuthorizeHold(self, request: pb.AuthorizeHoldRequest, context: Context) -> pb.AuthorizeHoldResponse:
        v = Violations()
        request_id = v.request_id(request.request_id)
        card = v.card_number("card_number", request.card_number)
        pos = v.point_of_sale(request.point_of_sale if request.HasField("point_of_sale") else None)
        points = v.points("points", request.points)
        ttl_ms = self.settings.hold_ttl_seconds * 1000
        if request.HasField("hold_ttl"):
            ttl_ms = v.duration_ms(
                "hold_ttl", request.hold_ttl, self.settings.hold_ttl_min_seconds, self.settings.hold_ttl_max_seconds
            )
        v.raise_if_any()
        assert pos is not None
        account, result = await self.points.authorize(
            card,
            points=points,
            ttl_ms=ttl_ms,
            pos=pos,
            request_id=request_id,
            fingerprint=fingerprint("AuthorizeHold", request),
        )
        return pb.AuthorizeHoldResponse(
            hold_id=transaction_id(account, result.tx),
            held_points=result.pts,
            expire_time=convert.timestamp(result.exp),
            balance=convert.balance(result),
        )

    async def CaptureHold(self, request: pb.CaptureHoldRequest, context: Context) -> pb.CaptureHoldResponse:
        v = Violations()
        request_id = v.request_id(request.request_id)
        account, hold = v.transaction("hold_id", request.hold_id)
        points = v.points("points", request.points) if request.HasField("points") else None
        sale = None
        if request.HasField("purchase_amount"):
            if not 0 <= request.purchase_amount <= MAX_AMOUNT:
                v.add("purchase_amount", f"must be between 0 and {MAX_AMOUNT}")
            purchase_ms = self._purchase_ms(v, request.purchase_time if request.HasField("purchase_time") else None)
            sale = (request.purchase_amount, v.basket(request.basket, request.purchase_amount), purchase_ms)
        elif request.basket or request.HasField("purchase_time"):
            v.add("purchase_amount", "is required with purchase_time or basket")
        v.raise_if_any()
        result = await self.points.capture(
            account,
            hold,
            points=points,
            request_id=request_id,
            fingerprint=fingerprint("CaptureHold", request),
            company=caller_company(),
            sale=sale,
        )
        return pb.CaptureHoldResponse(
            transaction_id=transaction_id(account, result.tx),
            captured_points=result.pts,
            released_points=result.released,
            balance=convert.balance(result),
            receipt_lines=convert.receipt_lines(await self.points.receipt_lines(result, earned=bool(result.etx))),
            earn_transaction_id=transaction_id(account, result.etx) if result.etx else "",
            earned_points=result.epts,
            breakdown=convert.breakdown(result.lines, result.lots),
            rule_set_version=result.rules,
            coupons=[convert.coupon(c) for c in result.coupons],
        )

    def _purchase_ms(self, v: Violations, value: Timestamp | None, field: str = "purchase_time") -> int:
        """A purchase's (or visit's) time: required, and no later than the clock plus the skew."""
        if value is None:
            v.add(field, "is required")
            return 0
        return v.timestamp(
            field, value, not_after_ms=self.points.clock.now_ms() + self.points.policy.purchase_time_skew_ms
        )

    async def VoidHold(self, request: pb.VoidHoldRequest, context: Context) -> pb.VoidHoldResponse:
        v = Violations()
        request_id = v.request_id(request.request_id)
        account, hold = v.transaction("hold_id", request.hold_id)
        v.raise_if_any()
        result = await self.points.void(
            account,
            hold,
            request_id=request_id,
            fingerprint=fingerprint("VoidHold", request),
            company=caller_company(),
        )
        return pb.VoidHoldResponse(released_points=result.released, balance=convert.balance(result))

    async def RedeemPoints(self, request: pb.RedeemPointsRequest, context: Context) -> pb.RedeemPointsResponse:
        v = Violations()
        request_id = v.request_id(request.request_id)
        card = v.card_number("card_number", request.card_number)
        pos = v.point_of_sale(request.point_of_sale if request.HasField("point_of_sale") else None)
        points = v.points("points", request.points)
        v.raise_if_any()
        assert pos is not None
        account, result = await self.points.redeem(
            card, points=points, pos=pos, request_id=request_id, fingerprint=fingerprint("RedeemPoints", request)
        )
        return pb.RedeemPointsResponse(
            transaction_id=transaction_id(account, result.tx),
            redeemed_points=result.pts,
            lot_effects=convert.lot_effects(result.lots),
            balance=convert.balance(result),
        )

    async def RefundTransaction(
        self, request: pb.RefundTransactionRequest, context: Context
    ) -> pb.RefundTransactionResponse:
        v = Violations()
        request_id = v.request_id(request.request_id)
        account, original = v.transaction("transaction_id", request.transaction_id)
        points = v.points("points", request.points) if request.HasField("points") else None
        pos = v.point_of_sale(request.point_of_sale if request.HasField("point_of_sale") else None, required=False)
        v.raise_if_any()
        landed, result = await self.points.refund(
            account,
            original,
            points=points,
            pos=pos,
            request_id=request_id,
            fingerprint=fingerprint("RefundTransaction", request),
            company=caller_company(),
        )
        return pb.RefundTransactionResponse(
            transaction_id=transaction_id(landed, result.tx),
            refunded_points=result.pts,
            lot_effects=convert.lot_effects(result.lots),
            balance=convert.balance(result),
        )

    async def GetBalance(self, request: pb.GetBalanceRequest, context: Context) -> pb.GetBalanceResponse:
        v = Violations()
        card = v.card_number("card_number", request.card_number)
        if not 0 <= request.page_size <= MAX_LOT_PAGE:
            v.add("page_size", f"must be 0 (the default, {DEFAULT_LOT_PAGE}) to {MAX_LOT_PAGE}")
        after = None
        if request.page_token:
            after = convert.parse_lot_page_token(request.page_token)
            if after is None:
                v.add("page_token", "is not a next_page_token of GetBalance")
        v.raise_if_any()
        (account, result), read_ms = await self.points.balance(
            card, limit=request.page_size or DEFAULT_LOT_PAGE, after=after
        )
        return pb.GetBalanceResponse(
            account_id=account,
            balance=convert.balance(result),
            lots=[convert.lot(entry) for entry in result.lots],
            read_time=convert.timestamp(read_ms),
            next_page_token=convert.lot_page_token(result.lots[-1]) if result.more else "",
        )

    async def GetReceipt(self, request: pb.GetReceiptRequest, context: Context) -> pb.GetReceiptResponse:
        v = Violations()
        account, seq = v.transaction("transaction_id", request.transaction_id)
        v.raise_if_any()
        record = await self.points.receipt(account, seq, company=caller_company())
        return pb.GetReceiptResponse(receipt=self._receipt(account, seq, record))

    def _receipt(self, account: str, seq: int, record: TransactionRecord) -> pb.Receipt:
        receipt = pb.Receipt(
            transaction_id=transaction_id(account, seq),
            type=_TRANSACTION_TYPES[record.type],
            create_time=convert.timestamp(record.time),
            point_of_sale=convert.point_of_sale(record.pos),
            lot_effects=convert.lot_effects(record.lots),
            balance_after=common_pb2.BalanceSummary(available_points=record.available, held_points=record.held),
            breakdown=convert.breakdown(record.lines, record.lots),
        )
        if record.type in ("EARN", "GRANT", "VISIT"):
            receipt.earned_points = record.pts
            receipt.refunded_points = record.refunded
        elif record.type == "REFUND":
            receipt.refunded_points = record.pts
        else:
            receipt.used_points = record.pts
            receipt.refunded_points = record.refunded
        if record.ref:
            receipt.related_transaction_id = transaction_id(record.racct or account, record.ref)
        if record.type == "HOLD":
            receipt.hold_state = _HOLD_STATES[self.points.hold_state(record)]
            receipt.hold_expire_time.CopyFrom(convert.timestamp(record.exp))
            if record.capture:
                receipt.related_transaction_id = transaction_id(account, record.capture)
        return receipt
