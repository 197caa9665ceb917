"""Operator use cases: opening accounts and granting points outside a purchase."""

from __future__ import annotations

from pointauth.server.ledger import CardKindCode, Ledger, LotKindCode, OpResult, PointOfSaleRef, ProfileChange
from pointauth.server.services.members import check_home_company
from pointauth.server.services.points import Outcome, PointsService


class AccountsService:
    def __init__(self, ledger: Ledger, points: PointsService) -> None:
        self.ledger = ledger
        self.points = points

    async def open(
        self,
        account_id: str,
        card_number: str,
        *,
        request_id: str,
        fingerprint: str,
        kind: CardKindCode = "P",
        profile: ProfileChange | None = None,
    ) -> OpResult:
        if profile is not None:
            check_home_company(self.points.directory, profile)
        return await self.ledger.create_account(
            account_id, card_number, request_id, fingerprint, kind=kind, profile=profile
        )

    async def grant(
        self,
        card_number: str,
        *,
        points: int,
        expire_ms: int,
        kind: LotKindCode,
        pos: PointOfSaleRef,
        request_id: str,
        fingerprint: str,
    ) -> Outcome:
        self.points.check_point_of_sale(pos)
        account, result = await self.ledger.on_card(
            card_number,
            lambda account: self.ledger.earn(
                account,
                points=points,
                expire_ms=expire_ms,
                kind=kind,
                pos=pos,
                request_id=request_id,
                fingerprint=fingerprint,
                grant=True,
                card=card_number,
            ),
        )
        return Outcome(account, result)
