"""Member use cases: the account's profile and status, and its cards. Card answers come from
the ledger call itself (a retry gets the first answer); an account is read after a change."""

from __future__ import annotations

from typing import Literal

from pointauth.server.ledger import AccountView, CardKindCode, Ledger, OpResult, ProfileChange
from pointauth.server.ledger.codec import CardLink, decode_card_link
from pointauth.server.services.directory import DirectoryService


class MembersService:
    def __init__(self, ledger: Ledger, directory: DirectoryService | None = None) -> None:
        self.ledger = ledger
        self.directory = directory
        """Home companies are checked against it; None: no check."""

    def check_profile(self, change: ProfileChange) -> None:
        check_home_company(self.directory, change)

    async def account(self, *, account_id: str | None = None, card_number: str | None = None) -> AccountView:
        if card_number is not None:
            return await self.ledger.account_by_card(card_number)
        assert account_id is not None
        return await self.ledger.account(account_id)

    async def update_profile(
        self, account_id: str, change: ProfileChange, *, request_id: str, fingerprint: str
    ) -> AccountView:
        self.check_profile(change)
        return await self.ledger.update_profile(account_id, change, request_id=request_id, fingerprint=fingerprint)

    async def close(self, account_id: str, *, request_id: str, fingerprint: str) -> OpResult:
        return await self.ledger.close(account_id, request_id=request_id, fingerprint=fingerprint)

    async def link_card(
        self, account_id: str, card_number: str, kind: CardKindCode, *, request_id: str, fingerprint: str
    ) -> CardLink:
        result = await self.ledger.link_card(
            account_id, card_number, kind, request_id=request_id, fingerprint=fingerprint
        )
        return decode_card_link(result.card.encode())

    async def unlink_card(self, account_id: str, card_number: str, *, request_id: str, fingerprint: str) -> None:
        await self.ledger.unlink_card(account_id, card_number, request_id=request_id, fingerprint=fingerprint)

    async def set_card_state(
        self, card_number: str, state: Literal["A", "B"], *, request_id: str, fingerprint: str
    ) -> tuple[str, CardLink]:
        """(the card's account, the card as it is now)."""
        account, result = await self.ledger.set_card_state(
            card_number, state, request_id=request_id, fingerprint=fingerprint
        )
        return account, decode_card_link(result.card.encode())

    async def reissue_card(
        self, card_number: str, new_card: str, kind: CardKindCode, *, request_id: str, fingerprint: str
    ) -> tuple[str, CardLink, CardLink]:
        """(the account, the replaced card, the new card)."""
        account, result = await self.ledger.reissue_card(
            card_number, new_card, kind, request_id=request_id, fingerprint=fingerprint
        )
        return account, decode_card_link(result.card.encode()), decode_card_link(result.new_card.encode())

    async def merge(
        self, source: str, target: str, *, request_id: str, fingerprint: str, actor: str, why: str
    ) -> OpResult:
        return await self.ledger.merge(
            source, target, request_id=request_id, fingerprint=fingerprint, actor=actor, why=why
        )


def check_home_company(directory: DirectoryService | None, change: ProfileChange) -> None:
    """A member's home company must be in the group directory (when it checks)."""
    if change.hc and directory is not None:
        directory.check_company(change.hc, "profile.home_company_id")
