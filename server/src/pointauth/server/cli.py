"""`pointauth`: one command line for the server, the embedded dev stack and operations."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import msgspec
from redis.exceptions import ConnectionError as RedisConnectionError

from pointauth.server.config import ConfigError, Settings, load_settings

USAGE_HINT = """\
pointauth is serving on {address} (Redis {redis_url}, PostgreSQL {pg_dsn}).
Its settings are in {config}, for every pointauth command. The write-behind's lag, whether
Redis and PostgreSQL agree, and the latest events journaled in PostgreSQL:
  uv run pointauth --config {config} status
  uv run pointauth --config {config} reconcile
  {psql} {pg_dsn} -c 'SELECT event_id, type, points, store_id FROM journal ORDER BY event_time DESC LIMIT 10'

{security}

Try it with buf curl (server reflection is on):
  uv run buf curl --protocol grpc {tls_flags} -d '{{"card_number": "{card}"}}' \\
    {scheme}://{address}/pointauth.v1.PointsService/GetBalance
  uv run buf curl --protocol grpc {tls_flags} -d '{{"request_id": "'$(cat /proc/sys/kernel/random/uuid)'",
    "card_number": "{card}", "points": 100, "point_of_sale": {{"company_id": "demo-retail",
    "store_id": "store-001", "terminal_id": "till-1", "channel": "CHANNEL_STORE"}}}}' \\
    {scheme}://{address}/pointauth.v1.PointsService/AuthorizeHold

Or from Python with the SDK (client_sdk/examples/get_balance.py):
  uv run python client_sdk/examples/get_balance.py {sdk_flags} {address} {card}

