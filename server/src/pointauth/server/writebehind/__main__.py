"""`python -m pointauth.server.writebehind`: the write-behind commands on their own (the same
functions `pointauth migrate|worker|status|reconcile|rehydrate` call), with the connection
settings on the command line; everything else comes from POINTAUTH__ variables or defaults."""

from __future__ import annotations

import argparse
import logging

import msgspec

from pointauth.server.config import load_settings
from pointauth.server.writebehind.commands import (
    migrate_command,
    reconcile_command,
    rehydrate_command,
    status_command,
    worker_command,
)
from pointauth.server.writebehind.worker import WorkerConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pointauth.server.writebehind", description=__doc__)
    parser.add_argument("--redis-url")
    parser.add_argument("--dsn")
    parser.add_argument("--shards", type=int)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate")
    worker = sub.add_parser("worker")
    worker.add_argument("--index", type=int, default=0)
    worker.add_argument("--count", type=int, default=1)
    worker.add_argument("--consumer")
    worker.add_argument("--batch-size", type=int, default=1000)
    worker.add_argument("--claim-idle-ms", type=int, default=30_000)
    worker.add_argument("--max-deliveries", type=int, default=5)
    sub.add_parser("status")
    reconcile = sub.add_parser("reconcile")
    reconcile.add_argument("--settle-seconds", type=float, default=5.0)
    rehydrate = sub.add_parser("rehydrate")
    rehydrate.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")

    settings = load_settings()
    replace = msgspec.structs.replace
    if args.redis_url:
        settings = replace(settings, redis=replace(settings.redis, url=args.redis_url))
    if args.dsn:
        settings = replace(settings, postgres=replace(settings.postgres, dsn=args.dsn))
    if args.shards:
        settings = replace(settings, ledger=replace(settings.ledger, shards=args.shards))

    if args.command == "migrate":
        return migrate_command(settings)
    if args.command == "worker":
        config = WorkerConfig(
            index=args.index,
            count=args.count,
            batch_size=args.batch_size,
            claim_idle_ms=args.claim_idle_ms,
            max_deliveries=args.max_deliveries,
            **({"consumer": args.consumer} if args.consumer else {}),
        )
        return worker_command(settings, config)
    if args.command == "status":
        return status_command(settings)
    if args.command == "reconcile":
        return reconcile_command(settings, args.settle_seconds)
    return rehydrate_command(settings, args.force)


if __name__ == "__main__":
    raise SystemExit(main())
