"""The write-behind's commands, ready for the CLI: each takes the settings, runs to the end and
returns the process exit code."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import TextIO, TypeVar

from redis.asyncio import Redis

from pointauth.server.clock import SystemClock
from pointauth.server.config import Settings
from pointauth.server.journal.migrate import migrate
from pointauth.server.journal.status import worker_status
from pointauth.server.journal.worker import WorkerConfig, WriteBehindWorker
from pointauth.server.ledger import LIBRARY, Keyspace, drop_other_libraries
from pointauth.server.ops.progress import ProgressBar
from pointauth.server.ops.ranks import review_ranks
from pointauth.server.ops.reconcile import reconcile
from pointauth.server.ops.rehydrate import RehydrateRefused, rehydrate
from pointauth.server.signals import on_stop_signals

log = logging.getLogger(__name__)
T = TypeVar("T")


def _with_redis(settings: Settings, work: Callable[[Redis], Awaitable[T]]) -> T:
    async def main() -> T:
        redis = Redis.from_url(settings.redis.url)
        try:
            return await work(redis)
        finally:
            await redis.aclose()

    return asyncio.run(main())


def worker_config(settings: Settings, index: int = 0, count: int = 1, consumer: str | None = None) -> WorkerConfig:
    """The worker's configuration from the settings' [writebehind] section."""
    wb = settings.writebehind
    config = WorkerConfig(
        index=index,
        count=count,
        batch_size=wb.batch_size,
        poll_ms=wb.poll_ms,
        catchup_share=wb.catchup_share,
        lease_ms=wb.lease_ms,
        idle_cpu=wb.idle_cpu,
        idle_cpu_max_lag_ms=wb.idle_cpu_max_lag_ms,
        claim_idle_ms=wb.claim_idle_ms,
        max_deliveries=wb.max_deliveries,
    )
    return dataclasses.replace(config, consumer=consumer) if consumer else config


def migrate_command(settings: Settings, out: TextIO = sys.stdout) -> int:
    applied = asyncio.run(migrate(settings.postgres.dsn))
    print(f"applied migrations: {', '.join(applied)}" if applied else "schema is up to date", file=out)
    return 0


def worker_command(settings: Settings, config: WorkerConfig | None = None) -> int:
    """Runs a worker until SIGTERM or SIGINT (then finishes its batch and exits 0)."""
    keyspace = Keyspace(settings.ledger.shards)

    async def work(redis: Redis) -> int:
        stop = asyncio.Event()
        on_stop_signals(asyncio.get_running_loop(), stop)
        worker = WriteBehindWorker(redis, settings.postgres.dsn, keyspace, config)
        await worker.run(stop)
        log.info("write-behind worker stopped after applying %d events", worker.applied_total)
        return 0

    return _with_redis(settings, work)


def status_command(settings: Settings, out: TextIO = sys.stdout) -> int:
    keyspace = Keyspace(settings.ledger.shards)

    async def work(redis: Redis) -> int:
        status = await worker_status(redis, settings.postgres.dsn, keyspace)
        print(status.render(), file=out)
        return 0

    return _with_redis(settings, work)


def reconcile_command(settings: Settings, settle_seconds: float = 5.0, out: TextIO = sys.stdout) -> int:
    """Exit 0 when Redis and PostgreSQL agree; 1 and one line per difference when not."""
    keyspace = Keyspace(settings.ledger.shards)

    async def work(redis: Redis) -> int:
        report = await reconcile(redis, settings.postgres.dsn, keyspace, settle_seconds=settle_seconds)
        for difference in report.differences:
            print(difference, file=out)
        for entry in report.directory:
            print(entry, file=out)
        for rule in report.rules:
            print(rule, file=out)
        differing = [f"{len({d.account_id for d in report.differences})} accounts"] if report.differences else []
        if report.directory:
            differing.append(f"{len(report.directory)} group directory entries")
        if report.rules:
            differing.append(f"{len(report.rules)} rule sets or budgets")
        verdict = "agree" if report.ok else f"DIFFER for {' and '.join(differing)}"
        print(
            f"reconcile: {report.accounts} accounts compared in {report.seconds:.1f} s "
            f"({report.accounts_per_second:,.0f}/s): Redis and PostgreSQL {verdict}",
            file=out,
        )
        return 0 if report.ok else 1

    return _with_redis(settings, work)


def rehydrate_command(settings: Settings, force: bool = False, out: TextIO = sys.stdout) -> int:
    """Rebuilds Redis from PostgreSQL; exit 1 (and nothing written) if Redis has unapplied events."""
    keyspace = Keyspace(settings.ledger.shards)

    async def work(redis: Redis) -> int:
        try:
            report = await rehydrate(
                redis,
                settings.postgres.dsn,
                keyspace,
                now_ms=SystemClock().now_ms(),
                transaction_retention_ms=settings.ledger.transaction_retention_days * 86_400_000,
                progress=ProgressBar("accounts"),
                force=force,
            )
        except RehydrateRefused as exc:
            print(f"rehydrate refused: {exc}", file=out)
            return 1
        print(
            f"rehydrated {report.accounts} accounts, {report.transactions} transactions, {report.cards} cards, "
            f"{report.idempotency_records} request ids, {report.directory_entries} group directory entries, "
            f"{report.rule_sets} rule sets, {report.budgets} campaign budgets, "
            f"{report.unfinished_merges} unfinished merges (finished by the next server start) "
            f"in {report.seconds:.1f} s",
            file=out,
        )
        return 0

    return _with_redis(settings, work)


def prune_functions_command(settings: Settings, out: TextIO = sys.stdout) -> int:
    """Deletes the ledger libraries of other releases, for after a deploy has finished. Safe even
    while an older server still runs: its next call loads its own library again."""

    async def work(redis: Redis) -> int:
        dropped = await drop_other_libraries(redis)
        print(f"kept {LIBRARY.name}; deleted {', '.join(dropped) if dropped else 'nothing'}", file=out)
        return 0

    return _with_redis(settings, work)


def ranks_review_command(settings: Settings, out: TextIO = sys.stdout) -> int:
    """The rank period's review of every account; exit 1 if no rule set has a rank program."""
    report = _with_redis(settings, lambda redis: review_ranks(redis, settings, SystemClock()))
    if report is None:
        print("the current rule set has no rank program: nothing to review", file=out)
        return 1
    print(
        f"reviewed {report.reviewed} accounts: {report.changed} changed rank, "
        f"{report.skipped} closed or merged skipped",
        file=out,
    )
    return 0
