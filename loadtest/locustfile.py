"""Locust scenarios for pointauth: tills at checkout, kiosks showing balances, service desks refunding.

Headless, with CSV (see loadtest/README.md):

    uv run locust -f loadtest/locustfile.py --headless -u 200 -r 50 -t 60s \
        --host 127.0.0.1:50051 --accounts 10000000 --csv results/pointauth

gRPC over gevent, as in Locust's own gRPC example: grpc's gevent integration, the SDK's generated
sync stubs, and an interceptor that reports every call to Locust. Business refusals (a member
short of points, a refund beyond what is left) are answers the scenario expects: they appear as
their own lines, "AuthorizeHold [INSUFFICIENT_POINTS]", and never as failures. Every other error is
a failure named by its status code and reason.

Locust reports whole milliseconds; the sub-millisecond figures come from `python -m loadtest.bench`.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from google.protobuf.timestamp_pb2 import Timestamp
from locust import User, between, events, task
from locust.env import Environment

from pointauth.client import ClientTLS, error_from_rpc
from pointauth.server.ops.seed_group import SeedGroup
from pointauth.v1 import common_pb2, points_service_pb2_grpc
from pointauth.v1 import points_service_pb2 as pb

# grpc's own event loop would block gevent's; this must run before the first channel exists.
grpc_gevent.init_gevent()

# The seeding contract: member n has account f"a{n:08d}" and primary card f"9{n:015d}".
DEFAULT_CARD_FORMAT = "9{n:015d}"


def _arguments(parser: Any) -> None:
    parser.add_argument("--accounts", type=int, env_var="POINTAUTH_ACCOUNTS", default=10_000, help="seeded members")
    parser.add_argument(
        "--card-format",
        env_var="POINTAUTH_CARD_FORMAT",
        default=DEFAULT_CARD_FORMAT,
        help="member n's card number, a str.format pattern with n",
    )
    parser.add_argument(
        "--hot-share", type=float, env_var="POINTAUTH_HOT_SHARE", default=0.2, help="share of members that are hot"
    )
    parser.add_argument(
        "--hot-traffic", type=float, env_var="POINTAUTH_HOT_TRAFFIC", default=0.8, help="share of visits they make"
    )
    # The seeded group directory's size (`pointauth seed --companies --stores --terminals`): the
    # tills are its points of sale, which the server checks.
    defaults = SeedGroup()
    parser.add_argument("--companies", type=int, env_var="POINTAUTH_COMPANIES", default=defaults.companies)
    parser.add_argument("--stores", type=int, env_var="POINTAUTH_STORES", default=defaults.stores)
    parser.add_argument("--terminals", type=int, env_var="POINTAUTH_TERMINALS", default=defaults.terminals)
    # TLS when a CA is given (a client certificate too for mTLS); the key from a file, never argv.
    # (Locust's own --tls-cert/--tls-key are its web UI's.)
    parser.add_argument("--pointauth-ca", env_var="POINTAUTH_CA_FILE", default="", help="server CA (PEM): use TLS")
    parser.add_argument("--pointauth-cert", env_var="POINTAUTH_CERT_FILE", default="", help="client certificate (mTLS)")
    parser.add_argument("--pointauth-key", env_var="POINTAUTH_KEY_FILE", default="", help="client certificate's key")
    parser.add_argument(
        "--pointauth-api-key-file", env_var="POINTAUTH_API_KEY_FILE", default="", help="file holding an API key"
    )


_listen: Callable[[Callable[[Any], None]], object] = events.init_command_line_parser.add_listener
_listen(_arguments)


class Members:
    """Picks members with a hot/cold skew: by default 80% of visits come from 20% of the members.
    The hot ones are every 5th member, so they spread over all shards and card buckets."""

    def __init__(self, accounts: int, card_format: str, hot_share: float, hot_traffic: float) -> None:
        if accounts < 1:
            raise ValueError("--accounts must be at least 1")
        self.accounts = accounts
        self.card_format = card_format
        self.stride = max(1, round(1 / hot_share))
        self.hot_count = max(1, accounts // self.stride)
        self.hot_traffic = hot_traffic

    def card(self, rng: random.Random) -> str:
        if rng.random() < self.hot_traffic:
            n = rng.randrange(self.hot_count) * self.stride
        else:
            n = rng.randrange(self.accounts)
        return self.card_format.format(n=n)

    @classmethod
    def from_options(cls, options: Any) -> Members:
        return cls(
            getattr(options, "accounts", 10_000),
            getattr(options, "card_format", DEFAULT_CARD_FORMAT),
            getattr(options, "hot_share", 0.2),
            getattr(options, "hot_traffic", 0.8),
        )


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Fires one Locust request event per call, named by the RPC (and the refusal reason)."""

    def __init__(self, environment: Environment) -> None:
        self.env = environment

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        name = details.method.rsplit("/", 1)[-1]
        exception: Exception | None = None
        length = 0
        started = time.perf_counter()
        response = continuation(details, request)
        try:
            length = response.result().ByteSize()
        except grpc.RpcError as error:
            decoded = error_from_rpc(error.code(), error.details() or "", error.trailing_metadata())
            if error.code() is grpc.StatusCode.FAILED_PRECONDITION:
                name = f"{name} [{decoded.reason}]"
            else:
                exception = decoded
        fire: Callable[..., None] = self.env.events.request.fire
        fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            response=response,
            context=None,
            exception=exception,
        )
        return response


