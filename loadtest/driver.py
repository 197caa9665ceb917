"""The benchmark's load generator: one client process runs closed (or paced) loops of one scenario on
grpc.aio + uvloop and records latencies in HDR histograms; the parent merges the processes' results.

A pool of these processes lives for the whole benchmark, so a step costs no process start or import.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import grpc
import uvloop
from google.protobuf.timestamp_pb2 import Timestamp
from hdrh.histogram import HdrHistogram

from loadtest import earn_rules
from loadtest.population import Population
from pointauth.client import ClientTLS
from pointauth.server.ops.seed_group import SeedGroup
from pointauth.v1 import common_pb2, points_service_pb2_grpc
from pointauth.v1 import points_service_pb2 as pb

SCENARIOS = ("echo", "echo_redis", "authorize", "authorize_capture", "earn", "earn_rules", "balance")
ECHO_METHOD = "/pointauth.bench.v1.EchoService/Echo"
# Microseconds, 1 µs to 60 s at 3 significant figures: sub-millisecond resolution, as the
# conventions ask, at about 40 KiB per histogram.
LOWEST_US, HIGHEST_US, FIGURES = 1, 60_000_000, 3
# A point of sale `pointauth seed` registered (its group's first, whatever its size): servers
# refuse those the group directory lacks.
_COMPANY, _STORE, _TERMINAL = SeedGroup().point_of_sale(0)
POS = common_pb2.PointOfSale(
    company_id=_COMPANY, store_id=_STORE, terminal_id=_TERMINAL, channel=common_pb2.CHANNEL_STORE
)


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, FIGURES)


@dataclass(frozen=True)
class Step:
    """One measurement, as this process runs it."""

    scenario: str
    target: str
    loops: int
    warmup_s: float
    duration_s: float
    population: Population
    rate_per_s: float = 0.0
    """0: closed loops (each starts its next call when the last answered); else this process's
    total start rate, spread evenly over its loops."""
    channels: int = 4
    echo_payload: bytes = b""
    seed: int = 0
    tls: ClientTLS | None = None
    """None: plaintext."""
    api_key: str = ""
    """Sent on every call (TLS only)."""


@dataclass
class StepResult:
    ok: int = 0
    refused: int = 0
    errors: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    histograms: dict[str, bytes] = field(default_factory=dict)
    """Encoded HDR histograms (µs) by name: "op" is the scenario's unit, others its calls."""


def _reason(error: grpc.aio.AioRpcError) -> str:
    # Decoding google.rpc.Status only on refusals keeps the SDK's decoder off the fast path.
    from pointauth.client import error_from_rpc

    return error_from_rpc(error.code(), error.details() or "", error.trailing_metadata()).reason


class WrongAnswer(Exception):
    """An answer that came back but is not what the scenario measures: an error, not a result."""


# An operation gets its loop's index and the instant it was due (perf_counter seconds); it
# returns its calls' latencies in seconds, the first call's counted from that due instant.
Op = Callable[[int, float], Awaitable[dict[str, float]]]


