"""Refusal reasons: the one list is the proto enum `pointauth.v1.ErrorReason` (ErrorInfo.reason
is a value's name). The ledger script writes names; `parse` checks one against the enum."""

from __future__ import annotations

from typing import TypeAlias

from pointauth.v1.error_reason_pb2 import ErrorReason

__all__ = ["ErrorReason", "Reason", "name", "parse"]

Reason: TypeAlias = ErrorReason.ValueType


def name(reason: Reason) -> str:
    return ErrorReason.Name(reason)


def parse(reason_name: str) -> Reason:
    """The enum value of a reason name; ValueError for a name the enum lacks (a server bug)."""
    return ErrorReason.Value(reason_name)
