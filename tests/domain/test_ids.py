"""The id grammar (domain/ids.py): account-style ids, card numbers, placeholders, transaction ids."""

from __future__ import annotations

import pytest

from pointauth.server.domain.ids import (
    PLACEHOLDERS,
    is_card_number,
    is_id,
    parse_transaction_id,
    transaction_id,
)

# --- account, company, store and terminal ids ------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["a", "7", "Z", "a" * 64, "9" + "_" * 63, "member-1", "a_b-c", "a-", "a_", "0-_-0", "nulls", "null1", "none-1"],
)
def test_valid_ids(value: str) -> None:
    assert is_id(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "a" * 65,
        "-a",
        "_a",
        "a.b",  # '.' separates a transaction id's account and sequence
        "a b",
        " a",
        "a\n",  # fullmatch: no trailing newline as `$` would allow
        "é",
        "ａ",  # fullwidth: ASCII letters only
        "a/b",
        "a:b",
    ],
)
def test_invalid_ids(value: str) -> None:
    assert not is_id(value)


def test_the_placeholders() -> None:
    assert frozenset({"null", "nil", "none", "undefined", "nan"}) == PLACEHOLDERS


@pytest.mark.parametrize(
    "value", ["null", "NULL", "Null", "nUlL", "nil", "NIL", "None", "undefined", "UNDEFINED", "NaN"]
)
def test_placeholders_in_any_case_are_not_ids(value: str) -> None:
    assert not is_id(value)


# --- card numbers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["1234", "0000", "A1b2", "12-4", "9" * 64, "a" + "-" * 62 + "z", "9100000000000001", "app-member-7", "nulls"],
)
def test_valid_card_numbers(value: str) -> None:
    assert is_card_number(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "1",
        "123",  # 3 characters
        "9" * 65,
        "-123",
        "123-",
        "12_4",  # '_' is allowed in ids, not in card numbers
        "_123",
        "12 34",
        "1234\n",
        "12.34",
        "１２３４",  # fullwidth digits
    ],
)
def test_invalid_card_numbers(value: str) -> None:
    assert not is_card_number(value)


@pytest.mark.parametrize("value", ["null", "NULL", "None", "nOnE", "undefined", "Undefined"])
def test_placeholders_in_any_case_are_not_card_numbers(value: str) -> None:
    assert not is_card_number(value)


# --- transaction ids ---------------------------------------------------------------------------


def test_transaction_id_names_its_account() -> None:
    assert transaction_id("member-1", 42) == "member-1.42"


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("member-1.42", ("member-1", 42)),
        ("a.1", ("a", 1)),
        ("a_b-c.3", ("a_b-c", 3)),
        ("A" * 64 + ".7", ("A" * 64, 7)),
        ("a.9999999999999999", ("a", 9_999_999_999_999_999)),  # 16 digits, the most
        ("nulls.5", ("nulls", 5)),
    ],
)
def test_parse_transaction_id(value: str, parsed: tuple[str, int]) -> None:
    assert parse_transaction_id(value) == parsed


@pytest.mark.parametrize(
    "value",
    [
        "",
        "a",
        "a.",
        ".1",
        "a.0",  # sequences start at 1
        "a.01",  # no leading zeros: one transaction, one spelling
        "a.007",
        "a.10000000000000000",  # 17 digits
        "a.-1",
        "a.+1",
        "a.1.2",
        "a..1",
        "a.1 ",
        "a.1\n",
        "a.１",  # fullwidth digit
        "a.1e3",
        "-a.1",
        "_a.1",
        "A" * 65 + ".1",
        "null.1",
        "NULL.1",
        "Undefined.9",
        "NaN.2",
    ],
)
def test_not_transaction_ids(value: str) -> None:
    assert parse_transaction_id(value) is None


@pytest.mark.parametrize(("account", "seq"), [("a", 1), ("member-1", 10), ("x" * 64, 9_999_999_999_999_999)])
def test_transaction_ids_round_trip(account: str, seq: int) -> None:
    assert parse_transaction_id(transaction_id(account, seq)) == (account, seq)