class _Scenarios:
    """The unit operations; each returns the seconds its individual calls took."""

    def __init__(self, channels: list[grpc.aio.Channel], step: Step) -> None:
        self.step = step
        self.rng = random.Random(step.seed)
        self.stubs = [points_service_pb2_grpc.PointsServiceStub(channel) for channel in channels]
        self.echoes: list[grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = [
            channel.unary_unary(ECHO_METHOD) for channel in channels
        ]

    def op(self) -> Op:
        ops: dict[str, Op] = {
            "echo": self.echo,
            "echo_redis": self.echo,  # the same call, to a server that makes one Redis call per RPC
            "authorize": self.authorize,
            "authorize_capture": self.authorize_capture,
            "earn": self.earn,
            "earn_rules": self.earn_rules,
            "balance": self.balance,
        }
        return ops[self.step.scenario]

    def _card(self) -> str:
        return self.step.population.card(self.step.population.pick(self.rng))

    async def echo(self, loop: int, due: float) -> dict[str, float]:
        await self.echoes[loop % len(self.echoes)](self.step.echo_payload)
        return {}

    def _hold_request(self) -> pb.AuthorizeHoldRequest:
        # One point at a time keeps seeded balances (100+ points) spendable through a long run.
        return pb.AuthorizeHoldRequest(
            request_id=str(uuid.uuid4()), card_number=self._card(), point_of_sale=POS, points=1
        )

    async def authorize(self, loop: int, due: float) -> dict[str, float]:
        await self.stubs[loop % len(self.stubs)].AuthorizeHold(self._hold_request())
        return {}

    async def authorize_capture(self, loop: int, due: float) -> dict[str, float]:
        stub = self.stubs[loop % len(self.stubs)]
        hold = await stub.AuthorizeHold(self._hold_request())
        held = time.perf_counter()
        await stub.CaptureHold(pb.CaptureHoldRequest(request_id=str(uuid.uuid4()), hold_id=hold.hold_id))
        # The capture is sent when the hold answers: that instant is when it was due.
        return {"AuthorizeHold": held - due, "CaptureHold": time.perf_counter() - held}

    async def earn(self, loop: int, due: float) -> dict[str, float]:
        request = pb.EarnPointsRequest(
            request_id=str(uuid.uuid4()),
            card_number=self._card(),
            point_of_sale=POS,
            purchase_amount=100 * self.rng.randint(1, 50),
            purchase_time=Timestamp(seconds=int(time.time())),
        )
        answer = await self.stubs[loop % len(self.stubs)].EarnPoints(request)
        if answer.rule_set_version:  # the flat rate is what this scenario measures
            raise WrongAnswer(
                f"EarnPoints answered under rule set version {answer.rule_set_version}, not the flat rate"
            )
        return {}

    async def earn_rules(self, loop: int, due: float) -> dict[str, float]:
        """EarnPoints with a 5-line basket, under the rule set the bench published."""
        basket = earn_rules.basket(self.rng)
        request = pb.EarnPointsRequest(
            request_id=str(uuid.uuid4()),
            card_number=self._card(),
            point_of_sale=POS,
            purchase_amount=sum(line.amount for line in basket),
            purchase_time=Timestamp(seconds=int(time.time())),
            basket=basket,
        )
        wrong = earn_rules.check(await self.stubs[loop % len(self.stubs)].EarnPoints(request))
        if wrong:
            raise WrongAnswer(wrong)
        return {}

    async def balance(self, loop: int, due: float) -> dict[str, float]:
        await self.stubs[loop % len(self.stubs)].GetBalance(pb.GetBalanceRequest(card_number=self._card()))
        return {}


async def run_step(step: Step) -> StepResult:
    result = StepResult()
    histograms: dict[str, HdrHistogram] = {"op": new_histogram()}
    # A local subchannel pool gives each channel its own connection, so SO_REUSEPORT spreads
    # this process's load over the server processes.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.insecure_channel(step.target, options=options)
        if step.tls is None
        else grpc.aio.secure_channel(step.target, step.tls.channel_credentials(step.api_key), options=options)
        for _ in range(max(1, step.channels))
    ]
    try:
        await asyncio.gather(*(channel.channel_ready() for channel in channels))
        op = _Scenarios(channels, step).op()
        now = time.perf_counter()
        measure_from = now + step.warmup_s
        end = measure_from + step.duration_s
        interval = step.loops / step.rate_per_s if step.rate_per_s > 0 else 0.0

        async def loop(index: int) -> None:
            due = now + interval * index / step.loops
            while True:
                if interval:
                    due += interval
                    delay = due - time.perf_counter()
                    # Behind schedule, the latency counts from when the call was due, so a slow
                    # answer is not hidden by the calls it delayed (coordinated omission). After
                    # a sleep it counts from the wake-up: timer slack is ours, not the server's.
                    started = due
                    if delay > 0:
                        await asyncio.sleep(delay)
                        started = time.perf_counter()
                else:
                    started = time.perf_counter()
                if started >= end:
                    return
                measured = started >= measure_from
                try:
                    parts = await op(index, started)
                except grpc.aio.AioRpcError as error:
                    if not measured:
                        continue
                    if error.code() is grpc.StatusCode.FAILED_PRECONDITION:
                        reason = _reason(error)
                        result.refused += 1
                        result.refusals[reason] = result.refusals.get(reason, 0) + 1
                    else:
                        result.errors += 1
                        if len(result.error_samples) < 5:
                            result.error_samples.append(f"{error.code().name}: {error.details()}")
                    continue
                except WrongAnswer as wrong:
                    if measured:
                        result.errors += 1
                        if len(result.error_samples) < 5:
                            result.error_samples.append(f"wrong answer: {wrong}")
                    continue
                if not measured:
                    continue
                result.ok += 1
                histograms["op"].record_value(max(1, int((time.perf_counter() - started) * 1e6)))
                for name, seconds in parts.items():
                    if name not in histograms:
                        histograms[name] = new_histogram()
                    histograms[name].record_value(max(1, int(seconds * 1e6)))

        await asyncio.gather(*(loop(i) for i in range(step.loops)))
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    result.histograms = {name: hist.encode() for name, hist in histograms.items()}
    return result


def client_main(conn: Connection) -> None:
    """A pool process: runs each Step it receives and sends back its StepResult; None ends it."""
    while True:
        step: Step | None = conn.recv()
        if step is None:
            return
        conn.send(uvloop.run(run_step(step)))
