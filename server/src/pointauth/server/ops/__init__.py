"""Operator commands: migrate, worker, status, reconcile, rehydrate, seed and prune-functions, each
ready for the CLI (settings in, exit code out), and the checks and rebuilds they run."""

from pointauth.server.ops.commands import (
    migrate_command,
    prune_functions_command,
    reconcile_command,
    rehydrate_command,
    status_command,
    worker_command,
    worker_config,
)
from pointauth.server.ops.reconcile import Difference, ReconcileReport, reconcile
from pointauth.server.ops.rehydrate import RehydrateRefused, RehydrateReport, rehydrate

__all__ = [
    "Difference",
    "ReconcileReport",
    "RehydrateRefused",
    "RehydrateReport",
    "migrate_command",
    "prune_functions_command",
    "reconcile",
    "reconcile_command",
    "rehydrate",
    "rehydrate_command",
    "status_command",
    "worker_command",
    "worker_config",
]
