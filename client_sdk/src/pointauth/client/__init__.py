"""pointauth client SDK: a typed async client over the generated pointauth.v1 stubs."""

from pointauth.client._client import PointsClient, new_request_id
from pointauth.client._errors import (
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
    PointauthError,
    RefusedError,
    UnavailableError,
    error_from_rpc,
)
from pointauth.v1.common_pb2 import Channel, LotKind, PointOfSale

__all__ = [
    "Channel",
    "ConflictError",
    "InvalidArgumentError",
    "LotKind",
    "NotFoundError",
    "PointOfSale",
    "PointauthError",
    "PointsClient",
    "RefusedError",
    "UnavailableError",
    "error_from_rpc",
    "new_request_id",
]
