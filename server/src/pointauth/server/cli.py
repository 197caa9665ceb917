"""`pointauth`: one command line for the server, the embedded dev stack and operations."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import msgspec

from pointauth.server.config import ConfigError, Settings, load_settings

USAGE_HINT = """\
pointauth is serving on {address} (Redis {redis_url}, PostgreSQL {pg_dsn}).

Try it with grpcurl (server reflection is on):
  grpcurl -plaintext -d '{{"card_number": "9100000000000001"}}' {address} pointauth.v1.PointsService/GetBalance
  grpcurl -plaintext -d '{{"request_id": "'$(cat /proc/sys/kernel/random/uuid)'", "card_number": "9100000000000001",
    "point_of_sale": {{"company_id": "demo-retail", "store_id": "store-001", "terminal_id": "till-1",
    "channel": "CHANNEL_STORE"}}, "points": 100}}' {address} pointauth.v1.PointsService/AuthorizeHold

Or from Python with the SDK (pip install ./client_sdk):
  from pointauth.client import PointsClient
  async with PointsClient("{address}") as client:
      print(await client.get_balance("9100000000000001"))

Demo cards: {cards}. Ctrl-C stops everything.
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
    from pointauth.server.dev import run_dev

    return run_dev(_settings(args), Path(args.data_dir), USAGE_HINT)


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"pointauth: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
