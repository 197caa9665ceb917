"""Rich gRPC errors (AIP-193): a status code plus exactly one ErrorInfo, and BadRequest field
violations for bad input or RetryInfo for what a retry can fix, built in one place."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from pointauth.server.domain import reasons
from pointauth.server.domain.reasons import ErrorReason, Reason
from pointauth.server.ledger import LedgerRefusal

DOMAIN = "pointauth.v1"


class ApiError(Exception):
    """An error to send to the client as it is; nothing was changed by the request."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: Reason,
        message: str,
        metadata: Mapping[str, str] | None = None,
        violations: Sequence[tuple[str, str]] = (),
        retry_delay_ms: int | None = None,
    ) -> None:
        super().__init__(f"{code.name} {reasons.name(reason)}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})
        self.violations = list(violations)
        self.retry_delay_ms = retry_delay_ms
        if retry_delay_ms is not None:
            # In ErrorInfo too, for clients that read only the one detail every error has.
            self.metadata["retry_delay_ms"] = str(retry_delay_ms)

    def to_status(self) -> grpc.Status:
        details: list[Message] = [
            error_details_pb2.ErrorInfo(reason=reasons.name(self.reason), domain=DOMAIN, metadata=self.metadata)
        ]
        if self.violations:
            details.append(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
                        for field, description in self.violations
                    ]
                )
            )
        if self.retry_delay_ms is not None:
            delay = duration_pb2.Duration()
            delay.FromMilliseconds(self.retry_delay_ms)
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        for detail in details:
            packed = any_pb2.Any()
            packed.Pack(detail)
            status.details.append(packed)
        result: grpc.Status = rpc_status.to_status(status)
        return result


def from_refusal(refusal: LedgerRefusal) -> ApiError:
    result = refusal.result
    # A reason missing from the enum is a bug: ValueError here, INTERNAL at the boundary.
    return ApiError(_CODES[result.code], reasons.parse(result.reason), result.message, result.meta)


def malformed_request() -> ApiError:
    return ApiError(
        grpc.StatusCode.INVALID_ARGUMENT,
        ErrorReason.MALFORMED_REQUEST,
        "the request body is not a valid protobuf message of this method's request type",
    )


def request_too_large(max_bytes: int) -> ApiError:
    return ApiError(
        grpc.StatusCode.INVALID_ARGUMENT,
        ErrorReason.REQUEST_TOO_LARGE,
        f"the request body is larger than the server accepts ({max_bytes} bytes)",
        {"max_bytes": str(max_bytes)},
    )


def deadline_passed() -> ApiError:
    return ApiError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        ErrorReason.DEADLINE_PASSED,
        "the call's deadline passed before the server could start it; nothing was done",
    )


def overloaded(what: str, retry_delay_ms: int) -> ApiError:
    return ApiError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        ErrorReason.SERVER_OVERLOADED,
        f"the server is overloaded ({what}); retry with the same request_id",
        retry_delay_ms=retry_delay_ms,
    )


def backend_unavailable(store: str, retry_delay_ms: int) -> ApiError:
    return ApiError(
        grpc.StatusCode.UNAVAILABLE,
        ErrorReason.BACKEND_UNAVAILABLE,
        f"{store} is unavailable; retry with the same request_id",
        {"backend": store},
        retry_delay_ms=retry_delay_ms,
    )


def internal_error() -> ApiError:
    # The cause is logged on the server; its text never reaches the client.
    return ApiError(grpc.StatusCode.INTERNAL, ErrorReason.INTERNAL_ERROR, "internal error; it has been logged")


_CODES = {code.name: code for code in grpc.StatusCode}
