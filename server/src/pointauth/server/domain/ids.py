"""The grammar of every id pointauth accepts or makes, in one place (the .proto comments state
the same rules to client developers).

- account, company, store and terminal ids: 1 to 64 of A-Z a-z 0-9 '_' '-', starting with a
  letter or digit;
- card numbers (plastic cards, app member ids): 4 to 64 of A-Z a-z 0-9 '-', starting and
  ending with a letter or digit;
- neither may be a placeholder a client wrote by mistake ("null", "undefined", ...);
- transaction and hold ids: `<account id>.<sequence>`, so they route to their account's shard.
"""

from __future__ import annotations

import re

ID_RULE = "1 to 64 characters of A-Z, a-z, 0-9, '_' or '-', starting with a letter or digit"
CARD_RULE = "4 to 64 characters of A-Z, a-z, 0-9 or '-', starting and ending with a letter or digit"

_ID = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
_ID_PATTERN = re.compile(_ID)
_CARD_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{2,62}[A-Za-z0-9]")
_TRANSACTION_ID = re.compile(rf"({_ID})\.([1-9][0-9]{{0,15}})")
# What a till's serializer writes for a missing value: never an id someone meant.
PLACEHOLDERS = frozenset({"null", "nil", "none", "undefined", "nan"})


def is_id(value: str) -> bool:
    return _ID_PATTERN.fullmatch(value) is not None and value.lower() not in PLACEHOLDERS


def is_card_number(value: str) -> bool:
    return _CARD_PATTERN.fullmatch(value) is not None and value.lower() not in PLACEHOLDERS


def transaction_id(account_id: str, seq: int) -> str:
    """A transaction (or hold) id names its account, so it routes to the right shard."""
    return f"{account_id}.{seq}"


def parse_transaction_id(value: str) -> tuple[str, int] | None:
    match = _TRANSACTION_ID.fullmatch(value)
    if match is None or match.group(1).lower() in PLACEHOLDERS:
        return None
    return match.group(1), int(match.group(2))
