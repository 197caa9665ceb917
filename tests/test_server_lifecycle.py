"""The server as operators run it: health, reflection, SIGTERM drain, several processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NoReturn

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from redis.asyncio import Redis

from pointauth.client import PointsClient, UnavailableError
from pointauth.server.app import PointauthServer
from pointauth.server.devstack.stack import EmbeddedStack, free_port
from pointauth.server.ledger import Keyspace, Ledger
from pointauth.server.serve import stop_or_exit
from tests.conftest import STORE

PYTHON = sys.executable


async def test_health_and_reflection_are_served(server: PointauthServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "pointauth.v1.PointsService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name async for r in responses for s in r.list_services_response.service}
    assert {"pointauth.v1.PointsService", "pointauth.v1.AdminService", "grpc.health.v1.Health"} <= names


async def test_reflection_v1_is_served_beside_v1alpha(server: PointauthServer) -> None:
    # grpcurl and buf curl ask for grpc.reflection.v1 first; its messages are v1alpha's, renamed.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        info = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="pointauth.v1.PointsService"),
        ]
        replies = [reply async for reply in info(iter(requests))]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"pointauth.v1.PointsService", "grpc.reflection.v1.ServerReflection"} <= names
    files = replies[1].file_descriptor_response.file_descriptor_proto
    assert any(b"pointauth/v1/points_service.proto" in f for f in files)


async def test_graceful_stop_reports_not_serving_and_finishes_in_flight_calls(
    server: PointauthServer, member: str, redis: Redis, keyspace: Keyspace
) -> None:
    async with PointsClient(f"127.0.0.1:{server.port}", plaintext=True) as client:
        # Redis holds every write for a moment, so the calls are surely in flight when the stop begins.
        await redis.client_pause(700, all=False)
        in_flight = [asyncio.create_task(client.redeem_points(member, STORE, 1)) for _ in range(50)]
        await asyncio.sleep(0.3)
        await server.stop(grace=5)
        done = await asyncio.gather(*in_flight, return_exceptions=True)
    assert [r for r in done if isinstance(r, BaseException)] == []
    applied = [r for r in done if not isinstance(r, BaseException)]
    assert len(applied) == 50
    balance = await Ledger(redis, keyspace, server.clock, server.settings.ledger).balance("member-1")
    assert balance.available == 1000 - len(applied)
    assert (await server.health.Check(health_pb2.HealthCheckRequest(service=""), None)).status == (
        health_pb2.HealthCheckResponse.NOT_SERVING
    )


@pytest.fixture
def serve_env(stack: EmbeddedStack) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"POINTAUTH__REDIS__URL": stack.redis.url, "POINTAUTH__LEDGER__SHARDS": "16"})
    # What these tests check is the process's life, not its security (tests/api/test_access.py).
    env.update({"POINTAUTH__TLS__PLAINTEXT": "true", "POINTAUTH__AUTH__ENABLED": "false"})
    return env


def _wait_serving(port: int, proc: subprocess.Popen[bytes], tls: grpc.ChannelCredentials | None = None) -> None:
    target = f"127.0.0.1:{port}"
    with grpc.insecure_channel(target) if tls is None else grpc.secure_channel(target, tls) as channel:
        for _ in range(200):
            assert proc.poll() is None, "server exited while starting"
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise AssertionError("server did not start")


def _child_kind(pid: int) -> str:
    """What a child of `pointauth serve` is, by its command line."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    if "--multiprocessing-fork" in argv:
        return "worker"
    if any("multiprocessing.resource_tracker" in arg for arg in argv):
        return "resource_tracker"
    return " ".join(argv)


@contextlib.asynccontextmanager
async def serving(
    env: dict[str, str], log: Path, *flags: str, tls: grpc.ChannelCredentials | None = None
) -> AsyncIterator[tuple[int, subprocess.Popen[bytes]]]:
    """`pointauth serve` as operators run it, on a free port, once it answers (its health, over
    `tls` if given); killed at exit if the test left it running."""
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(  # noqa: ASYNC220 (started once, then awaited in threads)
            [PYTHON, "-m", "pointauth.server.cli", "serve", "--port", str(port), *flags], env=env, stderr=out
        )
    try:
        await asyncio.to_thread(_wait_serving, port, proc, tls)
        yield port, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("workers", [1, 2])