Demo cards: {cards}. Ctrl-C stops everything (data stays in {data_dir}).
"""


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    if getattr(args, "workers", None):
        settings = msgspec.structs.replace(
            settings, server=msgspec.structs.replace(settings.server, workers=args.workers)
        )
    if getattr(args, "port", None) is not None:
        settings = msgspec.structs.replace(settings, server=msgspec.structs.replace(settings.server, port=args.port))
    return settings


def _cmd_serve(args: argparse.Namespace) -> int:
    from pointauth.server.serve import serve

    return serve(_settings(args))


def _cmd_dev(args: argparse.Namespace) -> int:
    from pointauth.server.devstack.dev import run_dev
    from pointauth.server.devstack.stack import StackError

    try:
        return run_dev(_settings(args), Path(args.data_dir), USAGE_HINT)
    except StackError as exc:  # e.g. no redis-server: the message says what to install
        print(f"pointauth: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while the stores were starting: they are stopped again
        return 130


def _cmd_migrate(args: argparse.Namespace) -> int:
    from pointauth.server.ops import migrate_command

    return migrate_command(_settings(args))


def _cmd_worker(args: argparse.Namespace) -> int:
    from pointauth.server.ops import worker_command, worker_config

    settings = _settings(args)
    return worker_command(settings, worker_config(settings, args.index, args.count, args.consumer))


def _cmd_status(args: argparse.Namespace) -> int:
    from pointauth.server.ops import status_command

    return status_command(_settings(args))


def _cmd_reconcile(args: argparse.Namespace) -> int:
    from pointauth.server.ops import reconcile_command

    return reconcile_command(_settings(args), settle_seconds=args.settle_seconds)


def _cmd_rehydrate(args: argparse.Namespace) -> int:
    from pointauth.server.ops import rehydrate_command

    return rehydrate_command(_settings(args), force=args.force)


def _cmd_prune_functions(args: argparse.Namespace) -> int:
    from pointauth.server.ops import prune_functions_command

    return prune_functions_command(_settings(args))


def _cmd_ranks_review(args: argparse.Namespace) -> int:
    from pointauth.server.ops.commands import ranks_review_command

    return ranks_review_command(_settings(args))


def _cmd_credentials_issue(args: argparse.Namespace) -> int:
    from pointauth.server.ops.credentials import issue_command

    return issue_command(
        _settings(args),
        args.id,
        args.role,
        company=args.company,
        scope=args.scope,
        certificate=args.certificate,
        rate_per_second=args.rate_per_second,
    )


def _cmd_credentials_revoke(args: argparse.Namespace) -> int:
    from pointauth.server.ops.credentials import revoke_command

    return revoke_command(_settings(args), args.id)


def _cmd_credentials_list(args: argparse.Namespace) -> int:
    from pointauth.server.ops.credentials import list_command

    return list_command(_settings(args))


def _cmd_seed(args: argparse.Namespace) -> int:
    from pointauth.server.ops.seed import seed_command
    from pointauth.server.ops.seed_group import SeedGroup

    group = SeedGroup(companies=args.companies, stores=args.stores, terminals=args.terminals)
    return seed_command(_settings(args), args.accounts, group=group)


def _cmd_audit(args: argparse.Namespace) -> int:
    from datetime import datetime

    from pointauth.server.journal.audit import AuditQuery
    from pointauth.server.ops.audit import audit_command

    try:
        since = datetime.fromisoformat(args.since) if args.since else None
    except ValueError:
        print(
            f"pointauth audit: --since {args.since!r} is not an ISO time (e.g. 2026-11-24T09:00+09:00)", file=sys.stderr
        )
        return 2
    if since is not None and since.tzinfo is None:
        print("pointauth audit: --since needs a time zone (e.g. 2026-11-24T09:00+09:00)", file=sys.stderr)
        return 2
    q = AuditQuery(since, args.actor or "", args.method or "", args.refusals, args.limit)
    return audit_command(_settings(args), q, show_requests=args.requests)


def _cmd_settle(args: argparse.Namespace) -> int:
    from pointauth.server.ops.settle import settle_command

    if not args.list and not args.period:
        print("pointauth settle: give --period YYYY-MM (or --list)", file=sys.stderr)
        return 2
    options = {"close": args.close, "listing": args.list, "company": args.company or "", "stores": args.stores}
    return settle_command(_settings(args), args.period or "", csv_path=args.csv, **options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pointauth", description=__doc__)
    parser.add_argument("--config", type=Path, help="settings TOML file (POINTAUTH__SECTION__FIELD overrides)")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="run with an embedded Redis and PostgreSQL and demo members")
    dev.add_argument("--data-dir", default=".pointauth", help="where the embedded stack keeps its data")
    dev.add_argument("--port", type=int, help="gRPC port (default 50051)")
    dev.set_defaults(func=_cmd_dev)

    serve = sub.add_parser("serve", help="run the gRPC server against configured Redis")
    serve.add_argument("--workers", type=int, help="server processes sharing the port")
    serve.add_argument("--port", type=int, help="gRPC port")
    serve.set_defaults(func=_cmd_serve)

    sub.add_parser("migrate", help="apply pending PostgreSQL migrations").set_defaults(func=_cmd_migrate)

    worker = sub.add_parser("worker", help="write the Redis event streams behind into PostgreSQL")
    worker.add_argument("--index", type=int, default=0, help="this worker applies shard %% count == index")
    worker.add_argument("--count", type=int, default=1, help="how many workers split the shards")
    worker.add_argument("--consumer", help="consumer name; keep it across restarts (default: host name)")
    worker.set_defaults(func=_cmd_worker)

    sub.add_parser("status", help="write-behind lag, backlog and throughput").set_defaults(func=_cmd_status)

    reconcile = sub.add_parser("reconcile", help="prove Redis and PostgreSQL agree; exit 1 listing differences")
    reconcile.add_argument("--settle-seconds", type=float, default=5.0, help="wait this long for in-flight events")
    reconcile.set_defaults(func=_cmd_reconcile)

    rehydrate = sub.add_parser("rehydrate", help="rebuild Redis from PostgreSQL")
    rehydrate.add_argument("--force", action="store_true", help="even over a Redis that holds data")
    rehydrate.set_defaults(func=_cmd_rehydrate)

    sub.add_parser(
        "prune-functions", help="after a deploy: delete the Redis ledger libraries of other releases"
    ).set_defaults(func=_cmd_prune_functions)

    ranks = sub.add_parser("ranks", help="member ranks").add_subparsers(dest="ranks_command", required=True)
    ranks.add_parser(
        "review", help="the rank period's review of every account (downgrades per the rank program)"
    ).set_defaults(func=_cmd_ranks_review)

    audit = sub.add_parser("audit", help="the audit trail: operator actions and refused calls, newest first")
    audit.add_argument("--since", help="from this time on (ISO 8601 with a zone, e.g. 2026-11-24T09:00+09:00)")
    audit.add_argument("--actor", help="only this credential's records")
    audit.add_argument("--method", help="only methods containing this (e.g. MergeAccounts, cli:settle)")
    audit.add_argument("--refusals", action="store_true", help="only calls that did not succeed")
    audit.add_argument("--limit", type=int, default=100, help="at most this many records (default 100)")
    audit.add_argument("--requests", action="store_true", help="print each record's request (JSON)")
    audit.set_defaults(func=_cmd_audit)

    settle = sub.add_parser(
        "settle", help="settlement between group companies: a period's statement; --close stores it for good"
    )
    settle.add_argument("--period", help="the month, YYYY-MM, in the program's time zone (earn.timezone)")
    settle.add_argument("--close", action="store_true", help="close the period: store its statement for good")
    settle.add_argument("--list", action="store_true", help="list the closed periods")
    settle.add_argument("--company", help="only the lines naming this company")
    settle.add_argument("--stores", action="store_true", help="also the per-store lines of the using side")
    settle.add_argument("--csv", metavar="FILE", help="write the statement as CSV to FILE ('-': standard output)")
    settle.set_defaults(func=_cmd_settle)

    credentials = sub.add_parser(
        "credentials", help="who may call the server: auth.credentials_file, re-read by running servers"
    ).add_subparsers(dest="credentials_command", required=True)
    issue = credentials.add_parser("issue", help="add a credential; prints its API key once")
    issue.add_argument("id", help="the credential's id (never reused)")
    issue.add_argument("--role", required=True, choices=["till", "kiosk", "partner", "operator", "auditor"])
    issue.add_argument("--company", default="", help="its points of sale must be this company's (tills: required)")
    issue.add_argument(
        "--scope", nargs="+", default=[], metavar="RPC", help="partner: the RPCs it may call (PointsService/GetBalance)"
    )
    issue.add_argument(
        "--certificate", default="", help="identify it by this mTLS client certificate identity instead of a key"
    )
    issue.add_argument("--rate-per-second", type=int, default=0, help="its own rate limit (0: auth.rate_per_second)")
    issue.set_defaults(func=_cmd_credentials_issue)
    revoke = credentials.add_parser("revoke", help="refuse a credential from now on (within auth.reload_seconds)")
    revoke.add_argument("id")
    revoke.set_defaults(func=_cmd_credentials_revoke)
    credentials.add_parser("list", help="the credentials, without secrets").set_defaults(func=_cmd_credentials_list)

    seed = sub.add_parser("seed", help="bulk-load a load-test population into Redis and PostgreSQL")
    seed.add_argument("--accounts", type=int, required=True, help="accounts a00000000 .. (N-1)")
    seed.add_argument("--companies", type=int, default=3, help="group companies (seed-retail, seed-retail-1, ...)")
    seed.add_argument("--stores", type=int, default=100, help="stores in all, spread over the companies")
    seed.add_argument("--terminals", type=int, default=4, help="terminals per store (till-0, ...)")
    seed.set_defaults(func=_cmd_seed)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"pointauth: {exc}", file=sys.stderr)
        return 2
    except (OSError, RedisConnectionError) as exc:  # a store is unreachable: say so, no traceback
        print(f"pointauth: cannot reach a server the settings name: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
