"""The group directory as one server process sees it, and its use cases (register, list).

The process keeps the whole directory in memory, so that checking a till's point of sale costs
no Redis round trip. It loads it at start, asks Redis for its version every
`group.refresh_seconds` and reloads when it moved, and takes in its own changes at once. Another
process's change is seen here within `refresh_seconds`; lists ask for the version first, so they
show every change already made anywhere.
"""

from __future__ import annotations

import asyncio
from typing import TypeVar

from pointauth.server.config import GroupSettings
from pointauth.server.domain.group import (
    Company,
    Directory,
    Refusal,
    Store,
    Terminal,
    check_company_known,
    check_point_of_sale,
    check_store_known,
)
from pointauth.server.ledger import PointOfSaleRef
from pointauth.server.ledger.directory import DirectoryStore
from pointauth.server.services.following import Follower
from pointauth.server.services.refusals import group_refusal

E = TypeVar("E", bound=Company | Store | Terminal)


class DirectoryService:
    def __init__(self, store: DirectoryStore, settings: GroupSettings) -> None:
        self.store = store
        self.settings = settings
        self.current = Directory()
        self._lock = asyncio.Lock()
        self._follower = Follower("group directory", settings.refresh_seconds, self._refreshed_version)

    async def start(self) -> None:
        """Loads the directory (before the server serves) and starts following its changes."""
        await self.reload()
        self._follower.start()

    async def stop(self) -> None:
        await self._follower.stop()

    async def reload(self) -> Directory:
        async with self._lock:
            self.current = await self.store.load()
            return self.current

    async def refresh(self) -> Directory:
        """The current directory, reloaded first if its version moved (one GET when it has not)."""
        if await self.store.version() != self.current.version:
            return await self.reload()
        return self.current

    async def _refreshed_version(self) -> int:
        return (await self.refresh()).version

    # -- the tills' check ---------------------------------------------------------------------

    def check(self, pos: PointOfSaleRef) -> None:
        """Raises the refusal of a point of sale the directory lacks (when checks are on)."""
        if not self.settings.check_points_of_sale:
            return
        refusal = check_point_of_sale(self.current, pos.company_id, pos.store_id, pos.terminal_id)
        if refusal is not None:
            raise group_refusal(refusal)

    def check_company(self, company_id: str, field_name: str) -> None:
        """Raises COMPANY_NOT_FOUND for a company the directory lacks (a member's home company;
        when checks are on)."""
        if self.settings.check_points_of_sale:
            _raise(check_company_known(self.current, company_id, field_name))

    # -- registering and listing --------------------------------------------------------------

    async def register(self, entry: E) -> E:
        """Creates or updates `entry`; this process sees the change at once."""
        outcome = await self.store.register(entry)
        if isinstance(outcome, Refusal):
            raise group_refusal(outcome)
        async with self._lock:
            if outcome.version == self.current.version + 1 and outcome.changed:
                self.current = self.current.with_entry(entry, outcome.version)
                return entry
        if outcome.version != self.current.version:
            await self.reload()  # other changes came in between: read them all
        return entry

    async def list_companies(self) -> list[Company]:
        return (await self.refresh()).list_companies()

    async def list_stores(self, company_id: str, after: str, limit: int) -> tuple[list[Store], bool]:
        """Stores by id after `after`, of `company_id` ("": of every company), and whether more follow."""
        directory = await self.refresh()
        if company_id:
            _raise(check_company_known(directory, company_id, "company_id"))
        return directory.list_stores(company_id, after, limit)

    async def list_terminals(self, store_id: str) -> list[Terminal]:
        directory = await self.refresh()
        _raise(check_store_known(directory, store_id, "store_id"))
        return directory.list_terminals(store_id)


def _raise(refusal: Refusal | None) -> None:
    if refusal is not None:
        raise group_refusal(refusal)
