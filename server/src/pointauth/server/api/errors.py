"""Rich gRPC errors (AIP-193): a status code plus exactly one ErrorInfo, and BadRequest field
violations for bad input, built in one place."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from pointauth.server.ledger import LedgerRefusal

DOMAIN = "pointauth.v1"


class ApiError(Exception):
    """An error to send to the client as it is; nothing was changed by the request."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        metadata: Mapping[str, str] | None = None,
        violations: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(f"{code.name} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})
        self.violations = list(violations)

    def to_status(self) -> grpc.Status:
        detail = status_pb2.Status(code=self.code.value[0], message=self.message)
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata))
        detail.details.append(info)
        if self.violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
                    for field, description in self.violations
                ]
            )
            packed = any_pb2.Any()
            packed.Pack(bad)
            detail.details.append(packed)
        status: grpc.Status = rpc_status.to_status(detail)
        return status


def from_refusal(refusal: LedgerRefusal) -> ApiError:
    result = refusal.result
    return ApiError(_CODES[result.code], result.reason, result.message, result.meta)


_CODES = {code.name: code for code in grpc.StatusCode}
