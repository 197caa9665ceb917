"""`pointauth dev`: the embedded stack, migrations, demo members, the server and the write-behind
worker. Ctrl-C stops them in order: the server (in-flight calls finish), then the worker once it
has journaled every event, then PostgreSQL and Redis (which Ctrl-C itself does not reach: see
`stack`)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import time
from pathlib import Path

import msgspec
import uvloop
from redis.asyncio import Redis

from pointauth.server.api.credentials import write_credentials_atomically
from pointauth.server.app import PointauthServer
from pointauth.server.config import Settings
from pointauth.server.devstack.certificates import Pki, ensure_pki
from pointauth.server.devstack.demo import load_demo_members
from pointauth.server.devstack.stack import EmbeddedStack, postgres_bindir
from pointauth.server.domain.credentials import Credential, Role, encode_credentials
from pointauth.server.journal import WriteBehindWorker, migrate
from pointauth.server.journal.status import stream_backlogs
from pointauth.server.ledger import Keyspace
from pointauth.server.ops import worker_config
from pointauth.server.signals import on_stop_signals

log = logging.getLogger(__name__)

SETTINGS_FILE = "pointauth.toml"
CREDENTIALS_FILE = "credentials.toml"
TLS_DIR = "tls"
# One client certificate per role; the till is the demo's demo-retail, whose points of sale the
# usage hint's calls name.
DEV_CREDENTIALS = (
    Credential(id="dev-till", role=Role.TILL, company="demo-retail", certificate="dev-till"),
    Credential(id="dev-kiosk", role=Role.KIOSK, certificate="dev-kiosk"),
    Credential(id="dev-operator", role=Role.OPERATOR, certificate="dev-operator"),
    Credential(id="dev-auditor", role=Role.AUDITOR, certificate="dev-auditor"),
)
DRAIN_SECONDS = 30.0
"""How long the worker may take, once the server has stopped, to journal what is left. What it
has not written by then stays in the Redis streams (on disk) for the next start."""


def run_dev(settings: Settings, data_dir: Path, hint: str) -> int:
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o755)
    with EmbeddedStack(data_dir.resolve()) as stack:
        settings = msgspec.structs.replace(
            settings,
            redis=msgspec.structs.replace(settings.redis, url=stack.redis.url),
            postgres=msgspec.structs.replace(settings.postgres, dsn=stack.postgres.dsn),
        )
        settings = secure_dev_settings(settings, data_dir.resolve())
        uvloop.run(_serve(settings, hint, data_dir / SETTINGS_FILE))
    return 0


def secure_dev_settings(settings: Settings, data_dir: Path) -> Settings:
    """mTLS with the dev PKI and auth with the dev credentials, as a deployment would run,
    unless the settings chose otherwise (tls.plaintext, their own certificates, auth off)."""
    tls, auth = settings.tls, settings.auth
    if not tls.plaintext and not tls.cert_file:
        pki = ensure_pki(data_dir / TLS_DIR, [c.id for c in DEV_CREDENTIALS])
        tls = msgspec.structs.replace(
            tls, cert_file=str(pki.server_cert), key_file=str(pki.server_key), client_ca_file=str(pki.ca_cert)
        )
    if auth.enabled and not auth.credentials_file:
        path = data_dir / CREDENTIALS_FILE
        if not path.exists():  # kept across restarts: credentials issued or revoked since stay so
            write_credentials_atomically(path, encode_credentials(list(DEV_CREDENTIALS)))
        auth = msgspec.structs.replace(auth, credentials_file=str(path))
    return msgspec.structs.replace(settings, tls=tls, auth=auth)


async def _serve(settings: Settings, hint: str, settings_file: Path) -> None:
    stopping = asyncio.Event()
    on_stop_signals(asyncio.get_running_loop(), stopping)
    await migrate(settings.postgres.dsn)
    server = PointauthServer(settings)
    # The worker has its own connections: the server closes its pool when it stops, and the
    # worker carries on after that until it has drained the streams.
    worker_redis = Redis.from_url(settings.redis.url)
    # In the server's own thread: the idle CPU class would hold back the server's calls too.
    config = dataclasses.replace(worker_config(settings, consumer="dev"), idle_cpu=False)
    worker = WriteBehindWorker(worker_redis, settings.postgres.dsn, server.ledger.keyspace, config)
    worker_done = asyncio.Event()
    writing: asyncio.Task[None] | None = None
    try:
        await server.start()
        writing = asyncio.create_task(worker.run(worker_done))
        members = await load_demo_members(server.accounts)
        settings = msgspec.structs.replace(settings, server=msgspec.structs.replace(settings.server, port=server.port))
        await asyncio.to_thread(settings_file.write_text, settings_toml(settings))
        print(hint.format(**hint_fields(settings, settings_file, [m.card_number for m in members])), flush=True)
        await stopping.wait()
        log.info("stopping: the server, then the write-behind worker, then Redis and PostgreSQL")
    finally:
        try:
            await server.stop()  # in-flight calls finish; nothing new is acknowledged after this
            if writing is not None:
                await _drain(worker_redis, server.ledger.keyspace, writing)
        finally:
            worker_done.set()
            if writing is not None:
                await writing
            await worker_redis.aclose()


async def _drain(redis: Redis, keyspace: Keyspace, writing: asyncio.Task[None]) -> None:
    """Waits until the worker has journaled every event the server wrote (or DRAIN_SECONDS)."""
    streams = [keyspace.events(shard) for shard in range(keyspace.shards)]
    deadline = time.monotonic() + DRAIN_SECONDS
    while not writing.done():
        backlog = sum(s.backlog for s in await stream_backlogs(redis, streams))
        if backlog == 0:
            return
        if time.monotonic() > deadline:
            log.warning("write-behind: %d events not journaled yet; the next start applies them", backlog)
            return
        await asyncio.sleep(0.1)


def hint_fields(settings: Settings, settings_file: Path, cards: list[str]) -> dict[str, str]:
    """What USAGE_HINT names: every command in it must work when pasted."""
    psql = shutil.which("psql") or str(postgres_bindir() / "psql")
    pki = Pki(settings_file.parent.resolve() / TLS_DIR)  # what secure_dev_settings made
    if settings.tls.plaintext:
        connect = {"tls_flags": "--http2-prior-knowledge", "scheme": "http", "sdk_flags": "--plaintext"}
    else:
        till_cert = f"--cert {pki.client_cert('dev-till')} --key {pki.client_key('dev-till')}"
        connect = {
            "tls_flags": f"--cacert {pki.ca_cert} {till_cert}",
            "scheme": "https",
            "sdk_flags": f"--ca {pki.ca_cert} {till_cert}",
        }
    return {
        **connect,
        "security": security_hint(settings, pki),
        "address": f"{settings.server.host}:{settings.server.port}",
        "redis_url": settings.redis.url,
        "pg_dsn": settings.postgres.dsn,
        "config": str(settings_file),
        "data_dir": str(settings_file.parent),
        "psql": psql,
        "card": cards[0],
        "cards": ", ".join(cards),
    }


def security_hint(settings: Settings, pki: Pki) -> str:
    tls = (
        "Plaintext (tls.plaintext = true)"
        if settings.tls.plaintext
        else f"mTLS: the dev CA, and a client certificate per credential, are in {pki.directory}"
    )
    auth = (
        f"auth is on: callers authenticate with a client certificate or an API key; the credentials\n"
        f"(dev-till of demo-retail, dev-kiosk, dev-operator, dev-auditor) are in {settings.auth.credentials_file}\n"
        "(`pointauth credentials issue|revoke|list`). The commands below act as dev-till."
        if settings.auth.enabled
        else "auth is off (auth.enabled = false): whoever reaches the port may call anything."
    )
    return f"{tls};\n{auth}"


def settings_toml(settings: Settings) -> str:
    """The settings as a TOML file `load_settings` reads back to the same values."""
    header = (
        "# Written by `pointauth dev` for the stack it runs, at every start (its ports change).\n"
        "# Any pointauth command can use it: uv run pointauth --config <this file> status\n\n"
    )
    # msgspec writes TOML through tomli-w (a dependency for this alone).
    return header + msgspec.toml.encode(settings).decode()
