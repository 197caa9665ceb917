"""pointauth client SDK: a typed async client over the generated pointauth.v1 stubs."""

from pointauth.client._client import PointsClient, new_request_id
from pointauth.client._errors import (
    ConflictError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    PointauthError,
    RefusedError,
    RetryableError,
    UnauthenticatedError,
    UnavailableError,
    error_from_rpc,
)
from pointauth.client._security import ClientTLS
from pointauth.v1.common_pb2 import Channel, LotKind, PointOfSale
from pointauth.v1.error_reason_pb2 import ErrorReason

__all__ = [
    "Channel",
    "ClientTLS",
    "ConflictError",
    "ErrorReason",
    "InternalError",
    "InvalidArgumentError",
    "LotKind",
    "NotFoundError",
    "OverloadedError",
    "PermissionDeniedError",
    "PointOfSale",
    "PointauthError",
    "PointsClient",
    "RefusedError",
    "RetryableError",
    "UnauthenticatedError",
    "UnavailableError",
    "error_from_rpc",
    "new_request_id",
]
