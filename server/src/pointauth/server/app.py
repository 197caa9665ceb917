"""One server process: the gRPC services on grpc.aio, health and reflection, the hold sweeper,
and a graceful stop (health NOT_SERVING, in-flight calls finish, then stop)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from pointauth.server.api.access import AccessGuard
from pointauth.server.api.admin import AdminServicer
from pointauth.server.api.audit import AuditTrail
from pointauth.server.api.boundary import ErrorBoundary
from pointauth.server.api.credentials import CredentialStore
from pointauth.server.api.group import GroupServicer
from pointauth.server.api.members import MembersServicer
from pointauth.server.api.points import PointsServicer
from pointauth.server.api.rules import RulesServicer
from pointauth.server.api.settlement import SettlementServicer
from pointauth.server.clock import Clock, SystemClock
from pointauth.server.config import ConfigError, Settings
from pointauth.server.domain.credentials import CredentialsError
from pointauth.server.ledger import Keyspace, Ledger, connect
from pointauth.server.ledger.directory import DirectoryStore
from pointauth.server.ledger.pipeline import TickPipeline
from pointauth.server.ledger.rulebook import RuleBook
from pointauth.server.rules.earn_policy import EarnPolicy
from pointauth.server.services.accounts import AccountsService
from pointauth.server.services.audit import Auditor
from pointauth.server.services.directory import DirectoryService
from pointauth.server.services.members import MembersService
from pointauth.server.services.points import PointsService
from pointauth.server.services.rules import RulesService
from pointauth.server.services.settlement import SettlementService
from pointauth.server.transport import check_security, server_credentials
from pointauth.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    group_service_pb2,
    group_service_pb2_grpc,
    members_service_pb2,
    members_service_pb2_grpc,
    points_service_pb2,
    points_service_pb2_grpc,
    rules_service_pb2,
    rules_service_pb2_grpc,
    settlement_service_pb2,
    settlement_service_pb2_grpc,
)

log = logging.getLogger(__name__)
LISTENING = "pointauth listening on"
"""What each server process logs once it serves (the benchmark waits for every process's)."""

# How often (and after how long) the sweeper finishes merges left half-done by a process that
# died; a merge in progress takes milliseconds.
MERGE_RECOVERY_SECONDS = 10
# Calls gRPC lets through to the boundary, per connection and waiting to start, per call the
# process runs at once (server.max_in_flight): a burst on one connection of up to 4,000 calls,
# by default, is answered by the boundary (run, or shed with SERVER_OVERLOADED), not by gRPC.
BACKLOG_PER_IN_FLIGHT = 4

SERVICE_NAMES = (
    points_service_pb2.DESCRIPTOR.services_by_name["PointsService"].full_name,
    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    members_service_pb2.DESCRIPTOR.services_by_name["MembersService"].full_name,
    group_service_pb2.DESCRIPTOR.services_by_name["GroupService"].full_name,
    rules_service_pb2.DESCRIPTOR.services_by_name["RulesService"].full_name,
    settlement_service_pb2.DESCRIPTOR.services_by_name["SettlementService"].full_name,
)


class ListenError(ConfigError):
    """The server's address cannot be listened on: a setting to change (the CLI says so, exit 2),
    not a failure to trace."""


class PointauthServer:
    """`async with PointauthServer(settings) as server:` serves until `stop()`."""

    def __init__(
        self,
        settings: Settings,
        clock: Clock | None = None,
        *,
        reuse_port: bool = False,
        sweeper: bool = True,
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.redis = connect(settings.redis)
        pipeline = TickPipeline(
            self.redis, max_batches=settings.redis.pipeline_batches, queue_wait_s=settings.redis.pool_wait_seconds
        )
        self.ledger = Ledger(
            self.redis, Keyspace(settings.ledger.shards), self.clock, settings.ledger, pipeline=pipeline
        )
        # The group directory, cached in this process: points of sale are checked against it.
        self.directory = DirectoryService(DirectoryStore(self.redis, self.ledger.keyspace, self.clock), settings.group)
        policy = EarnPolicy(settings.earn)
        # The published rule set, cached in this process: earns are evaluated against it.
        self.rules = RulesService(
            RuleBook(self.redis, self.ledger.keyspace, self.clock), settings.rules, policy, self.clock, self.directory
        )
        self.points = PointsService(self.ledger, policy, self.clock, self.directory, self.rules)
        self.accounts = AccountsService(self.ledger, self.points)
        self.members = MembersService(self.ledger, self.directory)
        self.settlement = SettlementService(
            settings.postgres.dsn, self.redis, self.ledger.keyspace, self.clock, settings.earn.timezone
        )
        self.health = health.aio.HealthServicer()
        self._reuse_port = reuse_port
        self._run_sweeper = sweeper
        self._sweeper: asyncio.Task[None] | None = None
        self.server: grpc.aio.Server | None = None
        self.credentials: CredentialStore | None = None
        self.audit_trail: AuditTrail | None = None
        self.port = 0
        self._stopped = False

    async def start(self) -> None:
        check_security(self.settings)
        await self.redis.ping()
        # Loaded before serving, so that a Redis without Functions stops the start and the
        # first calls need no reload; several processes starting at once all succeed.
        loaded = await self.ledger.load()
        log.info("ledger library %s %s", self.ledger.library.name, "loaded" if loaded else "present")
        # The recovery pass: merges a crash left half-done are finished before serving (and the
        # sweeper looks again every tick, for those of a process that dies while serving).
        if finished := await self.ledger.finish_merges():
            log.warning("finished %d merges left half-done", finished)
        await self.directory.start()  # before serving: the first calls are checked against it
        if self.settings.ledger.card_index_snapshot:
            read = await self.ledger.cards.load_snapshot(self.redis, self.ledger.keyspace)
            log.info(
                "card index snapshot: %d cards, %d bytes, %d round trips, %.1f s",
                read.cards, read.bytes, read.rounds, read.seconds,
            )  # fmt: skip
        await self.rules.start()
        self.boundary = ErrorBoundary(
            max_in_flight=self.settings.server.max_in_flight,
            retry_delay_ms=self.settings.server.overload_retry_ms,
            max_message_bytes=self.settings.server.max_message_bytes,
        )
        # The access guard goes first (outermost): a caller without credentials learns nothing,
        # not even whether its body parsed, and is refused before it counts as in flight.
        interceptors: list[grpc.aio.ServerInterceptor] = [self.boundary]
        guard: AccessGuard | None = None
        if self.settings.auth.enabled:
            self.credentials = CredentialStore(
                Path(self.settings.auth.credentials_file), self.settings.auth.reload_seconds
            )
            try:
                await self.credentials.start()
            except CredentialsError as exc:
                raise ConfigError(f"auth.credentials_file: {exc}") from exc
            guard = AccessGuard(
                self.credentials,
                mtls=bool(self.settings.tls.client_ca_file),
                rate_per_second=self.settings.auth.rate_per_second,
                burst=self.settings.auth.burst,
            )
            interceptors.insert(0, guard)
        # Outermost: it sees the guard's refusals, and every operator action however it ends.
        auditor = Auditor(
            self.redis,
            self.ledger.keyspace,
            self.clock,
            refusals_per_second=self.settings.auth.audit_refusals_per_second,
        )
        self.audit_trail = AuditTrail(auditor, guard.identify if guard else None)
        interceptors.insert(0, self.audit_trail)
        backlog = BACKLOG_PER_IN_FLIGHT * self.settings.server.max_in_flight
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                # Several processes share the port only when asked; otherwise a busy port is an error.
                ("grpc.so_reuseport", 1 if self._reuse_port else 0),
                # A burst must reach the boundary, which sheds what is past max_in_flight with an
                # ErrorInfo and a RetryInfo. Below it, gRPC refuses streams past this per
                # connection (UNAVAILABLE, no ErrorInfo) and, past its queue of calls not yet
                # started (1,000 by default, over all connections), cancels them (CANCELLED: a
                # code clients do not retry); both limits are set well above max_in_flight.
                ("grpc.max_concurrent_streams", backlog),
                ("grpc.server.max_pending_requests", backlog),
                ("grpc.server.max_pending_requests_hard_limit", backlog),
                # Bodies up to 4x the limit reach the boundary, which refuses them with an
                # ErrorInfo; beyond that gRPC drops them before reading them in full.
                ("grpc.max_receive_message_length", 4 * self.settings.server.max_message_bytes),
            ],
        )
        methods = cast(grpc.aio.Server, _GenericHandlersOnly(server))
        points_service_pb2_grpc.add_PointsServiceServicer_to_server(
            PointsServicer(self.points, self.settings.ledger), methods
        )
        admin_service_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(self.accounts), methods)
        members_service_pb2_grpc.add_MembersServiceServicer_to_server(MembersServicer(self.members), methods)
        group_service_pb2_grpc.add_GroupServiceServicer_to_server(GroupServicer(self.directory), methods)
        rules_service_pb2_grpc.add_RulesServiceServicer_to_server(RulesServicer(self.rules), methods)
        settlement_service_pb2_grpc.add_SettlementServiceServicer_to_server(
            SettlementServicer(self.settlement), methods
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, methods)
        _serve_reflection(methods)
        address = f"{self.settings.server.host}:{self.settings.server.port}"
        credentials = server_credentials(self.settings.tls)
        try:
            if credentials is None:
                self.port = server.add_insecure_port(address)
            else:
                self.port = server.add_secure_port(address, credentials)
        except RuntimeError as exc:  # grpc says only "Failed to bind"
            raise ListenError(
                f"cannot listen on {address}: the port is in use, or the host is not an address of this machine "
                "(settings: server.host, server.port)"
            ) from exc
        await server.start()
        self.server = server
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self._run_sweeper:
            self._sweeper = asyncio.create_task(self._sweep_forever())
        log.info(
            f"{LISTENING} %s:%d (%s, auth %s)",
            self.settings.server.host,
            self.port,
            "plaintext" if credentials is None else "mTLS" if self.settings.tls.client_ca_file else "TLS",
            "on" if self.credentials is not None else "off",
        )

    async def _sweep_forever(self) -> None:
        """Releases holds nobody touches after their TTL (reads already see them as expired), and
        finishes merges whose process died midway."""
        next_merge_pass = time.monotonic() + MERGE_RECOVERY_SECONDS
        while not self._stopped:  # as services/following.py's Follower: not only the cancellation
            try:
                swept = await self.ledger.sweep_expired_holds(self.settings.ledger.sweep_shards_per_tick)
                if swept:
                    log.debug("released expired holds of %d accounts", swept)
                if time.monotonic() >= next_merge_pass:
                    next_merge_pass = time.monotonic() + MERGE_RECOVERY_SECONDS
                    if finished := await self.ledger.finish_merges(older_than_ms=MERGE_RECOVERY_SECONDS * 1000):
                        log.warning("finished %d merges left half-done", finished)
            except Exception:
                log.exception("hold sweep failed; retrying")
            await asyncio.sleep(self.settings.ledger.sweep_interval_seconds)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: health says NOT_SERVING, new calls are refused, in-flight calls finish."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self.server is not None:
            await self.server.stop(self.settings.server.grace_seconds if grace is None else grace)
        await self.directory.stop()
        await self.rules.stop()
        if self.credentials is not None:
            await self.credentials.stop()
        if self.audit_trail is not None:
            # Records of calls cancelled by the stop, then no more: Redis closes next.
            await self.audit_trail.close()
        await self.redis.aclose()

    async def wait(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


class _GenericHandlersOnly:
    """Where the generated add_*Servicer_to_server functions register a service: its generic
    handler is passed on, its registration as "registered methods" is not.

    grpc.aio keeps one request future per registered method and, for every call it accepts,
    waits on all of them (asyncio.wait over 38 futures here: callbacks added to and removed from
    each). A server of only generic handlers waits on one future and finds the method by a dict
    lookup, as the benchmark's echo servers always did: about 20 us of server CPU less per
    AuthorizeHold (README, Performance)."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        """Nothing: the generic handler registered with these serves the same methods."""


def _serve_reflection(server: grpc.aio.Server) -> None:
    """Server reflection as v1 (what grpcurl, buf curl and Postman ask for first) and v1alpha.

    grpcio-reflection implements only v1alpha; v1 renamed the package and kept every message
    and field number, so the same servicer answers both."""
    names = (*SERVICE_NAMES, reflection.SERVICE_NAME, REFLECTION_V1, health.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    servicer = reflection.aio.ReflectionServicer(names)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": v1}),)
    )
