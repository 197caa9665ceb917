"""Errors raised by the pointauth client. One root; the status code and rich details are kept.

PointauthError                 any error answer (code, reason, message, metadata)
├── InvalidArgumentError       bad input; `field_violations` names each field
├── NotFoundError              unknown card, hold or transaction
├── RefusedError               a business refusal (INSUFFICIENT_POINTS, HOLD_EXPIRED, ...)
├── ConflictError              ALREADY_EXISTS: request_id reused for other content, ...
├── UnauthenticatedError       UNAUTHENTICATED: credentials missing, unknown or revoked
├── PermissionDeniedError      PERMISSION_DENIED: the credential may not make this call
├── RetryableError             a retry with the same request_id can succeed; `retry_delay` (s)
│   ├── UnavailableError       the server or its store (BACKEND_UNAVAILABLE) is unreachable
│   └── OverloadedError        RESOURCE_EXHAUSTED: the server shed the call (SERVER_OVERLOADED), or
│                              this credential's rate was exceeded (RATE_LIMITED)
└── InternalError              a server fault; the server logged it
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

from pointauth.v1.error_reason_pb2 import ErrorReason

_DETAILS_KEY = "grpc-status-details-bin"


class PointauthError(Exception):
    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        field_violations: dict[str, str] | None = None,
        retry_delay: float | None = None,
    ) -> None:
        super().__init__(f"{code.name}{' ' + reason if reason else ''}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = metadata or {}
        self.field_violations = field_violations or {}
        self.retry_delay = retry_delay
        """Seconds the server suggests waiting before a retry (google.rpc.RetryInfo), if any."""

    @property
    def error_reason(self) -> ErrorReason.ValueType:
        """`reason` as the ErrorReason enum; ERROR_REASON_UNSPECIFIED for a reason newer than this SDK."""
        try:
            return ErrorReason.Value(self.reason)
        except ValueError:
            return ErrorReason.ERROR_REASON_UNSPECIFIED


class InvalidArgumentError(PointauthError):
    pass


class NotFoundError(PointauthError):
    pass


class RefusedError(PointauthError):
    pass


class ConflictError(PointauthError):
    pass


class UnauthenticatedError(PointauthError):
    pass


class PermissionDeniedError(PointauthError):
    pass


class RetryableError(PointauthError):
    pass


class UnavailableError(RetryableError):
    pass


class OverloadedError(RetryableError):
    pass


class InternalError(PointauthError):
    pass


_CLASSES: dict[grpc.StatusCode, type[PointauthError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: RefusedError,
    grpc.StatusCode.ALREADY_EXISTS: ConflictError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.INTERNAL: InternalError,
}


def error_from_rpc(code: grpc.StatusCode, details: str, trailing_metadata: object) -> PointauthError:
    """Decodes google.rpc.Status details (ErrorInfo, BadRequest, RetryInfo) from a failed call's
    trailers."""
    reason, metadata, violations = "", {}, {}
    retry_delay: float | None = None
    for key, value in trailing_metadata or ():  # type: ignore[attr-defined]
        if key != _DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            bad = error_details_pb2.BadRequest()
            retry = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Unpack(bad):
                violations = {v.field: v.description for v in bad.field_violations}
            elif detail.Unpack(retry):
                retry_delay = retry.retry_delay.ToMilliseconds() / 1000
    cls = _CLASSES.get(code, PointauthError)
    return cls(code, details or "", reason, metadata, violations, retry_delay)
