"""The till's use cases: earn, hold, capture, void, redeem, refund, balance and receipt."""

from __future__ import annotations

from typing import NamedTuple

from pointauth.server.clock import Clock
from pointauth.server.domain.reasons import ErrorReason
from pointauth.server.ledger import Ledger, LedgerRefusal, LotEntry, OpResult, PointOfSaleRef, TransactionRecord
from pointauth.server.rules.earn_policy import EarnPolicy
from pointauth.server.services.directory import DirectoryService
from pointauth.server.services.refusals import not_found, renamed_not_found


class Outcome(NamedTuple):
    """What the ledger answered, and for which account (a card names it only indirectly)."""

    account_id: str
    result: OpResult


class PointsService:
    def __init__(
        self, ledger: Ledger, policy: EarnPolicy, clock: Clock, directory: DirectoryService | None = None
    ) -> None:
        self.ledger = ledger
        self.policy = policy
        self.clock = clock
        self.directory = directory
        """The group directory every point of sale is checked against; None: no check."""

    def check_point_of_sale(self, pos: PointOfSaleRef) -> None:
        """Refuses a point of sale the group directory lacks, before anything reaches the ledger
        (so nothing is written, not even an idempotency record: a retry after the store is
        registered goes through). From this process's copy: no round trip."""
        if self.directory is not None:
            self.directory.check(pos)

    # A call made for a card goes through Ledger.on_card: one round trip when the process
    # knows the card's account, and refused, never misapplied, if that link has gone stale.

    async def earn(
        self,
        card_number: str,
        *,
        purchase_amount: int,
        purchase_ms: int,
        pos: PointOfSaleRef,
        request_id: str,
        fingerprint: str,
    ) -> Outcome:
        self.check_point_of_sale(pos)
        points = self.policy.points_for(purchase_amount)
        account, result = await self.ledger.on_card(
            card_number,
            lambda account: self.ledger.earn(
                account,
                points=points,
                expire_ms=self.policy.expire_ms(purchase_ms),
                kind="R",
                pos=pos,
                request_id=request_id,
                fingerprint=fingerprint,
                purchase_amount=purchase_amount,
                purchase_ms=purchase_ms,
                card=card_number,
            ),
        )
        return Outcome(account, result)

    async def authorize(
        self, card_number: str, *, points: int, ttl_ms: int, pos: PointOfSaleRef, request_id: str, fingerprint: str
    ) -> Outcome:
        self.check_point_of_sale(pos)
        account, result = await self.ledger.on_card(
            card_number,
            lambda account: self.ledger.authorize(
                account,
                points=points,
                ttl_ms=ttl_ms,
                pos=pos,
                request_id=request_id,
                fingerprint=fingerprint,
                card=card_number,
            ),
        )
        return Outcome(account, result)

    # Capture and void act at the hold's own point of sale, checked when it was authorized.

    async def capture(
        self, account_id: str, hold_seq: int, *, points: int | None, request_id: str, fingerprint: str
    ) -> OpResult:
        try:
            return await self.ledger.capture(
                account_id, hold_seq, points=points, request_id=request_id, fingerprint=fingerprint
            )
        except LedgerRefusal as refusal:
            raise _unknown_hold(refusal, account_id, hold_seq) from None

    async def void(self, account_id: str, hold_seq: int, *, request_id: str, fingerprint: str) -> OpResult:
        try:
            return await self.ledger.void(account_id, hold_seq, request_id=request_id, fingerprint=fingerprint)
        except LedgerRefusal as refusal:
            raise _unknown_hold(refusal, account_id, hold_seq) from None

    async def redeem(
        self, card_number: str, *, points: int, pos: PointOfSaleRef, request_id: str, fingerprint: str
    ) -> Outcome:
        self.check_point_of_sale(pos)
        account, result = await self.ledger.on_card(
            card_number,
            lambda account: self.ledger.redeem(
                account, points=points, pos=pos, request_id=request_id, fingerprint=fingerprint, card=card_number
            ),
        )
        return Outcome(account, result)

    async def refund(
        self,
        account_id: str,
        original_seq: int,
        *,
        points: int | None,
        pos: PointOfSaleRef | None,
        request_id: str,
        fingerprint: str,
    ) -> Outcome:
        """Lands on the account the transaction's account was merged into, if it was."""
        if pos is not None:
            self.check_point_of_sale(pos)
        try:
            account, result = await self.ledger.refund_following(
                account_id, original_seq, points=points, pos=pos, request_id=request_id, fingerprint=fingerprint
            )
            return Outcome(account, result)
        except LedgerRefusal as refusal:
            message = f"no refundable transaction {account_id}.{original_seq}"
            raise renamed_not_found(refusal, ErrorReason.TRANSACTION_NOT_FOUND, message) from None

    async def balance(self, card_number: str, *, limit: int = 20, after: LotEntry | None = None) -> tuple[Outcome, int]:
        """The balance, a page of lots (at most `limit`, after `after`), and the instant it was read at."""
        read_ms = self.clock.now_ms()
        account, result = await self.ledger.on_card(
            card_number, lambda account: self.ledger.balance(account, card=card_number, limit=limit, after=after)
        )
        return Outcome(account, result), read_ms

    async def receipt(self, account_id: str, seq: int) -> TransactionRecord:
        record = await self.ledger.transaction(account_id, seq)
        if record is None:
            raise not_found(ErrorReason.TRANSACTION_NOT_FOUND, f"no transaction {account_id}.{seq}")
        return record

    def hold_state(self, record: TransactionRecord) -> str:
        """A hold past its TTL is expired even if no sweeper has written it down yet."""
        return "EXPIRED" if record.state == "HELD" and record.exp <= self.clock.now_ms() else record.state


def _unknown_hold(refusal: LedgerRefusal, account_id: str, hold_seq: int) -> LedgerRefusal:
    return renamed_not_found(refusal, ErrorReason.HOLD_NOT_FOUND, f"no hold {account_id}.{hold_seq}")
