"""The hot ledger: one atomic Redis script call per state change of an account."""

from pointauth.server.ledger._ledger import (
    Ledger,
    LedgerRefusal,
    LotEntry,
    OpResult,
    PointOfSaleRef,
    TransactionRecord,
)
from pointauth.server.ledger.keys import Keyspace, parse_transaction_id, transaction_id

__all__ = [
    "Keyspace",
    "Ledger",
    "LedgerRefusal",
    "LotEntry",
    "OpResult",
    "PointOfSaleRef",
    "TransactionRecord",
    "parse_transaction_id",
    "transaction_id",
]
