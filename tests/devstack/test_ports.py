"""The embedded stack's servers start although the port they were given by free_port() was taken
by the time they bound it (the kernel can hand it out again meanwhile, as a connection's local
port): they try another. A port the caller chose is not replaced."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
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


def _redis_pong(port: int) -> bytes:
    with socket.create_connection((LOOPBACK, port), timeout=2) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64)


def test_redis_starts_on_another_port_when_its_port_was_taken(tmp_path: Path, taken_port: int) -> None:
    server = RedisServer(tmp_path / "redis")
    assert server.port == taken_port
    server.start()
    try:
        assert server.port != taken_port
        assert _redis_pong(server.port) == b"+PONG\r\n"
        assert b"Address already in use" in (tmp_path / "redis" / "redis.log").read_bytes()
    finally:
        server.stop()


def test_postgres_starts_on_another_port_when_its_port_was_taken(tmp_path: Path, taken_port: int) -> None:
    server = PostgresServer(tmp_path / "pg")
    assert server.port == taken_port
    server.start()
    try:
        assert server.port != taken_port
        ready = subprocess.run(
            [str(server.bindir / "pg_isready"), "-q", "-h", LOOPBACK, "-p", str(server.port)], check=False
        )
        assert ready.returncode == 0
    finally:
        server.stop()


def test_a_port_the_caller_chose_is_not_replaced(tmp_path: Path, taken_port: int) -> None:
    server = RedisServer(tmp_path / "redis", port=taken_port)
    with pytest.raises(StackError, match="exited with code"):
        server.start()
    assert server.port == taken_port
