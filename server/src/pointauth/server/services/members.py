"""Member use cases: the account's profile and status, and its cards. Card answers come from
the ledger call itself (a retry gets the first answer); an account is read after a change."""

from __future__ import annotations

from typing import Literal

from pointauth.server.ledger import AccountView, CardKindCode, Ledger, OpResult, ProfileChange
from pointauth.server.services.directory import DirectoryService


class MembersService:
    def __init__(self, ledger: Ledger, directory: DirectoryService | None = None) -> None:
        self.ledger = ledger
        self.directory = directory
        """Home companies are checked against it; None: no check."""

    def check_profile(self, change: ProfileChange, field: str = "profile.home_company_id") -> None:
        if change.hc and self.directory is not None:
            self.directory.check_company(change.hc, field)

    async def account(self, *, account_id: str | None = None, card_number: str | None = None) -> AccountView:
        if card_number is not None:
            return await self.ledger.account_by_card(card_number)
        assert account_id is not None
        return await self.ledger.account(account_id)

    async def update_profile(
        self, account_id: str, change: ProfileChange, *, request_id: str, fingerprint: str
    ) -> AccountView:
        self.check_profile(change)
        await self.ledger.update_profile(account_id, change, request_id=request_id, fingerprint=fingerprint)
        return await self.ledger.account(account_id)

    async def close(self, account_id: str, *, request_id: str, fingerprint: str) -> OpResult:
        return await self.ledger.close(account_id, request_id=request_id, fingerprint=fingerprint)

    async def link_card(
        self, account_id: str, card_number: str, kind: CardKindCode, *, request_id: str, fingerprint: str
    ) -> OpResult:
        return await self.ledger.link_card(
            account_id, card_number, kind, request_id=request_id, fingerprint=fingerprint
        )

    async def unlink_card(self, account_id: str, card_number: str, *, request_id: str, fingerprint: str) -> None:
        await self.ledger.unlink_card(account_id, card_number, request_id=request_id, fingerprint=fingerprint)

    async def set_card_state(
        self, card_number: str, state: Literal["A", "B"], *, request_id: str, fingerprint: str
    ) -> tuple[str, OpResult]:
        return await self.ledger.set_card_state(card_number, state, request_id=request_id, fingerprint=fingerprint)

    async def reissue_card(
        self, card_number: str, new_card: str, kind: CardKindCode, *, request_id: str, fingerprint: str
    ) -> tuple[str, OpResult]:
        return await self.ledger.reissue_card(
            card_number, new_card, kind, request_id=request_id, fingerprint=fingerprint
        )

    async def merge(
        self, source: str, target: str, *, request_id: str, fingerprint: str, actor: str, why: str
    ) -> OpResult:
        return await self.ledger.merge(
            source, target, request_id=request_id, fingerprint=fingerprint, actor=actor, why=why
        )
