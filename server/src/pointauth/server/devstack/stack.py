"""The embedded stack: redis-server and PostgreSQL started from this machine's binaries, on
loopback, in a data folder of our own. Used by `pointauth dev` and by the test fixtures.

Each store runs in a session of its own: Ctrl-C in a terminal signals the whole foreground
process group, and the stores must outlive the server and worker that use them, stopping last.
Each is also tied to the process that started it (Linux's parent-death signal): if that process
dies without stopping them (kill -9, a crashed test run), they get SIGTERM instead of lingering."""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

LOOPBACK = "127.0.0.1"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
DATABASE = "pointauth"
DB_USER = "pointauth"


class StackError(RuntimeError):
    """A server of the embedded stack could not be found or started."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


# Starts tried when the port free_port() chose was taken by the time the server bound it (the
# kernel may hand it out again meanwhile, as another connection's local port).
START_ATTEMPTS = 3


def _port_taken(log: Path, offset: int) -> bool:
    """Whether the server's log, past `offset`, says its port was in use (both servers say so)."""
    try:
        with log.open("rb") as f:
            f.seek(offset)
            return b"Address already in use" in f.read()
    except OSError:
        return False


def _start_retrying_taken_ports(
    start_once: Callable[[], None], log: Path, port_chosen: bool, new_port: Callable[[], None]
) -> None:
    """`start_once()`; if it fails because its port was taken, and the port was the stack's own
    choice, `new_port()` and again (START_ATTEMPTS in all)."""
    for attempt in range(1, START_ATTEMPTS + 1):
        offset = log.stat().st_size if log.exists() else 0
        try:
            start_once()
            return
        except StackError:
            if not (port_chosen and attempt < START_ATTEMPTS and _port_taken(log, offset)):
                raise
            new_port()


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM when the starting thread's process dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _popen(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, start_new_session=True, preexec_fn=_die_with_parent, **kwargs)


def _wait_for(
    check: Callable[[], bool | None], what: str, proc: subprocess.Popen[bytes], timeout: float = 30.0
) -> None:
    """Until `check()` is True. None means busy getting ready (Redis loading its data, which
    takes minutes at ten million accounts): the `timeout` counts from the last such answer."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise StackError(f"{what} exited with code {proc.returncode} while starting")
        ready = check()
        if ready:
            return
        if ready is None:
            deadline = time.monotonic() + timeout
        elif time.monotonic() > deadline:
            raise StackError(f"{what} did not become ready within {timeout:.0f} s")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 20.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class RedisServer:
    """redis-server with the durability pointauth promises: AOF fsync on every write, no eviction."""

    def __init__(self, data_dir: Path, port: int | None = None, wrapper: tuple[str, ...] = ()) -> None:
        """`wrapper`: a command redis-server runs under (valgrind, for the benchmark's instruction
        counts)."""
        self.data_dir = data_dir
        self.port = port or free_port()
        self._port_chosen = port is None
        self.wrapper = wrapper
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> Self:
        binary = shutil.which("redis-server")
        if binary is None:
            raise StackError("redis-server not found: install it (apt-get install redis-server)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.data_dir / "redis.log"

        def start_once() -> None:
            args = [
                *self.wrapper, binary,
                "--bind", LOOPBACK, "--port", str(self.port), "--dir", str(self.data_dir),
                "--appendonly", "yes", "--appendfsync", "always",
                "--maxmemory-policy", "noeviction", "--save", "",
                "--daemonize", "no", "--logfile", log.name,
            ]  # fmt: skip
            self.proc = _popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _wait_for(self._pong, "redis-server", self.proc)

        _start_retrying_taken_ports(start_once, log, self._port_chosen, self._new_port)
        return self

    def _new_port(self) -> None:
        self.port = free_port()

    def _pong(self) -> bool | None:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                reply = sock.recv(64)
        except OSError:
            return False
        return True if reply.startswith(b"+PONG") else None if reply.startswith(b"-LOADING") else False

    def kill(self) -> None:
        """SIGKILL, as a crash: what was acknowledged must be in the AOF."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        _stop(self.proc)


