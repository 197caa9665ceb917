"""The group directory's vocabulary: companies, their stores and the stores' terminals, and the
checks made against it (pure functions: each answers the one refusal to raise, or None).

A point of sale is accepted when its company is registered, its store is registered and is that
company's, and its terminal is registered in that store; checked in that order, the first
failure is the answer.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal, TypeAlias

from pointauth.server.domain import reasons
from pointauth.server.domain.reasons import ErrorReason, Reason
from pointauth.server.domain.settlement import DEFAULT_POINT_VALUE, PointValue

MAX_DISPLAY_NAME = 200
"""Characters of a company's, store's or terminal's display name."""


@dataclass(frozen=True)
class Company:
    """A group company: it issues points and bears their cost."""

    company_id: str
    display_name: str = ""
    point_value: PointValue = DEFAULT_POINT_VALUE
    """What one of its points is worth when it pays another company for it (settlement)."""


@dataclass(frozen=True)
class Store:
    """A store (or an EC site, an app) of one company; it never changes company."""

    store_id: str
    company_id: str
    region_id: str
    display_name: str = ""


@dataclass(frozen=True)
class Terminal:
    """A till, kiosk or system within a store; its id is unique within the store."""

    store_id: str
    terminal_id: str
    display_name: str = ""


Entry: TypeAlias = Company | Store | Terminal
RefusalCode = Literal["NOT_FOUND", "INVALID_ARGUMENT", "FAILED_PRECONDITION"]


@dataclass(frozen=True)
class Refusal:
    """A refusal to raise: a gRPC status name, the reason, and metadata naming the field."""

    code: RefusalCode
    reason: Reason
    message: str
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def reason_name(self) -> str:
        return reasons.name(self.reason)


@dataclass(frozen=True)
class Directory:
    """The whole directory at one version (a snapshot; never changed in place)."""

    version: int = 0
    companies: Mapping[str, Company] = field(default_factory=dict)
    stores: Mapping[str, Store] = field(default_factory=dict)
    terminals: Mapping[tuple[str, str], Terminal] = field(default_factory=dict)
    """By (store id, terminal id)."""

    @cached_property
    def _store_ids(self) -> dict[str, list[str]]:
        """Store ids in order: all of them under "", and each company's under its id."""
        ordered: dict[str, list[str]] = {"": sorted(self.stores)}
        for store_id in ordered[""]:
            ordered.setdefault(self.stores[store_id].company_id, []).append(store_id)
        return ordered

    @cached_property
    def _terminals_by_store(self) -> dict[str, list[Terminal]]:
        by_store: dict[str, list[Terminal]] = {}
        for key in sorted(self.terminals):
            by_store.setdefault(key[0], []).append(self.terminals[key])
        return by_store

    def with_entry(self, entry: Entry, version: int) -> Directory:
        """This directory with `entry` created or updated, at `version`."""
        if isinstance(entry, Company):
            return Directory(version, {**self.companies, entry.company_id: entry}, self.stores, self.terminals)
        if isinstance(entry, Store):
            return Directory(version, self.companies, {**self.stores, entry.store_id: entry}, self.terminals)
        terminals = {**self.terminals, (entry.store_id, entry.terminal_id): entry}
        return Directory(version, self.companies, self.stores, terminals)

    def list_companies(self) -> list[Company]:
        return [self.companies[company_id] for company_id in sorted(self.companies)]

    def list_stores(self, company_id: str, after: str, limit: int) -> tuple[list[Store], bool]:
        """Up to `limit` stores by id after the id `after` ("" from the first), of one company
        ("": of all); and whether more follow."""
        ids = self._store_ids.get(company_id, [])
        start = bisect_right(ids, after) if after else 0
        page = ids[start : start + limit]
        return [self.stores[store_id] for store_id in page], start + limit < len(ids)

    def list_terminals(self, store_id: str) -> list[Terminal]:
        return list(self._terminals_by_store.get(store_id, ()))


def check_point_of_sale(
    directory: Directory, company_id: str, store_id: str, terminal_id: str, field_prefix: str = "point_of_sale"
) -> Refusal | None:
    """Whether a till, kiosk or desk may name this point of sale; the refusal if not."""
    if company_id not in directory.companies:
        return _company_not_found(company_id, f"{field_prefix}.company_id")
    store = directory.stores.get(store_id)
    if store is None:
        return _store_not_found(store_id, f"{field_prefix}.store_id")
    if store.company_id != company_id:
        return Refusal(
            "INVALID_ARGUMENT",
            ErrorReason.STORE_OF_OTHER_COMPANY,
            f"store {store_id} is a store of company {store.company_id}, not of {company_id}",
            {"field": f"{field_prefix}.store_id", "store_company_id": store.company_id},
        )
    if (store_id, terminal_id) not in directory.terminals:
        return Refusal(
            "NOT_FOUND",
            ErrorReason.TERMINAL_NOT_FOUND,
            f"store {store_id} has no terminal {terminal_id} in the group directory",
            {"field": f"{field_prefix}.terminal_id"},
        )
    return None


def check_registration(entry: Entry, *, company: Company | None, store: Store | None) -> Refusal | None:
    """Whether `entry` may be registered. `company`: the registered company a store names;
    `store`: for a store, the store registered under its id before; for a terminal, the
    registered store it names (None: none)."""
    if isinstance(entry, Store):
        if company is None:
            return _company_not_found(entry.company_id, "store.company_id")
        if store is not None and store.company_id != entry.company_id:
            return Refusal(
                "FAILED_PRECONDITION",
                ErrorReason.STORE_OF_OTHER_COMPANY,
                f"store {entry.store_id} is a store of company {store.company_id}; a store never changes company",
                {"field": "store.company_id", "store_company_id": store.company_id},
            )
    elif isinstance(entry, Terminal) and store is None:
        return _store_not_found(entry.store_id, "terminal.store_id")
    return None


def check_company_known(directory: Directory, company_id: str, field_name: str) -> Refusal | None:
    return None if company_id in directory.companies else _company_not_found(company_id, field_name)


def check_store_known(directory: Directory, store_id: str, field_name: str) -> Refusal | None:
    return None if store_id in directory.stores else _store_not_found(store_id, field_name)


def _company_not_found(company_id: str, field_name: str) -> Refusal:
    return Refusal(
        "NOT_FOUND",
        ErrorReason.COMPANY_NOT_FOUND,
        f"the group directory has no company {company_id}",
        {"field": field_name},
    )


def _store_not_found(store_id: str, field_name: str) -> Refusal:
    return Refusal(
        "NOT_FOUND",
        ErrorReason.STORE_NOT_FOUND,
        f"the group directory has no store {store_id}",
        {"field": field_name},
    )
