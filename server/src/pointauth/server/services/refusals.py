"""Refusals the use cases raise themselves, beside those the ledger script answers."""

from __future__ import annotations

from pointauth.server.domain import reasons
from pointauth.server.domain.group import Refusal
from pointauth.server.domain.reasons import ErrorReason, Reason
from pointauth.server.ledger import LedgerRefusal, OpResult


def not_found(reason: Reason, message: str) -> LedgerRefusal:
    return LedgerRefusal(OpResult(code="NOT_FOUND", reason=reasons.name(reason), message=message))


def failed_precondition(reason: Reason, message: str) -> LedgerRefusal:
    return LedgerRefusal(OpResult(code="FAILED_PRECONDITION", reason=reasons.name(reason), message=message))


def renamed_not_found(refusal: LedgerRefusal, reason: Reason, message: str) -> LedgerRefusal:
    """An id naming an account that does not exist is an unknown hold or transaction to the caller."""
    if refusal.result.reason != reasons.name(ErrorReason.ACCOUNT_NOT_FOUND):
        return refusal
    return not_found(reason, message)


def group_refusal(refusal: Refusal) -> LedgerRefusal:
    """A refusal of the group directory (domain/group.py), raised as the ledger's are."""
    return LedgerRefusal(
        OpResult(code=refusal.code, reason=refusal.reason_name, message=refusal.message, meta=dict(refusal.metadata))
    )
