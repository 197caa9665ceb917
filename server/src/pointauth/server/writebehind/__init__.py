"""The durable ledger: write-behind of the Redis event streams to PostgreSQL, and the tools that
check (reconcile) and rebuild (rehydrate) Redis from it."""

from pointauth.server.writebehind.commands import (
    migrate_command,
    reconcile_command,
    rehydrate_command,
    status_command,
    worker_command,
    worker_config,
)
from pointauth.server.writebehind.migrate import migrate
from pointauth.server.writebehind.reconcile import Difference, ReconcileReport, reconcile
from pointauth.server.writebehind.rehydrate import RehydrateRefused, RehydrateReport, rehydrate
from pointauth.server.writebehind.status import Status, worker_status
from pointauth.server.writebehind.worker import WorkerConfig, WriteBehindWorker

__all__ = [
    "Difference",
    "ReconcileReport",
    "RehydrateRefused",
    "RehydrateReport",
    "Status",
    "WorkerConfig",
    "WriteBehindWorker",
    "migrate",
    "migrate_command",
    "reconcile",
    "reconcile_command",
    "rehydrate",
    "rehydrate_command",
    "status_command",
    "worker_command",
    "worker_config",
    "worker_status",
]