def postgres_bindir() -> Path:
    found = shutil.which("postgres")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if not candidates:
        raise StackError("PostgreSQL not found: install it (apt-get install postgresql)")
    return Path(candidates[-1]).parent


class PostgresServer:
    """A private PostgreSQL cluster; as root, it runs as the `postgres` system user."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self._port_chosen = port is None
        self.bindir = postgres_bindir()
        self.proc: subprocess.Popen[bytes] | None = None
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError as exc:
                raise StackError("running as root needs the `postgres` system user") from exc
            self._as_user = ["runuser", "-u", "postgres", "--"]

    @property
    def dsn(self) -> str:
        return f"postgresql://{DB_USER}@{LOOPBACK}:{self.port}/{DATABASE}"

    def _start_once(self, pgdata: Path, log_path: Path) -> None:
        args = [
            str(self.bindir / "postgres"), "-D", str(pgdata), "-p", str(self.port),
            "-h", LOOPBACK, "-k", str(self.data_dir),
            "-c", "fsync=on", "-c", "max_connections=200", "-c", "logging_collector=off",
        ]  # fmt: skip
        with log_path.open("ab") as log:
            self.proc = _popen([*self._as_user, *args], stdout=log, stderr=log)
        isready = str(self.bindir / "pg_isready")

        def ready() -> bool:
            probe = [
                isready,
                "-q",
                "-h",
                LOOPBACK,
                "-p",
                str(self.port),
                "-d",
                "postgres",
                "-U",
                DB_USER,
            ]
            return subprocess.run(probe, check=False).returncode == 0

        _wait_for(ready, "postgres", self.proc, timeout=60)

    def _new_port(self) -> None:
        self.port = free_port()

    def _run(self, *args: str) -> None:
        result = subprocess.run([*self._as_user, *args], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise StackError(f"{Path(args[0]).name} failed: {result.stderr.strip() or result.stdout.strip()}")

    def start(self) -> Self:
        pgdata = self.data_dir / "pgdata"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._as_user:
            entry = pwd.getpwnam("postgres")
            # PostgreSQL refuses to run as root; its folder (and the way to it) must be its own.
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
            with contextlib.suppress(OSError):
                for parent in self.data_dir.resolve().parents:
                    if parent == Path("/"):
                        break
                    parent.chmod(parent.stat().st_mode | 0o001)
        if not (pgdata / "PG_VERSION").exists():
            self._run(
                str(self.bindir / "initdb"), "-D", str(pgdata), "-U", DB_USER,
                "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync",
            )  # fmt: skip
        log_path = self.data_dir / "postgres.log"
        _start_retrying_taken_ports(
            lambda: self._start_once(pgdata, log_path), log_path, self._port_chosen, self._new_port
        )
        created = subprocess.run(
            [str(self.bindir / "psql"), "-h", LOOPBACK, "-p", str(self.port), "-U", DB_USER, "-d", "postgres",
             "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        if not created:
            self._run(
                str(self.bindir / "createdb"),
                "-h",
                LOOPBACK,
                "-p",
                str(self.port),
                "-U",
                DB_USER,
                DATABASE,
            )
        return self

    def _pg_ctl_stop(self, mode: str) -> None:
        pgdata = str(self.data_dir / "pgdata")
        command = [*self._as_user, str(self.bindir / "pg_ctl"), "-D", pgdata, "stop", "-m", mode]
        subprocess.run(command, capture_output=True, check=False)

    def kill(self) -> None:
        """An immediate stop, as a crash. (runuser does not pass SIGKILL on: pg_ctl does it.)"""
        if self.proc is not None:
            self._pg_ctl_stop("immediate")
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._pg_ctl_stop("fast")
        _stop(self.proc)


class EmbeddedStack:
    """Redis and PostgreSQL in one folder; `with EmbeddedStack(path) as stack:` starts both."""

    def __init__(self, data_dir: Path, redis_port: int | None = None, postgres_port: int | None = None) -> None:
        self.redis = RedisServer(data_dir / "redis", redis_port)
        self.postgres = PostgresServer(data_dir / "postgres", postgres_port)

    def __enter__(self) -> Self:
        self.redis.start()
        try:
            self.postgres.start()
        except BaseException:
            self.redis.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.postgres.stop()
        self.redis.stop()