def _channel(target: str, options: Any) -> grpc.Channel:
    if options is None or not options.pointauth_ca:
        return grpc.insecure_channel(target)
    tls = ClientTLS.from_files(options.pointauth_ca, options.pointauth_cert or None, options.pointauth_key or None)
    key_file = options.pointauth_api_key_file
    api_key = Path(key_file).read_text().strip() if key_file else None
    return grpc.secure_channel(target, tls.channel_credentials(api_key))


class PointauthUser(User):
    """A gRPC user on the SDK's stubs; `host` is host:port (no scheme)."""

    abstract = True

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        if not self.host:
            raise ValueError("give the server as --host 127.0.0.1:50051")
        target = self.host.split("://", 1)[-1]
        self.members = Members.from_options(environment.parsed_options)
        self.rng = random.Random()
        self._channel = grpc.intercept_channel(
            _channel(target, environment.parsed_options), LocustInterceptor(environment)
        )
        self.points = points_service_pb2_grpc.PointsServiceStub(self._channel)

    def on_stop(self) -> None:
        self._channel.close()

    def call(self, method: Callable[..., Any], request: Any) -> Any | None:
        """The answer, or None when the call was refused or failed (already reported to Locust)."""
        try:
            return method(request, timeout=5.0)
        except grpc.RpcError:
            return None


def _request_id() -> str:
    return str(uuid.uuid4())


class Till(PointauthUser):
    """A store till. Checkout: the member pays part of the basket with points (authorize, then
    capture; 1 in 10 sales is cancelled, voiding the hold) and earns points on the rest. Now and
    then a customer comes back and the desk refunds one of the till's recent sales."""

    weight = 6
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        group = SeedGroup(
            getattr(options, "companies", SeedGroup.companies),
            getattr(options, "stores", SeedGroup.stores),
            getattr(options, "terminals", SeedGroup.terminals),
        )
        company, store, terminal = group.point_of_sale(self.rng.randrange(group.points_of_sale))
        self.pos = common_pb2.PointOfSale(
            company_id=company, store_id=store, terminal_id=terminal, channel=common_pb2.CHANNEL_STORE
        )
        # Transactions of this till that a refund may reverse (captures and earns).
        self.recent: list[str] = []

    def _remember(self, transaction_id: str) -> None:
        self.recent.append(transaction_id)
        del self.recent[:-50]

    @task(10)
    def checkout(self) -> None:
        card = self.members.card(self.rng)
        basket = 100 * self.rng.randint(5, 300)  # 500 to 30,000 yen
        points = self.rng.randint(1, 100)
        hold = self.call(
            self.points.AuthorizeHold,
            pb.AuthorizeHoldRequest(request_id=_request_id(), card_number=card, point_of_sale=self.pos, points=points),
        )
        paid_in_points = 0
        if hold is not None:
            if self.rng.random() < 0.1:
                self.call(self.points.VoidHold, pb.VoidHoldRequest(request_id=_request_id(), hold_id=hold.hold_id))
                return
            capture = self.call(
                self.points.CaptureHold, pb.CaptureHoldRequest(request_id=_request_id(), hold_id=hold.hold_id)
            )
            if capture is not None:
                paid_in_points = capture.captured_points
                self._remember(capture.transaction_id)
        # One point is worth one yen: points earn on what the member paid in money.
        earned = self.call(
            self.points.EarnPoints,
            pb.EarnPointsRequest(
                request_id=_request_id(),
                card_number=card,
                point_of_sale=self.pos,
                purchase_amount=max(1, basket - paid_in_points),
                purchase_time=Timestamp(seconds=int(time.time())),
            ),
        )
        if earned is not None:
            self._remember(earned.transaction_id)

    @task(1)
    def refund(self) -> None:
        if not self.recent:
            return
        transaction_id = self.recent.pop(self.rng.randrange(len(self.recent)))
        # Half the returns are partial (one item of the basket).
        points = self.rng.randint(1, 5) if self.rng.random() < 0.5 else None
        request = pb.RefundTransactionRequest(
            request_id=_request_id(), transaction_id=transaction_id, point_of_sale=self.pos
        )
        if points is not None:
            request.points = points
        self.call(self.points.RefundTransaction, request)


class Kiosk(PointauthUser):
    """A member checks their balance at an in-store kiosk or in the app."""

    weight = 3
    wait_time = between(1.0, 5.0)

    @task
    def balance(self) -> None:
        self.call(self.points.GetBalance, pb.GetBalanceRequest(card_number=self.members.card(self.rng)))
