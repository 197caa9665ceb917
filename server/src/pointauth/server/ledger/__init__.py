"""The hot ledger: one atomic Redis function call per state change of an account."""

from pointauth.server.domain.earning import LotKindCode
from pointauth.server.ledger._ledger import (
    LIBRARY,
    AccountView,
    Ledger,
    LedgerLibrary,
    LedgerRefusal,
    ProfileChange,
    RankArgs,
    SaleEarn,
    drop_other_libraries,
    load_library,
)
from pointauth.server.ledger.codec import (
    CardKindCode,
    LotEntry,
    OpResult,
    PointOfSaleRef,
    TransactionRecord,
)
from pointauth.server.ledger.connection import BACKEND_ERRORS, PoolExhausted, connect
from pointauth.server.ledger.keys import Keyspace

__all__ = [
    "BACKEND_ERRORS",
    "LIBRARY",
    "AccountView",
    "CardKindCode",
    "Keyspace",
    "Ledger",
    "LedgerLibrary",
    "LedgerRefusal",
    "LotEntry",
    "LotKindCode",
    "OpResult",
    "PointOfSaleRef",
    "PoolExhausted",
    "ProfileChange",
    "RankArgs",
    "SaleEarn",
    "TransactionRecord",
    "connect",
    "drop_other_libraries",
    "load_library",
]
