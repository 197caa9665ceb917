"""pointauth server: gRPC point authorization on Redis, with PostgreSQL as the durable ledger."""
