"""The hot ledger: one atomic Redis script call per state change of an account."""

from pointauth.server.ledger._ledger import (
    Ledger,
    LedgerRefusal,
    LotEntry,
    LotKindCode,
    OpResult,
    PointOfSaleRef,
    TransactionRecord,
)
from pointauth.server.ledger.connection import BACKEND_ERRORS, PoolExhausted, connect
from pointauth.server.ledger.keys import Keyspace

__all__ = [
    "BACKEND_ERRORS",
    "Keyspace",
    "Ledger",
    "LedgerRefusal",
    "LotEntry",
    "LotKindCode",
    "OpResult",
    "PointOfSaleRef",
    "PoolExhausted",
    "TransactionRecord",
    "connect",
]
