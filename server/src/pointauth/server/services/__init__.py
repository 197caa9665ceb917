"""Use cases: resolve the card, compute the earn, call the ledger, say what happened. They
raise domain refusals (never gRPC errors) and know nothing of protobuf."""