async def test_serve_runs_workers_and_stops_on_sigterm(
    serve_env: dict[str, str], workers: int, client: PointsClient, member: str, tmp_path: Path
) -> None:
    async with serving(serve_env, tmp_path / "serve.log", "--workers", str(workers)) as (port, proc):
        async with PointsClient(f"127.0.0.1:{port}", plaintext=True) as remote:
            balances = await asyncio.gather(*(remote.get_balance(member) for _ in range(20)))
        assert {b.balance.available_points for b in balances} == {1000}
        pgrep = ["pgrep", "-P", str(proc.pid)]
        children = (await asyncio.to_thread(subprocess.run, pgrep, capture_output=True, text=True)).stdout.split()
        # One worker serves in the process itself; more are spawned, with multiprocessing's
        # resource tracker beside them, and nothing else.
        kinds = sorted(_child_kind(int(pid)) for pid in children)
        assert kinds == ([] if workers == 1 else ["resource_tracker"] + ["worker"] * workers)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0


async def test_sigterm_lets_a_burst_in_flight_finish_on_every_process(
    serve_env: dict[str, str], client: PointsClient, member: str, redis: Redis, tmp_path: Path
) -> None:
    env = dict(serve_env, POINTAUTH__SERVER__GRACE_SECONDS="10")
    async with (
        serving(env, tmp_path / "serve.log", "--workers", "2") as (port, proc),
        contextlib.AsyncExitStack() as tills_open,
    ):
        tills = [
            await tills_open.enter_async_context(PointsClient(f"127.0.0.1:{port}", plaintext=True)) for _ in range(8)
        ]
        for till in tills:  # 8 connections over both processes
            await till.get_balance(member)
        # Writes wait 1.5 s: the 100 redeems are surely in flight when SIGTERM arrives.
        await redis.client_pause(1500, all=False)
        in_flight = [asyncio.create_task(tills[i % 8].redeem_points(member, STORE, 1)) for i in range(100)]
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        with pytest.raises(UnavailableError):  # new calls are refused while the old ones finish
            await tills[0].get_balance(member)
        done = await asyncio.gather(*in_flight, return_exceptions=True)
        assert [r for r in done if isinstance(r, BaseException)] == []
        assert await asyncio.to_thread(proc.wait, 30) == 0
    assert (await client.get_balance(member)).balance.available_points == 900


async def test_a_second_sigterm_stops_at_once(
    serve_env: dict[str, str], member: str, redis: Redis, tmp_path: Path
) -> None:
    env = dict(serve_env, POINTAUTH__SERVER__GRACE_SECONDS="60")
    try:
        async with (
            serving(env, tmp_path / "serve.log") as (port, proc),
            PointsClient(f"127.0.0.1:{port}", plaintext=True) as till,
        ):
            await redis.client_pause(20_000, all=False)  # the drain would wait for this call
            stuck = asyncio.create_task(till.redeem_points(member, STORE, 1))
            await asyncio.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            # A repeat within a second is the same request (one Ctrl-C can arrive twice): ignored.
            await asyncio.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(1.0)
            assert proc.poll() is None  # draining
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 10) == 128 + signal.SIGTERM
            await redis.client_unpause()
            with pytest.raises(UnavailableError):
                await stuck
    finally:
        await redis.client_unpause()


def test_bad_configuration_is_a_clear_error(serve_env: dict[str, str]) -> None:
    env = dict(serve_env, POINTAUTH__SERVER__PORT="70000")
    result = subprocess.run(
        [PYTHON, "-m", "pointauth.server.cli", "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "$.server.port" in result.stderr
    assert "65535" in result.stderr


def test_a_port_in_use_is_a_clear_error(serve_env: dict[str, str]) -> None:
    """Found trying `./scripts/dev` beside a running one: grpc's "Failed to bind" came as a
    traceback. The port is a setting; the CLI names it, exit 2, as for any bad setting."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [PYTHON, "-m", "pointauth.server.cli", "serve", "--port", str(port)],
            env=serve_env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"pointauth: cannot listen on 127.0.0.1:{port}: the port is in use, or the host is not an address of this "
        "machine (settings: server.host, server.port)"
    )
    assert "Traceback" not in result.stderr


class _Exited(Exception):
    pass


async def test_a_stop_that_hangs_ends_the_process_with_status_1(caplog: pytest.LogCaptureFixture) -> None:
    released = asyncio.Event()

    async def hanging_stop() -> None:
        while not released.is_set():  # deaf to cancellation, as a stuck library call may be
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.05)

    exits: list[int] = []

    def exit_(code: int) -> NoReturn:
        exits.append(code)
        raise _Exited

    with pytest.raises(_Exited):
        await stop_or_exit(hanging_stop(), 0.2, exit=exit_)
    released.set()
    assert exits == [1]
    assert "the stop did not end within 0 s: exiting now" in caplog.text  # 0.2 s, as %.0f writes it


async def test_a_stop_that_ends_in_time_ends_nothing_else() -> None:
    stopped: list[bool] = []

    async def stop() -> None:
        stopped.append(True)

    def exit_(code: int) -> NoReturn:
        raise AssertionError(f"exit({code})")

    await stop_or_exit(stop(), 0.2, exit=exit_)
    assert stopped == [True]
