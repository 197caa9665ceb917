"""The embedded stack's servers start although the port they were given by free_port() was taken
by the time they bound it (the kernel can hand it out again meanwhile, as a connection's local
port): they try another. A port the caller chose is not replaced."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pointauth.server.devstack import stack
from pointauth.server.devstack.stack import LOOPBACK, PostgresServer, RedisServer, StackError


@pytest.fixture
def taken_port(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """A port something listens on, which free_port() answers first."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        sock.listen()
        port: int = sock.getsockname()[1]
        answers = iter([port])
        real = stack.free_port
        monkeypatch.setattr(stack, "free_port", lambda: next(answers, None) or real())
        yield port


def _redis_answers(server: RedisServer | PostgresServer) -> bool:
    with socket.create_connection((LOOPBACK, server.port), timeout=2) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64) == b"+PONG\r\n"


def _postgres_answers(server: RedisServer | PostgresServer) -> bool:
    assert isinstance(server, PostgresServer)
    isready = [str(server.bindir / "pg_isready"), "-q", "-h", LOOPBACK, "-p", str(server.port)]
    return subprocess.run(isready, check=False).returncode == 0


@pytest.mark.parametrize(
    ("server_type", "answers"),
    [(RedisServer, _redis_answers), (PostgresServer, _postgres_answers)],
    ids=["redis", "postgres"],
)
def test_a_server_starts_on_another_port_when_its_port_was_taken(
    tmp_path: Path,
    taken_port: int,
    server_type: type[RedisServer | PostgresServer],
    answers: Callable[[RedisServer | PostgresServer], bool],
) -> None:
    server = server_type(tmp_path / "server")
    assert server.port == taken_port
    server.start()
    try:
        assert server.port != taken_port
        assert answers(server)
    finally:
        server.stop()


def test_a_port_the_caller_chose_is_not_replaced(tmp_path: Path, taken_port: int) -> None:
    server = RedisServer(tmp_path / "redis", port=taken_port)
    with pytest.raises(StackError, match="exited with code"):
        server.start()
    assert server.port == taken_port
