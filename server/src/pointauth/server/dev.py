"""`pointauth dev`: the embedded stack, migrations, demo members, the server and the write-behind
worker, stopped together by Ctrl-C."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import msgspec
import uvloop

from pointauth.server.app import PointauthServer
from pointauth.server.config import Settings
from pointauth.server.demo import load_demo_members
from pointauth.server.stack import EmbeddedStack
from pointauth.server.writebehind import WriteBehindWorker, migrate, worker_config


def run_dev(settings: Settings, data_dir: Path, hint: str) -> int:
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o755)
    with EmbeddedStack(data_dir.resolve()) as stack:
        settings = msgspec.structs.replace(
            settings,
            redis=msgspec.structs.replace(settings.redis, url=stack.redis.url),
            postgres=msgspec.structs.replace(settings.postgres, dsn=stack.postgres.dsn),
        )
        where = {"redis_url": stack.redis.url, "pg_dsn": stack.postgres.dsn}
        uvloop.run(_serve(settings, hint, where))
    return 0


async def _serve(settings: Settings, hint: str, where: dict[str, str]) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await migrate(settings.postgres.dsn)
    async with PointauthServer(settings) as server:
        worker = WriteBehindWorker(
            server.redis, settings.postgres.dsn, server.ledger.keyspace, worker_config(settings, consumer="dev")
        )
        writing = asyncio.create_task(worker.run(stopping))
        members = await load_demo_members(server.ledger)
        address = f"{settings.server.host}:{server.port}"
        cards = ", ".join(m.card_number for m in members)
        print(hint.format(address=address, cards=cards, **where), flush=True)
        await stopping.wait()
        await writing  # the worker finishes its batch: what the server acknowledged is journaled
