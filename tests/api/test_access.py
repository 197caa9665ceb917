"""Access control end to end, over real TLS (API keys) and real mTLS (client certificates):
each role's allowed and refused calls, a till of one company at another's store, credentials
issued and revoked while the server runs, and refusals that change nothing and name their
reason in exactly one ErrorInfo."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import msgspec
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis

from loadtest.driver import Step, run_step
from loadtest.population import Population
from pointauth.client import (
    Channel,
    ClientTLS,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    PointauthError,
    PointOfSale,
    PointsClient,
    UnauthenticatedError,
    UnavailableError,
)
from pointauth.server.api.credentials import write_credentials_atomically
from pointauth.server.app import PointauthServer
from pointauth.server.clock import ManualClock
from pointauth.server.config import AuthSettings, Settings, TLSSettings, load_settings
from pointauth.server.devstack.certificates import Pki, ensure_pki
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.domain.credentials import Credential, Role, encode_credentials, key_sha256, new_api_key
from pointauth.server.domain.group import Entry
from pointauth.server.ledger import Keyspace
from pointauth.server.ops.credentials import issue_command, revoke_command
from tests.api.test_group import error_infos
from tests.conftest import CARD, DAY_MS, STORE, at
from tests.helpers import account_state, stream_events
from tests.test_server_lifecycle import serving

PARTNER_STORE = PointOfSale(
    company_id="partner", store_id="store-9", terminal_id="kiosk-1", channel=Channel.CHANNEL_STORE
)
WHO = ("till-acme", "kiosk-1", "operator-1", "auditor-1", "partner-1")
KEYS = {who: new_api_key(who) for who in WHO}
CREDENTIALS = [
    Credential(id="till-acme", role=Role.TILL, company="acme"),
    Credential(id="kiosk-1", role=Role.KIOSK),
    Credential(id="operator-1", role=Role.OPERATOR),
    Credential(id="auditor-1", role=Role.AUDITOR),
    Credential(id="partner-1", role=Role.PARTNER, company="partner", scope=("PointsService/GetBalance",)),
]
# Each credential works both ways: by its API key, or by its client certificate (CN = its id).
CREDENTIALS = [msgspec.structs.replace(c, key_sha256=key_sha256(KEYS[c.id]), certificate=c.id) for c in CREDENTIALS]
TRANSPORTS = ("tls+key", "mtls")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    # "stranger": a certificate our CA signed for an identity no credential names.
    return ensure_pki(tmp_path_factory.mktemp("pki"), [*WHO, "stranger"])


@pytest.fixture(scope="session")
def foreign_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return ensure_pki(tmp_path_factory.mktemp("foreign-pki"), ["till-acme"])


def secured_settings(settings: Settings, pki: Pki, credentials: Path, *, mtls: bool, burst: int = 1000) -> Settings:
    tls = TLSSettings(
        cert_file=str(pki.server_cert), key_file=str(pki.server_key), client_ca_file=str(pki.ca_cert) if mtls else ""
    )
    auth = AuthSettings(credentials_file=str(credentials), reload_seconds=0.05, burst=burst)
    return msgspec.structs.replace(settings, tls=tls, auth=auth)


@pytest.fixture
def credentials_file(tmp_path: Path) -> Path:
    path = tmp_path / "credentials.toml"
    write_credentials_atomically(path, encode_credentials(CREDENTIALS))
    return path


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def secured(
    settings: Settings,
    clock: ManualClock,
    redis: Redis,
    group: tuple[Entry, ...],
    pki: Pki,
    credentials_file: Path,
    transport: str,
) -> AsyncIterator[PointauthServer]:
    secure = secured_settings(settings, pki, credentials_file, mtls=transport == "mtls")
    async with PointauthServer(secure, clock, sweeper=False) as running:
        yield running


def connect(server: PointauthServer, pki: Pki, who: str, transport: str) -> PointsClient:
    address = f"127.0.0.1:{server.port}"
    if transport == "mtls":
        return PointsClient(address, tls=ClientTLS.from_files(pki.ca_cert, pki.client_cert(who), pki.client_key(who)))
    return PointsClient(address, tls=ClientTLS.from_files(pki.ca_cert), api_key=KEYS[who])


Connect = Callable[[str], PointsClient]


@pytest.fixture
def as_(secured: PointauthServer, pki: Pki, transport: str) -> Connect:
    return lambda who: connect(secured, pki, who, transport)


@pytest.fixture
async def member(as_: Connect, clock: ManualClock) -> str:
    """CARD with 1,000 points, made by the operator (which is the operator's allowed calls)."""
    async with as_("operator-1") as operator:
        await operator.create_account("member-1", CARD)
        await operator.grant_points(CARD, 1000, at(clock.now_ms() + 30 * DAY_MS), STORE)
    return CARD


async def refused(call: Awaitable[Any]) -> PointauthError:
    with pytest.raises(PointauthError) as raised:
        await call
    return raised.value


class Unchanged:
    """`async with Unchanged(...)`: the member's stored account and events are as before."""

    def __init__(self, redis: Redis, keyspace: Keyspace, account_id: str = "member-1") -> None:
        self.redis, self.keyspace, self.account_id = redis, keyspace, account_id

    async def snapshot(self) -> tuple[Any, Any]:
        return (
            await account_state(self.redis, self.keyspace, self.account_id),
            await stream_events(self.redis, self.keyspace, self.account_id),
        )

    async def __aenter__(self) -> None:
        self.before = await self.snapshot()

    async def __aexit__(self, *exc: object) -> None:
        if exc[0] is None:
            assert await self.snapshot() == self.before


def denied(error: PointauthError, reason: str) -> None:
    assert isinstance(error, PermissionDeniedError), error
    assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, reason)


