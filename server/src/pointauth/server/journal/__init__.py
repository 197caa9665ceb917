"""The durable ledger in PostgreSQL: migrations, and the write-behind worker that applies the
Redis event streams to the journal and its projections (copying what the events say)."""

from pointauth.server.journal.migrate import migrate
from pointauth.server.journal.status import Status, worker_status
from pointauth.server.journal.worker import WorkerConfig, WriteBehindWorker

__all__ = ["Status", "WorkerConfig", "WriteBehindWorker", "migrate", "worker_status"]
