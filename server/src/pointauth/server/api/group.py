"""GroupService: the group directory of companies, stores and terminals."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import grpc
import msgspec

from pointauth.server.api.validation import Violations
from pointauth.server.domain import ids
from pointauth.server.domain.group import MAX_DISPLAY_NAME, Company, Store, Terminal
from pointauth.server.domain.settlement import DEFAULT_POINT_VALUE, MAX_POINT_VALUE_YEN, PointValue
from pointauth.server.services.directory import DirectoryService
from pointauth.v1 import group_service_pb2 as pb
from pointauth.v1 import group_service_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


class _PageToken(msgspec.Struct, array_like=True, frozen=True):
    """Where a ListStores page ends: the list's company filter and the page's last store id."""

    company_id: str
    after: str


def page_token(company_id: str, after: str) -> str:
    raw = msgspec.msgpack.encode(_PageToken(company_id, after))
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _page_after(v: Violations, token: str, company_id: str) -> str:
    """The store id a page token continues after ("" for no token)."""
    if not token:
        return ""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        parsed = msgspec.msgpack.decode(raw, type=_PageToken)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        v.add("page_token", "is not a next_page_token this service returned")
        return ""
    if parsed.company_id != company_id:
        v.add("page_token", "belongs to a list of another company_id: pass the same company_id as for its page")
        return ""
    if not ids.is_id(parsed.after):
        v.add("page_token", "is not a next_page_token this service returned")
        return ""
    return parsed.after


def _display_name(v: Violations, field: str, value: str) -> str:
    if len(value) > MAX_DISPLAY_NAME:
        v.add(field, f"must be at most {MAX_DISPLAY_NAME} characters")
    return value


def _company(c: Company) -> pb.Company:
    value = pb.PointValue(yen=c.point_value.yen, points=c.point_value.points)
    return pb.Company(company_id=c.company_id, display_name=c.display_name, point_value=value)


def _point_value(v: Violations, c: pb.Company) -> PointValue:
    if not c.HasField("point_value"):
        return DEFAULT_POINT_VALUE
    yen, points = c.point_value.yen, c.point_value.points
    yen_ok, points_ok = 0 <= yen <= MAX_POINT_VALUE_YEN, points in (1, 100)
    if not yen_ok:
        v.add("company.point_value.yen", f"must be 0 to {MAX_POINT_VALUE_YEN:,} yen")
    if not points_ok:
        v.add("company.point_value.points", "must be 1 (yen per point) or 100 (yen per 100 points)")
    return PointValue(yen, points) if yen_ok and points_ok else DEFAULT_POINT_VALUE


def _store(s: Store) -> pb.Store:
    return pb.Store(store_id=s.store_id, company_id=s.company_id, region_id=s.region_id, display_name=s.display_name)


def _terminal(t: Terminal) -> pb.Terminal:
    return pb.Terminal(store_id=t.store_id, terminal_id=t.terminal_id, display_name=t.display_name)


class GroupServicer(group_service_pb2_grpc.GroupServiceServicer):
    """Validates each request, hands it to the directory, and shapes the answer."""

    def __init__(self, directory: DirectoryService) -> None:
        self.directory = directory

    async def RegisterCompany(self, request: pb.RegisterCompanyRequest, context: Context) -> pb.RegisterCompanyResponse:
        v = Violations()
        c = request.company
        company = Company(
            company_id=v.identifier("company.company_id", c.company_id),
            display_name=_display_name(v, "company.display_name", c.display_name),
            point_value=_point_value(v, c),
        )
        v.raise_if_any()
        registered = await self.directory.register(company)
        return pb.RegisterCompanyResponse(company=_company(registered))

    async def RegisterStore(self, request: pb.RegisterStoreRequest, context: Context) -> pb.RegisterStoreResponse:
        v = Violations()
        s = request.store
        store = Store(
            store_id=v.identifier("store.store_id", s.store_id),
            company_id=v.identifier("store.company_id", s.company_id),
            region_id=v.identifier("store.region_id", s.region_id),
            display_name=_display_name(v, "store.display_name", s.display_name),
        )
        v.raise_if_any()
        registered = await self.directory.register(store)
        return pb.RegisterStoreResponse(store=_store(registered))

    async def RegisterTerminal(
        self, request: pb.RegisterTerminalRequest, context: Context
    ) -> pb.RegisterTerminalResponse:
        v = Violations()
        t = request.terminal
        terminal = Terminal(
            store_id=v.identifier("terminal.store_id", t.store_id),
            terminal_id=v.identifier("terminal.terminal_id", t.terminal_id),
            display_name=_display_name(v, "terminal.display_name", t.display_name),
        )
        v.raise_if_any()
        registered = await self.directory.register(terminal)
        return pb.RegisterTerminalResponse(terminal=_terminal(registered))

    async def ListCompanies(self, request: pb.ListCompaniesRequest, context: Context) -> pb.ListCompaniesResponse:
        companies = await self.directory.list_companies()
        return pb.ListCompaniesResponse(companies=[_company(c) for c in companies])

    async def ListStores(self, request: pb.ListStoresRequest, context: Context) -> pb.ListStoresResponse:
        v = Violations()
        if request.company_id:
            v.identifier("company_id", request.company_id)
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            v.add("page_size", f"must be 0 (the default, {DEFAULT_PAGE_SIZE}) to {MAX_PAGE_SIZE}")
        after = _page_after(v, request.page_token, request.company_id)
        v.raise_if_any()
        limit = request.page_size or DEFAULT_PAGE_SIZE
        stores, more = await self.directory.list_stores(request.company_id, after, limit)
        next_token = page_token(request.company_id, stores[-1].store_id) if more and stores else ""
        return pb.ListStoresResponse(stores=[_store(s) for s in stores], next_page_token=next_token)

    async def ListTerminals(self, request: pb.ListTerminalsRequest, context: Context) -> pb.ListTerminalsResponse:
        v = Violations()
        store_id = v.identifier("store_id", request.store_id)
        v.raise_if_any()
        terminals = await self.directory.list_terminals(store_id)
        return pb.ListTerminalsResponse(terminals=[_terminal(t) for t in terminals])