async def test_a_till_sells_at_its_own_company_only(
    as_: Connect, member: str, clock: ManualClock, redis: Redis, keyspace: Keyspace
) -> None:
    async with as_("till-acme") as till:
        earned = await till.earn_points(member, STORE, 1000, at(clock.now_ms()))
        hold = await till.authorize_hold(member, STORE, 100)
        await till.capture_hold(hold.hold_id, 60)
        assert (await till.get_balance(member)).balance.available_points == 1000 + earned.earned_points - 60
        async with Unchanged(redis, keyspace):
            other_store = await refused(till.redeem_points(member, PARTNER_STORE, 10))
            grant = await refused(till.grant_points(member, 10, at(clock.now_ms() + DAY_MS), STORE))
    denied(other_store, "COMPANY_NOT_ALLOWED")
    assert other_store.metadata == {"field": "point_of_sale.company_id", "company_id": "acme"}
    # A point of sale naming no company is a request to mend, not another company's.
    async with as_("till-acme") as till, Unchanged(redis, keyspace):
        no_company = await refused(
            till.redeem_points(
                member,
                PointOfSale(company_id="", store_id="store-1", terminal_id="till-1", channel=Channel.CHANNEL_STORE),
                10,
            )
        )
    assert (no_company.code, no_company.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert no_company.message == "invalid request: point_of_sale.company_id"
    denied(grant, "METHOD_NOT_ALLOWED")
    assert grant.metadata == {"role": "till", "method": "AdminService/GrantPoints"}


async def test_permission_is_decided_before_anything_is_looked_up(as_: Connect, member: str) -> None:
    async with as_("till-acme") as till, as_("kiosk-1") as kiosk:
        # An unknown card at another company's store: not CARD_NOT_FOUND, which would tell.
        denied(await refused(till.redeem_points("4999999999999999", PARTNER_STORE, 1)), "COMPANY_NOT_ALLOWED")
        denied(await refused(kiosk.refund_transaction("nobody.1", 1)), "METHOD_NOT_ALLOWED")
        # What the kiosk may call answers as usual.
        assert isinstance(await refused(kiosk.get_receipt("nobody.1")), NotFoundError)


async def test_a_kiosk_reads_and_blocks_cards_but_moves_no_points(
    as_: Connect, member: str, redis: Redis, keyspace: Keyspace
) -> None:
    async with as_("kiosk-1") as kiosk:
        assert (await kiosk.get_balance(member)).balance.available_points == 1000
        assert (await kiosk.get_account(card_number=member)).account_id == "member-1"
        async with Unchanged(redis, keyspace):
            redeem = await refused(kiosk.redeem_points(member, STORE, 10))
        await kiosk.block_card(member)
        unblock = await refused(kiosk.unblock_card(member))
    denied(redeem, "METHOD_NOT_ALLOWED")
    denied(unblock, "METHOD_NOT_ALLOWED")
    async with as_("operator-1") as operator:
        assert (await operator.get_account(card_number=member)).cards[0].state == 2  # still BLOCKED
        await operator.unblock_card(member)


async def test_an_operator_administers_but_does_not_sell(
    as_: Connect, member: str, clock: ManualClock, redis: Redis, keyspace: Keyspace
) -> None:
    async with as_("operator-1") as operator:
        await operator.register_company("globex", display_name="Globex")
        assert (await operator.get_balance(member)).balance.available_points == 1000
        async with Unchanged(redis, keyspace):
            earn = await refused(operator.earn_points(member, STORE, 1000, at(clock.now_ms())))
    denied(earn, "METHOD_NOT_ALLOWED")


async def test_an_auditor_only_reads(
    as_: Connect, member: str, clock: ManualClock, redis: Redis, keyspace: Keyspace
) -> None:
    async with as_("auditor-1") as auditor:
        companies = [c.company_id for c in await auditor.list_companies()]
        assert (await auditor.get_balance(member)).balance.available_points == 1000
        assert (await auditor.get_account(account_id="member-1")).account_id == "member-1"
        register = await refused(auditor.register_company("globex"))
        async with Unchanged(redis, keyspace):
            grant = await refused(auditor.grant_points(member, 10, at(clock.now_ms() + DAY_MS), STORE))
            block = await refused(auditor.block_card(member))
        assert [c.company_id for c in await auditor.list_companies()] == companies  # nothing registered
    for error in (register, grant, block):
        denied(error, "METHOD_NOT_ALLOWED")
    assert "globex" not in companies


async def test_a_partner_calls_its_scope_only(as_: Connect, member: str, redis: Redis, keyspace: Keyspace) -> None:
    async with as_("partner-1") as partner:
        assert (await partner.get_balance(member)).balance.available_points == 1000
        async with Unchanged(redis, keyspace):
            redeem = await refused(partner.redeem_points(member, PARTNER_STORE, 10))
    denied(redeem, "METHOD_NOT_ALLOWED")
    assert redeem.metadata == {"role": "partner", "method": "PointsService/RedeemPoints"}


async def _until(check: Callable[[], Awaitable[bool]], seconds: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "not within the reload interval"
        await asyncio.sleep(0.05)


async def test_a_credential_revoked_while_the_server_runs_is_refused(
    secured: PointauthServer, as_: Connect, member: str, redis: Redis, keyspace: Keyspace
) -> None:
    async with as_("till-acme") as till:
        assert (await till.get_balance(member)).balance.available_points == 1000
        assert revoke_command(secured.settings, "till-acme") == 0

        async def revoked() -> bool:
            try:
                await till.get_balance(member)
            except UnauthenticatedError as error:
                return error.reason == "CREDENTIAL_REVOKED"
            return False

        await _until(revoked)
        async with Unchanged(redis, keyspace):
            error = await refused(till.redeem_points(member, STORE, 10))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "CREDENTIAL_REVOKED")
    async with as_("kiosk-1") as kiosk:  # the others are untouched
        assert (await kiosk.get_balance(member)).balance.available_points == 1000


async def test_a_credential_issued_while_the_server_runs_works_at_its_first_call(
    secured: PointauthServer, pki: Pki, member: str, transport: str
) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert issue_command(secured.settings, "kiosk-2", "kiosk") == 0
    api_key = out.getvalue().strip()
    assert api_key.startswith("kiosk-2.")
    stored = await asyncio.to_thread(Path(secured.settings.auth.credentials_file).read_text)
    assert api_key not in stored
    address = f"127.0.0.1:{secured.port}"
    # Under mTLS a key still needs a certificate our CA signed, whatever its identity.
    tls = (
        ClientTLS.from_files(pki.ca_cert, pki.client_cert("stranger"), pki.client_key("stranger"))
        if transport == "mtls"
        else ClientTLS.from_files(pki.ca_cert)
    )
    async with PointsClient(address, tls=tls, api_key=api_key) as kiosk:
        # At once: a key the server does not know makes it look at the file before refusing.
        assert (await kiosk.get_balance(member)).balance.available_points == 1000


async def test_a_bad_or_missing_credential_is_unauthenticated_with_one_error_info(
    secured: PointauthServer, pki: Pki, member: str, transport: str, redis: Redis, keyspace: Keyspace
) -> None:
    address = f"127.0.0.1:{secured.port}"
    stranger = ClientTLS.from_files(pki.ca_cert, pki.client_cert("stranger"), pki.client_key("stranger"))
    cases = {"wrong key": (stranger, KEYS["operator-1"] + "x"), "no credential": (stranger, None)}
    if transport != "mtls":
        cases["no key"] = (ClientTLS.from_files(pki.ca_cert), None)
    outcomes = {}
    async with Unchanged(redis, keyspace):
        for case, (tls, key) in cases.items():
            async with PointsClient(address, tls=tls, api_key=key) as caller:
                error = await refused(caller.redeem_points(member, STORE, 10))
                outcomes[case] = (error.code, error.reason)
    expected = {
        "wrong key": "CREDENTIALS_INVALID",
        # Under mTLS the stranger's certificate is verified, but no credential names it.
        "no credential": "CREDENTIALS_INVALID" if transport == "mtls" else "CREDENTIALS_MISSING",
        "no key": "CREDENTIALS_MISSING",
    }
    assert outcomes == {case: (grpc.StatusCode.UNAUTHENTICATED, expected[case]) for case in cases}


async def test_the_wire_carries_one_error_info_and_a_malformed_body_is_unauthenticated_first(
    secured: PointauthServer, pki: Pki, transport: str
) -> None:
    credentials = ClientTLS.from_files(pki.ca_cert, pki.client_cert("stranger"), pki.client_key("stranger"))
    async with grpc.aio.secure_channel(f"127.0.0.1:{secured.port}", credentials.channel_credentials()) as channel:
        call: Any = channel.unary_unary("/pointauth.v1.PointsService/GetBalance")
        for metadata, reason in [((), "CREDENTIALS_INVALID" if transport == "mtls" else "CREDENTIALS_MISSING"),
                                 ((("authorization", f"Bearer {KEYS['kiosk-1']}"),), "MALFORMED_REQUEST")]:  # fmt: skip
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call(b"\xff\xff\xff", metadata=metadata)
            assert [i.reason for i in error_infos(raised.value)] == [reason]


async def test_health_is_answered_without_credentials(secured: PointauthServer, pki: Pki) -> None:
    credentials = ClientTLS.from_files(pki.ca_cert, pki.client_cert("stranger"), pki.client_key("stranger"))
    async with grpc.aio.secure_channel(f"127.0.0.1:{secured.port}", credentials.channel_credentials()) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_no_plaintext_and_no_foreign_certificates(
    secured: PointauthServer, pki: Pki, foreign_pki: Pki, transport: str
) -> None:
    address = f"127.0.0.1:{secured.port}"
    callers = [
        PointsClient(address, plaintext=True, api_key=KEYS["operator-1"], timeout=2),
        # A server certificate of another CA is not trusted by the client ...
        PointsClient(address, tls=ClientTLS.from_files(foreign_pki.ca_cert), api_key=KEYS["operator-1"], timeout=2),
    ]
    if transport == "mtls":
        # ... nor, under mTLS, a client without a certificate, or with one of another CA.
        callers.append(
            PointsClient(address, tls=ClientTLS.from_files(pki.ca_cert), api_key=KEYS["operator-1"], timeout=2)
        )
        foreign = ClientTLS.from_files(
            pki.ca_cert, foreign_pki.client_cert("till-acme"), foreign_pki.client_key("till-acme")
        )
        callers.append(PointsClient(address, tls=foreign, timeout=2))
    for caller in callers:
        async with caller:
            assert isinstance(await refused(caller.get_balance(CARD)), UnavailableError)


async def test_each_credential_is_rate_limited(
    settings: Settings,
    clock: ManualClock,
    redis: Redis,
    group: tuple[Entry, ...],
    pki: Pki,
    tmp_path: Path,
) -> None:
    path = tmp_path / "credentials.toml"
    slow = msgspec.structs.replace(CREDENTIALS[1], rate_per_second=1)
    write_credentials_atomically(path, encode_credentials([slow, CREDENTIALS[2]]))
    secure = secured_settings(settings, pki, path, mtls=False, burst=3)
    async with (
        PointauthServer(secure, clock, sweeper=False) as server,
        connect(server, pki, "kiosk-1", "tls+key") as kiosk,
        connect(server, pki, "operator-1", "tls+key") as operator,
    ):
        outcomes = []
        for _ in range(4):
            try:
                await kiosk.get_balance(CARD)
            except PointauthError as error:
                outcomes.append(error)
        # Three (the burst) get as far as the ledger (no such card); the fourth is refused.
        assert [e.reason for e in outcomes] == ["CARD_NOT_FOUND"] * 3 + ["RATE_LIMITED"]
        limited = outcomes[-1]
        assert isinstance(limited, OverloadedError)
        assert limited.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert limited.retry_delay is not None
        assert 0 < limited.retry_delay <= 1.0
        assert limited.metadata["retry_delay_ms"] == str(round(limited.retry_delay * 1000))
        # Another credential has its own bucket.
        assert isinstance(await refused(operator.get_balance(CARD)), NotFoundError)


async def test_the_load_driver_speaks_tls_with_a_credential(
    secured: PointauthServer, pki: Pki, member: str, transport: str
) -> None:
    if transport == "mtls":
        tls, key = ClientTLS.from_files(pki.ca_cert, pki.client_cert("kiosk-1"), pki.client_key("kiosk-1")), ""
    else:
        tls, key = ClientTLS.from_files(pki.ca_cert), KEYS["kiosk-1"]
    step = Step(
        "balance", f"127.0.0.1:{secured.port}", loops=2, warmup_s=0, duration_s=0.3,
        population=Population(1, card_format=member), channels=1, tls=tls, api_key=key,
    )  # fmt: skip
    result = await run_step(step)
    assert (result.errors, result.error_samples) == (0, [])
    assert result.ok > 0
    stranger = ClientTLS.from_files(pki.ca_cert, pki.client_cert("stranger"), pki.client_key("stranger"))
    refused = await run_step(dataclasses.replace(step, tls=stranger, api_key=""))
    assert refused.ok == 0
    assert refused.error_samples[0].startswith("UNAUTHENTICATED")


async def test_every_serve_process_takes_a_revocation(
    stack: EmbeddedStack, redis: Redis, pki: Pki, credentials_file: Path, tmp_path: Path
) -> None:
    """`pointauth serve --workers 2` over mTLS: each process reads the file; a revocation reaches
    every one (new connections spread over them by SO_REUSEPORT)."""
    env = {
        **os.environ,
        "POINTAUTH__REDIS__URL": stack.redis.url,
        "POINTAUTH__LEDGER__SHARDS": "16",
        "POINTAUTH__TLS__CERT_FILE": str(pki.server_cert),
        "POINTAUTH__TLS__KEY_FILE": str(pki.server_key),
        "POINTAUTH__TLS__CLIENT_CA_FILE": str(pki.ca_cert),
        "POINTAUTH__AUTH__CREDENTIALS_FILE": str(credentials_file),
        "POINTAUTH__AUTH__RELOAD_SECONDS": "0.1",
    }
    till = ClientTLS.from_files(pki.ca_cert, pki.client_cert("till-acme"), pki.client_key("till-acme"))
    stranger = ClientTLS.from_files(pki.ca_cert, pki.client_cert("stranger"), pki.client_key("stranger"))

    async def outcomes(port: int) -> set[str]:
        reasons = set()
        for _ in range(8):  # a connection each
            async with PointsClient(f"127.0.0.1:{port}", tls=till) as caller:
                reasons.add((await refused(caller.get_balance(CARD))).reason)
        return reasons

    log = tmp_path / "serve.log"
    async with serving(env, log, "--workers", "2", tls=stranger.channel_credentials()) as (port, proc):
        assert await outcomes(port) == {"CARD_NOT_FOUND"}  # authenticated, then looked up
        settings = load_settings(None, env={"POINTAUTH__AUTH__CREDENTIALS_FILE": str(credentials_file)})
        with contextlib.redirect_stderr(io.StringIO()):
            assert revoke_command(settings, "till-acme") == 0
        await asyncio.sleep(0.5)
        assert await outcomes(port) == {"CREDENTIAL_REVOKED"}
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    assert "pointauth listening on 127.0.0.1" in log.read_text()
    assert "(mTLS, auth on)" in log.read_text()
