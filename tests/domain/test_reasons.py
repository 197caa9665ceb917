"""The one list of refusal reasons: the proto enum covers every reason the server can send."""

from __future__ import annotations

import re
from importlib.resources import files

import grpc
import pytest

from pointauth.client import ErrorReason, PointauthError
from pointauth.server.api.errors import from_refusal
from pointauth.server.ledger import LedgerRefusal, OpResult

SCRIPT = files("pointauth.server.ledger").joinpath("ledger.lua").read_text()


def _script_reasons() -> set[str]:
    """Every reason the ledger script can put in a refusal: the second argument of refuse(...),
    `reason = '...'` fields, and the table naming a resolved hold's reason."""
    found = set(re.findall(r"refuse\('[A-Z_]+',\s*'([A-Z_]+)'", SCRIPT))
    found |= set(re.findall(r"reason\s*=\s*'([A-Z_]+)'", SCRIPT))
    table = re.search(r"local reasons = \{([^}]*)\}", SCRIPT)
    assert table is not None, "the script's table of hold reasons moved: update this test"
    found |= set(re.findall(r"'([A-Z_]+)'", table.group(1)))
    return found


def test_every_reason_the_script_can_send_is_in_the_enum() -> None:
    emitted = _script_reasons()
    assert {"INSUFFICIENT_POINTS", "HOLD_EXPIRED", "IDEMPOTENCY_KEY_REUSED", "BALANCE_LIMIT_EXCEEDED"} <= emitted
    assert emitted - set(ErrorReason.keys()) == set()


def test_a_reason_missing_from_the_enum_is_a_server_bug_not_a_wire_string() -> None:
    with pytest.raises(ValueError, match="NO_SUCH_REASON"):
        from_refusal(LedgerRefusal(OpResult(code="FAILED_PRECONDITION", reason="NO_SUCH_REASON")))


def test_the_sdk_reads_the_reason_as_the_enum() -> None:
    known = PointauthError(grpc.StatusCode.FAILED_PRECONDITION, "", "HOLD_EXPIRED")
    newer = PointauthError(grpc.StatusCode.FAILED_PRECONDITION, "", "A_REASON_FROM_THE_FUTURE")
    assert known.error_reason == ErrorReason.HOLD_EXPIRED
    assert newer.error_reason == ErrorReason.ERROR_REASON_UNSPECIFIED
