"""The group directory's pure checks and lists: each failure is one refusal, checked in order."""

from __future__ import annotations

from pointauth.server.domain.group import (
    Company,
    Directory,
    Refusal,
    Store,
    Terminal,
    check_point_of_sale,
    check_registration,
)
from pointauth.server.domain.reasons import ErrorReason

DIRECTORY = Directory(
    version=7,
    companies={"acme": Company("acme"), "partner": Company("partner")},
    stores={
        "store-1": Store("store-1", "acme", "kanto"),
        "store-2": Store("store-2", "acme", "kansai"),
        "store-9": Store("store-9", "partner", "kansai"),
    },
    terminals={
        ("store-1", "till-1"): Terminal("store-1", "till-1"),
        ("store-9", "kiosk-1"): Terminal("store-9", "kiosk-1"),
    },
)


def test_a_registered_point_of_sale_passes() -> None:
    assert check_point_of_sale(DIRECTORY, "acme", "store-1", "till-1") is None
    assert check_point_of_sale(DIRECTORY, "partner", "store-9", "kiosk-1") is None


def test_the_first_failure_in_order_is_the_refusal() -> None:
    # Everything wrong: the company is named first.
    assert check_point_of_sale(DIRECTORY, "nobody", "store-404", "none") == Refusal(
        "NOT_FOUND",
        ErrorReason.COMPANY_NOT_FOUND,
        "the group directory has no company nobody",
        {"field": "point_of_sale.company_id"},
    )
    assert check_point_of_sale(DIRECTORY, "acme", "store-404", "none") == Refusal(
        "NOT_FOUND", ErrorReason.STORE_NOT_FOUND, "the group directory has no store store-404",
        {"field": "point_of_sale.store_id"},
    )  # fmt: skip
    # A store of another company, whose terminal is unknown too: the store is the refusal.
    assert check_point_of_sale(DIRECTORY, "acme", "store-9", "none") == Refusal(
        "INVALID_ARGUMENT",
        ErrorReason.STORE_OF_OTHER_COMPANY,
        "store store-9 is a store of company partner, not of acme",
        {"field": "point_of_sale.store_id", "store_company_id": "partner"},
    )
    # A terminal of another store of the same company is not this store's.
    refusal = check_point_of_sale(DIRECTORY, "acme", "store-2", "till-1")
    assert refusal is not None
    assert (refusal.code, refusal.reason_name, dict(refusal.metadata)) == (
        "NOT_FOUND", "TERMINAL_NOT_FOUND", {"field": "point_of_sale.terminal_id"},
    )  # fmt: skip


def test_registration_checks() -> None:
    acme = Company("acme")
    assert check_registration(acme, company=None, store=None) is None
    store = Store("store-3", "acme", "kanto")
    assert check_registration(store, company=acme, store=None) is None
    assert check_registration(store, company=acme, store=Store("store-3", "acme", "tohoku", "old")) is None
    unknown = check_registration(store, company=None, store=None)
    assert unknown is not None
    assert (unknown.code, unknown.reason_name, dict(unknown.metadata)) == (
        "NOT_FOUND", "COMPANY_NOT_FOUND", {"field": "store.company_id"},
    )  # fmt: skip
    moved = check_registration(store, company=acme, store=Store("store-3", "partner", "kanto"))
    assert moved is not None
    assert (moved.code, moved.reason_name, dict(moved.metadata)) == (
        "FAILED_PRECONDITION", "STORE_OF_OTHER_COMPANY", {"field": "store.company_id", "store_company_id": "partner"},
    )  # fmt: skip
    terminal = Terminal("store-3", "till-1")
    assert check_registration(terminal, company=None, store=store) is None
    orphan = check_registration(terminal, company=None, store=None)
    assert orphan is not None
    assert (orphan.code, orphan.reason_name, dict(orphan.metadata)) == (
        "NOT_FOUND", "STORE_NOT_FOUND", {"field": "terminal.store_id"},
    )  # fmt: skip


def test_lists_are_by_id_and_pages_continue_after_the_last_id() -> None:
    assert [c.company_id for c in DIRECTORY.list_companies()] == ["acme", "partner"]
    assert DIRECTORY.list_stores("", "", 2) == (
        [DIRECTORY.stores["store-1"], DIRECTORY.stores["store-2"]], True,
    )  # fmt: skip
    assert DIRECTORY.list_stores("", "store-2", 2) == ([DIRECTORY.stores["store-9"]], False)
    assert DIRECTORY.list_stores("acme", "store-1", 1) == ([DIRECTORY.stores["store-2"]], False)
    assert DIRECTORY.list_stores("acme", "store-15", 5) == ([DIRECTORY.stores["store-2"]], False)
    assert DIRECTORY.list_stores("nobody", "", 5) == ([], False)
    assert DIRECTORY.list_terminals("store-1") == [Terminal("store-1", "till-1")]
    assert DIRECTORY.list_terminals("store-2") == []


def test_with_entry_is_a_new_directory_at_the_new_version() -> None:
    renamed = DIRECTORY.with_entry(Store("store-2", "acme", "kansai", "Namba"), 8)
    added = renamed.with_entry(Terminal("store-2", "till-1"), 9)
    assert (added.version, added.stores["store-2"].display_name) == (9, "Namba")
    assert check_point_of_sale(added, "acme", "store-2", "till-1") is None
    assert check_point_of_sale(DIRECTORY, "acme", "store-2", "till-1") is not None  # unchanged
    assert DIRECTORY.stores["store-2"].display_name == ""
