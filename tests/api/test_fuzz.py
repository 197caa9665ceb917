"""Fuzzing the API: a few thousand random and mutated requests to every RPC of every service, from
every role and from callers without credentials, over real TLS to a real server against real
Redis and PostgreSQL, in a small seeded world so that many reach the ledger.

Every answer is OK or a proper status (never UNKNOWN or INTERNAL) with exactly one ErrorInfo; the
access guard's answer is the one the roles' rules give; a refused call changes nothing in Redis
(but for what refusals write by design: their idempotency record, the note that carries it to
the journal, and the audit trail's record) nor, for settlement, in PostgreSQL; and at the end
the server still answers, having logged no error. Requests come from Hypothesis, derandomized:
the same ones every run (tests/api/fuzz_requests.py)."""

from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
import importlib
import json
import logging
import pkgutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import msgspec
import pytest
from google.protobuf import text_format
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import strategies as st
from redis.asyncio import Redis

import pointauth.v1
from pointauth.client import ClientTLS, PointsClient
from pointauth.server.api.credentials import write_credentials_atomically
from pointauth.server.app import PointauthServer
from pointauth.server.clock import ManualClock
from pointauth.server.config import ServerSettings, Settings
from pointauth.server.devstack.certificates import Pki, ensure_pki
from pointauth.server.domain.credentials import Credential, Role, encode_credentials, key_sha256, new_api_key
from pointauth.server.domain.group import Entry
from pointauth.server.journal.pg import Connection, connection
from pointauth.server.ledger import Keyspace, codec
from pointauth.v1 import common_pb2
from pointauth.v1 import members_service_pb2 as mpb
from pointauth.v1 import points_service_pb2 as pb
from pointauth.v1 import rules_service_pb2 as rpb
from tests.api.fuzz_requests import FRESH_REQUEST_ID, NOW_S, RequestStrategies, World, examples, mutations
from tests.api.test_access import secured_settings
from tests.api.test_permissions import PARTNER_SCOPE, expected_allowed
from tests.conftest import DAY_MS, STORE, at

# -- who calls ---------------------------------------------------------------------------------

CREDENTIALS = {
    "till": Credential(id="till-acme", role=Role.TILL, company="acme"),
    "kiosk": Credential(id="kiosk-1", role=Role.KIOSK),
    "partner": Credential(id="partner-1", role=Role.PARTNER, company="partner", scope=PARTNER_SCOPE),
    "operator": Credential(id="operator-1", role=Role.OPERATOR),
    "auditor": Credential(id="auditor-1", role=Role.AUDITOR),
}
KEYS = {role: new_api_key(c.id) for role, c in CREDENTIALS.items()}
# Callers without a credential: no key at all, and a key of a real id with a wrong secret.
UNAUTHENTICATED = {"anonymous": "CREDENTIALS_MISSING", "forged": "CREDENTIALS_INVALID"}
CALLERS = (*CREDENTIALS, *UNAUTHENTICATED)


def metadata(caller: str) -> tuple[tuple[str, str], ...]:
    if caller == "anonymous":
        return ()
    key = KEYS["operator"] + "x" if caller == "forged" else KEYS[caller]
    return (("authorization", f"Bearer {key}"),)


# -- every RPC -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rpc:
    name: str  # "Service/Method", as api/permissions.py names it
    request: Descriptor
    response: type[Message]

    @property
    def path(self) -> str:
        return f"/pointauth.v1.{self.name}"


def _rpcs() -> list[Rpc]:
    found = []
    for module in pkgutil.iter_modules(pointauth.v1.__path__):
        if module.name.endswith("_pb2"):
            descriptor = importlib.import_module(f"pointauth.v1.{module.name}").DESCRIPTOR
            for service in descriptor.services_by_name.values():
                found += [
                    Rpc(f"{service.name}/{m.name}", m.input_type, GetMessageClass(m.output_type))
                    for m in service.methods
                ]
    return sorted(found, key=lambda rpc: rpc.name)


RPCS = _rpcs()
EXAMPLES_PER_RPC = 100
PLAUSIBLE_PER_RPC = 20
MAX_MESSAGE_BYTES = ServerSettings().max_message_bytes  # the fuzzed server's (the default)
# Bodies over 4x the limit are dropped by gRPC itself, without an ErrorInfo (tests/api/test_limits.py).
MAX_SENT_BYTES = 2 * MAX_MESSAGE_BYTES


def may_call(caller: str, rpc: str) -> bool:
    return caller in CREDENTIALS and expected_allowed(CREDENTIALS[caller].role, rpc)


@dataclasses.dataclass(frozen=True)
class Case:
    rpc: Rpc
    caller: str
    kind: str  # "message", "plausible", "mutated" or "foreign" (another RPC's request)
    body: bytes
    message: Message | None = None

    def describe(self) -> str:
        if self.message is not None:
            shown = text_format.MessageToString(self.message, as_one_line=True)
        else:
            shown = f"bytes {self.body[:300].hex()}{'...' if len(self.body) > 300 else ''}"
        return f"{self.rpc.name} as {self.caller} ({self.kind}, {len(self.body)} bytes): {shown[:600]}"


def serialized(message: Message) -> bytes:
    # Deterministic: maps in a fixed order (upb's order changes from process to process), so that
    # the same bodies, and the same mutations of them, are sent every run.
    return message.SerializeToString(deterministic=True)


def fresh(case: Case, n: int) -> Case:
    """The case with a request_id of its own where it asked for a fresh one."""
    message: Any = case.message
    if message is None or getattr(message, "request_id", None) != FRESH_REQUEST_ID:
        return case
    message = copy.deepcopy(message)
    message.request_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{case.rpc.name}/{n}"))
    return dataclasses.replace(case, body=serialized(message), message=message)


def corpus(world: World) -> list[Case]:
    """EXAMPLES_PER_RPC cases per RPC, the same every run, interleaved across RPCs."""
    strategies = RequestStrategies(world)
    per_rpc: list[list[Case]] = []
    for rpc in RPCS:
        messages = strategies.message(rpc.request)
        bodies = messages.map(serialized)
        others = st.sampled_from([r for r in RPCS if r.request is not rpc.request]).flatmap(
            lambda other: strategies.message(other.request).map(serialized)
        )
        # Mostly callers the RPC is meant for, so that most calls get past the access guard.
        allowed = [c for c in CALLERS if may_call(c, rpc.name)]
        callers = st.sampled_from([*allowed * 8, *CALLERS])

        def case(rpc: Rpc, callers: Any, messages: Any, bodies: Any, others: Any) -> Any:
            return st.one_of(
                st.tuples(callers, st.just("message"), messages),
                st.tuples(callers, st.just("message"), messages),
                st.tuples(callers, st.just("message"), messages),
                st.tuples(callers, st.just("mutated"), mutations(bodies)),
                st.tuples(callers, st.just("foreign"), others),
            ).map(
                lambda drawn: Case(
                    rpc,
                    drawn[0],
                    drawn[1],
                    serialized(drawn[2]) if isinstance(drawn[2], Message) else drawn[2],
                    drawn[2] if isinstance(drawn[2], Message) else None,
                )
            )

        strategy = case(rpc, callers, messages, bodies, others)
        cases = examples(strategy, EXAMPLES_PER_RPC, rpc.name.replace("/", "_"))
        # And requests as the RPC's own callers send them, to reach deep into the ledger.
        if allowed:
            wellformed = st.tuples(st.sampled_from(allowed), strategies.plausible(rpc.request))
            cases += [
                Case(rpc, caller, "plausible", serialized(message), message)
                for caller, message in examples(wellformed, PLAUSIBLE_PER_RPC, f"{rpc.name.replace('/', '_')}_ok")
            ]
        # Hypothesis draws some examples more than once: an exact repeat (but a plausible request's,
        # which gets a request_id of its own) is sent once.
        unique = {(c.caller, c.body): c for c in (fresh(c, i) for i, c in enumerate(cases))}
        per_rpc.append([c for c in unique.values() if len(c.body) <= MAX_SENT_BYTES])
    interleaved = []
    for i in range(max(map(len, per_rpc))):
        interleaved += [cases[i] for cases in per_rpc if i < len(cases)]
    return interleaved


# -- what a call changed ---------------------------------------------------------------------------

# Every key but the idempotency records (":r:"), as a digest of its value in a canonical order (a
# DUMP of a hash table depends on how far Redis has rehashed it, which reads move on); a stream
# (append only) as its length and last entry id, its new entries read after a refusal.
STATE_SCRIPT = """
local function digest(key, kind)
  local items
  if kind == 'string' then
    return redis.sha1hex(redis.call('GET', key))
  elseif kind == 'hash' then
    local flat = redis.call('HGETALL', key)
    items = {}
    for i = 1, #flat, 2 do items[#items + 1] = flat[i] .. '\0' .. flat[i + 1] end
    table.sort(items)
  elseif kind == 'set' then
    items = redis.call('SMEMBERS', key)
    table.sort(items)
  elseif kind == 'zset' then
    items = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  elseif kind == 'list' then
    items = redis.call('LRANGE', key, 0, -1)
  else
    return redis.sha1hex(redis.call('DUMP', key))
  end
  return redis.sha1hex(table.concat(items, '\1'))
end

local out = {}
for _, key in ipairs(redis.call('KEYS', '*')) do
  if not string.find(key, ':r:', 1, true) then
    local kind = redis.call('TYPE', key)['ok']
    out[#out + 1] = key
    if kind == 'stream' then
      local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
      out[#out + 1] = 'stream ' .. redis.call('XLEN', key) .. ' ' .. (last[1] and last[1][1] or '0-0')
    else
      out[#out + 1] = kind .. ' ' .. digest(key, kind)
    end
  end
end
return out
"""


# What a stream entry may carry that is state: the others are a refusal's idempotency note and
# the audit trail's records, written for refused calls by design.
STATE_ENTRIES = (codec.Event, codec.DirectoryChange, codec.RuleSetPublished)


class RedisState:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.script = redis.register_script(STATE_SCRIPT)

    async def read(self) -> dict[bytes, bytes]:
        flat: list[bytes] = await self.script()
        return dict(zip(flat[::2], flat[1::2], strict=True))

    async def changes(self, before: dict[bytes, bytes], after: dict[bytes, bytes]) -> list[str]:
        """What changed from `before` to `after` but idempotency records, notes and audit records."""
        changed = []
        for key in sorted(before.keys() | after.keys()):
            old, new = before.get(key), after.get(key)
            if old == new:
                continue
            if new is None or not new.startswith(b"stream "):
                changed.append(f"{key!r}: {old!r} -> {new!r}")
                continue
            old_length, old_last = (0, b"0-0") if old is None else (int(old.split()[1]), old.split()[2])
            # Up to the entry `after` saw last: a record written since is the next call's concern.
            new_last = new.split()[2]
            entries: list[tuple[bytes, dict[bytes, bytes]]] = await self.redis.xrange(key, b"(" + old_last, new_last)  # type: ignore[assignment]
            decoded = [(i, codec.decode_stream_entry(f)) for i, f in entries]
            kept = [(i, e) for i, e in decoded if isinstance(e, STATE_ENTRIES)]
            if kept or int(new.split()[1]) != old_length + len(entries):
                changed.append(f"{key!r}: {old!r} -> {new!r}, new entries {kept}")
        return changed


class PostgresState:
    """Every table of the test's schema, as a digest of its rows (settlement writes there)."""

    def __init__(self, conn: Connection, tables: Sequence[str]) -> None:
        self.conn = conn
        self.query = " UNION ALL ".join(
            f"SELECT '{t}', md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {t} t" for t in tables
        )

    @classmethod
    async def open(cls, conn: Connection) -> PostgresState:
        rows = await conn.fetch(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' ORDER BY 1"
        )
        return cls(conn, [r["table_name"] for r in rows])

    async def read(self) -> dict[str, str]:
        return {r[0]: r[1] for r in await self.conn.fetch(self.query)}


# -- the checks --------------------------------------------------------------------------------


def error_details(error: grpc.aio.AioRpcError) -> tuple[status_pb2.Status | None, list[error_details_pb2.ErrorInfo]]:
    status, infos = None, []
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    infos.append(info)
    return status, infos


def expected_refusal(case: Case) -> tuple[grpc.StatusCode, str] | None:
    """The access guard's and the boundary's answer before any handler runs, or None: derived
    from the roles' rules (tests/api/test_permissions.py) and from parsing the body here."""
    if case.caller in UNAUTHENTICATED:
        return grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED[case.caller]
    if not may_call(case.caller, case.rpc.name):
        return grpc.StatusCode.PERMISSION_DENIED, "METHOD_NOT_ALLOWED"
    if len(case.body) > MAX_MESSAGE_BYTES:
        return grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_TOO_LARGE"
    try:
        request: Any = GetMessageClass(case.rpc.request).FromString(case.body)
    except DecodeError:
        return grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST"
    company = CREDENTIALS[case.caller].company
    names_pos = "point_of_sale" in case.rpc.request.fields_by_name and request.HasField("point_of_sale")
    if company and names_pos and request.point_of_sale.company_id not in ("", company):
        return grpc.StatusCode.PERMISSION_DENIED, "COMPANY_NOT_ALLOWED"
    return None


def answer_faults(case: Case, error: grpc.aio.AioRpcError | None, reply: bytes | None) -> list[str]:
    """What is wrong with the answer itself."""
    if error is None:
        assert reply is not None
        try:
            case.rpc.response.FromString(reply)
        except DecodeError as exc:
            return [f"an OK answer that is no {case.rpc.response.__name__}: {exc}"]
        expected = expected_refusal(case)
        return [] if expected is None else [f"OK where {expected[0].name} {expected[1]} was due"]
    code = error.code()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "metadata size exceeds" in (error.details() or ""):
        # The client dropped the answer: its other faults follow from that.
        return [f"trailers over the client's metadata limit: {error.details()}"]
    faults = []
    if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
        faults.append(f"{code.name}: a server fault")
    status, infos = error_details(error)
    if len(infos) != 1:
        faults.append(f"{len(infos)} ErrorInfo in grpc-status-details-bin")
    if status is not None and status.code != code.value[0]:
        faults.append(f"grpc-status-details-bin says code {status.code}, the call {code.name}")
    reason = infos[0].reason if len(infos) == 1 else ""
    expected = expected_refusal(case)
    if expected is not None and (code, reason) != expected:
        faults.append(f"expected {expected[0].name} {expected[1]}")
    if expected is None and code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        faults.append("an access refusal the roles' rules do not give")
    if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        faults.append(f"{code.name}: the server did not answer in time")
    return faults


def outcome(error: grpc.aio.AioRpcError | None) -> str:
    if error is None:
        return "OK"
    _, infos = error_details(error)
    return f"{error.code().name} {infos[0].reason if len(infos) == 1 else '?'}"


class ErrorLog(logging.Handler):
    """Warnings and errors logged while the server runs in this process (it logs a handler's
    unexpected exception as it answers INTERNAL)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info or record.name.startswith("pointauth"):
            self.records.append(record)


def describe(record: logging.LogRecord) -> str:
    cause = ""
    if record.exc_info and record.exc_info[1] is not None:
        cause = f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
    return f"{record.levelname} {record.name}: {record.getMessage()}{cause}"


@pytest.fixture
def error_log() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    logging.getLogger().addHandler(handler)
    try:
        yield handler
    finally:
        logging.getLogger().removeHandler(handler)


# -- the server and its world -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def fuzz_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return ensure_pki(tmp_path_factory.mktemp("fuzz-pki"), [])


@pytest.fixture
async def fuzz_server(
    settings: Settings,
    clock: ManualClock,
    redis: Redis,
    group: tuple[Entry, ...],
    dsn: str,
    fuzz_pki: Pki,
    tmp_path: Path,
) -> AsyncIterator[PointauthServer]:
    path = tmp_path / "credentials.toml"
    credentials = [msgspec.structs.replace(c, key_sha256=key_sha256(KEYS[r])) for r, c in CREDENTIALS.items()]
    write_credentials_atomically(path, encode_credentials(credentials))
    secure = secured_settings(settings, fuzz_pki, path, mtls=False, burst=100_000)
    secure = msgspec.structs.replace(
        secure,
        auth=msgspec.structs.replace(secure.auth, rate_per_second=100_000),
        # Settlement writes statements: in this test's own schema.
        postgres=msgspec.structs.replace(secure.postgres, dsn=dsn),
    )
    async with PointauthServer(secure, clock, sweeper=False) as running:
        yield running


def connect(server: PointauthServer, pki: Pki, caller: str) -> PointsClient:
    return PointsClient(f"127.0.0.1:{server.port}", tls=ClientTLS.from_files(pki.ca_cert), api_key=KEYS[caller])


GLOBEX = common_pb2.PointOfSale(
    company_id="globex", store_id="g-1", terminal_id="till-1", channel=common_pb2.CHANNEL_STORE
)
ACME_EC = common_pb2.PointOfSale(
    company_id="acme", store_id="store-2", terminal_id="web", channel=common_pb2.CHANNEL_EC
)
PARTNER_KIOSK = common_pb2.PointOfSale(
    company_id="partner", store_id="store-9", terminal_id="kiosk-1", channel=common_pb2.CHANNEL_KIOSK
)
RULE_SET = rpb.RuleSet(
    base_rates=[
        rpb.BaseRate(company_id="acme", points=1, per_amount=100),
        rpb.BaseRate(company_id="globex", store_id="g-1", points=2, per_amount=100),
    ],
    campaigns=[
        rpb.Campaign(
            campaign_id="drinks", display_name="Drinks x2", order=1,
            conditions=rpb.CampaignConditions(categories=["drinks"], channels=[common_pb2.CHANNEL_STORE]),
            effect=rpb.CampaignEffect(multiply_basis_points=10_000), lot_kind=common_pb2.LOT_KIND_LIMITED_TIME,
            expire_days=30, max_points_per_member=500, budget_points=10_000,
        ),
        rpb.Campaign(
            campaign_id="thanks", display_name="Thanks",
            conditions=rpb.CampaignConditions(min_amount=5_000),
            effect=rpb.CampaignEffect(coupon=rpb.CouponOffer(display_name="10% off", valid_days=30)),
            max_points_per_member=50,
        ),
        rpb.Campaign(
            campaign_id="gold-bonus", display_name="Gold bonus", order=2,
            conditions=rpb.CampaignConditions(rank_ids=["gold"]), effect=rpb.CampaignEffect(add_points=20),
        ),
    ],
    ranks=rpb.RankProgram(
        tiers=[
            rpb.RankTier(rank_id="regular", display_name="Regular", min_spend=0),
            rpb.RankTier(rank_id="gold", display_name="Gold", min_spend=20_000),
        ],
        period_months=12, downgrade=rpb.RANK_DOWNGRADE_ONE_STEP,
    ),
    visits=[rpb.VisitRule(rule_id="visit", display_name="Visit", points=5, limit=rpb.VISIT_LIMIT_PER_STORE_PER_DAY)],
)  # fmt: skip
BASKET = [
    pb.BasketLine(sku="sku-coffee", category="drinks", quantity=2, amount=600),
    pb.BasketLine(sku="sku-gift", category="gift-cards", quantity=1, amount=5_000, non_earning=True),
    pb.BasketLine(sku="sku-bento", category="food", quantity=1, amount=4_400),
]
# Seeded, and never named by the fuzzer: its balance at the end shows the ledger still works.
SENTINEL_CARD = "SENTINEL-0000001"


async def seed(server: PointauthServer, pki: Pki, clock: ManualClock) -> World:
    """Companies, stores and terminals, a rule set, members with points, an open hold, a captured
    one, a redemption, a coupon and a check-in: ids of each for the fuzzer to aim at."""
    now, later = at(clock.now_ms()), at(clock.now_ms() + 60 * DAY_MS)
    transactions, holds = [], []
    async with connect(server, pki, "operator") as operator, connect(server, pki, "till") as till:
        await operator.register_company("globex", display_name="Globex", point_value=(50, 100))
        await operator.register_store("g-1", company_id="globex", region_id="kansai")
        await operator.register_terminal("g-1", "till-1")
        await operator.register_store("store-2", company_id="acme", region_id="kanto")
        await operator.register_terminal("store-2", "web")
        await operator.publish_rule_set(RULE_SET)
        profile = mpb.MemberProfile(birth_month=11, birth_day=20, home_company_id="acme", attributes={"seg": "a"})
        cards = {f"member-{n}": f"400000000000000{n}" for n in range(1, 6)}
        for account, card in cards.items():
            await operator.create_account(account, card, profile=profile)
        await operator.create_account("sentinel", SENTINEL_CARD)
        for card, points in ((cards["member-1"], 1000), (cards["member-2"], 500)):
            transactions.append((await operator.grant_points(card, points, later, STORE)).transaction_id)
        await operator.grant_points(SENTINEL_CARD, 77, later, STORE)
        await operator.grant_points(cards["member-1"], 300, at(clock.now_ms() + 5 * DAY_MS), GLOBEX)
        await operator.link_card("member-2", "APP-0000000002", kind=mpb.CARD_KIND_APP)
        await operator.block_card(cards["member-3"])
        await operator.close_account("member-5")
        earned = await till.earn_points(cards["member-1"], STORE, 10_000, now, basket=BASKET)
        transactions.append(earned.transaction_id)
        coupons = [c.coupon_id for c in earned.coupons]
        assert coupons, "the rule set's coupon campaign issued none"
        open_hold = await till.authorize_hold(cards["member-1"], STORE, 100)
        captured = await till.authorize_hold(cards["member-2"], ACME_EC, 200)
        holds += [open_hold.hold_id, captured.hold_id]
        transactions.append((await till.capture_hold(captured.hold_id, 150)).transaction_id)
        transactions.append((await till.redeem_points(cards["member-1"], STORE, 50)).transaction_id)
        transactions.append((await till.check_in(cards["member-4"], STORE, now)).transaction_id)
        lot_page = await operator.get_balance(cards["member-1"], page_size=1)
        store_page = await operator.list_stores(page_size=1)
    # Ids of the world, and new ones: an account or store opened, a card linked.
    return World(
        accounts=[*cards, *cards, *(f"new-{n}" for n in range(1, 5))],
        cards=[*cards.values(), *cards.values(), "APP-0000000002", *(f"41000000000000{n:02d}" for n in range(1, 5))],
        companies=["acme", "partner", "globex", "initech"],
        stores=["store-1", "store-2", "store-9", "g-1", "store-n1", "store-n2"],
        terminals=["till-1", "kiosk-1", "web", "till-404"],
        regions=["kanto", "kansai"],
        # Those seeded, and those the fuzzer's own calls are likely to make (ids count up per account).
        transactions=[*transactions, *(f"member-{a}.{n}" for a in range(1, 5) for n in range(1, 25)), "member-404.1"],
        holds=[*holds, "member-1.998"],
        coupons=[*coupons, coupons[0] + "0"],
        rule_ids=["drinks", "thanks", "gold-bonus", "visit", "base"],
        ranks=["regular", "gold", "platinum"],
        skus=["sku-coffee", "sku-gift", "sku-bento"],
        categories=["drinks", "gift-cards", "food"],
        page_tokens=[lot_page.next_page_token, store_page.next_page_token],
        # A few, so that calls repeat ids: replays and mismatches.
        request_ids=[
            "0b8f6d3e-3a4c-4b8e-9a51-5f2c7d9e1a20",
            "5d3c1a2b-0f4e-4c6d-8a9b-1c2d3e4f5a6b",
            "9f8e7d6c-5b4a-4392-8170-6e5d4c3b2a19",
        ],
        points_of_sale=[STORE, STORE, STORE, ACME_EC, ACME_EC, PARTNER_KIOSK, GLOBEX],
    )


# Answers given before the request reaches its handler.
DENIED = ("UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT MALFORMED", "INVALID_ARGUMENT REQUEST_TOO_LARGE")


# -- the test ----------------------------------------------------------------------------------------


async def test_random_and_mutated_requests_get_proper_answers_and_refusals_change_nothing(
    fuzz_server: PointauthServer,
    fuzz_pki: Pki,
    clock: ManualClock,
    redis: Redis,
    dsn: str,
    error_log: ErrorLog,
) -> None:
    world = await seed(fuzz_server, fuzz_pki, clock)
    started = time.monotonic()
    cases = corpus(world)
    generated = time.monotonic()
    faults: list[str] = []
    outcomes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    credentials = ClientTLS.from_files(fuzz_pki.ca_cert).channel_credentials()
    state = RedisState(redis)
    async with (
        grpc.aio.secure_channel(f"127.0.0.1:{fuzz_server.port}", credentials) as channel,
        connection(dsn) as conn,
    ):
        journal = await PostgresState.open(conn)
        before = await state.read()
        for case in cases:
            settles = case.rpc.name.startswith("SettlementService/")
            tables = await journal.read() if settles else {}
            logged = len(error_log.records)
            call: Any = channel.unary_unary(case.rpc.path)  # bytes in, bytes out
            error, reply = None, None
            try:
                reply = await call(case.body, metadata=metadata(case.caller), timeout=10)
            except grpc.aio.AioRpcError as raised:
                error = raised
            outcomes[case.rpc.name][outcome(error)] += 1
            problems = answer_faults(case, error, reply)
            after = await state.read()
            if error is not None:
                problems += await state.changes(before, after)
                if settles and await journal.read() != tables:
                    problems.append("PostgreSQL changed")
            # (The interceptors may log after the answer: by now, the state read above let them.)
            problems += [f"the server logged {describe(r)}" for r in error_log.records[logged:]]
            if problems:
                answer = "OK" if error is None else f"{outcome(error)}: {error.details()}"
                faults.append(f"{case.describe()}\n    answer: {answer}\n    " + "\n    ".join(problems))
            before = after
        sent = time.monotonic()

        # Still up: health, and the untouched member's balance.
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    async with connect(fuzz_server, fuzz_pki, "till") as till:
        assert (await till.get_balance(SENTINEL_CARD)).balance.available_points == 77

    summary = [f"{len(cases)} requests: generated in {generated - started:.1f} s, sent in {sent - generated:.1f} s"]
    summary.append(f"  by caller: {dict(collections.Counter(c.caller for c in cases))}")
    summary.append(f"  by kind: {dict(collections.Counter(c.kind for c in cases))}")
    summary += [f"  {rpc}: {dict(counts.most_common())}" for rpc, counts in sorted(outcomes.items())]
    print("\n".join(summary))
    assert not faults, f"{len(faults)} faulty answers:\n" + "\n".join(faults[:40])
    assert not error_log.records, "the server logged:\n" + "\n".join(map(describe, error_log.records[:40]))
    # The fuzzer reached past the guard into every RPC, and some calls of most RPCs succeeded.
    reached = {rpc for rpc, counts in outcomes.items() if any(not o.startswith(DENIED) for o in counts)}
    assert reached == {rpc.name for rpc in RPCS}
    succeeded = {rpc for rpc, counts in outcomes.items() if counts["OK"]}
    assert len(succeeded) >= len(RPCS) * 3 // 4, sorted({rpc.name for rpc in RPCS} - succeeded)


# -- server bugs the fuzzer found, fixed: their reproductions ---------------------------------------


async def audit_records(redis: Redis, keyspace: Keyspace) -> list[codec.AuditRecord]:
    """The audit trail's records in shard 0's stream."""
    entries: list[tuple[bytes, dict[bytes, bytes]]] = await redis.xrange(keyspace.events(0))  # type: ignore[assignment]
    decoded = [codec.decode_stream_entry(fields) for _, fields in entries]
    return [e for e in decoded if isinstance(e, codec.AuditRecord)]


async def raw_call(
    server: PointauthServer, pki: Pki, caller: str, rpc: str, request: Message
) -> grpc.aio.AioRpcError | None:
    credentials = ClientTLS.from_files(pki.ca_cert).channel_credentials()
    async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
        call: Any = channel.unary_unary(f"/pointauth.v1.{rpc}")
        try:
            await call(request.SerializeToString(), metadata=metadata(caller), timeout=5)
        except grpc.aio.AioRpcError as error:
            return error
    return None


async def test_a_refusal_is_audited_whatever_timestamp_the_request_holds(
    fuzz_server: PointauthServer, fuzz_pki: Pki, redis: Redis, keyspace: Keyspace, error_log: ErrorLog
) -> None:
    request = pb.CaptureHoldRequest(points=1, purchase_time=Timestamp(seconds=NOW_S, nanos=-1))
    error = await raw_call(fuzz_server, fuzz_pki, "anonymous", "PointsService/CaptureHold", request)
    assert error is not None
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    for _ in range(100):  # the record may be written just after the answer
        if records := await audit_records(redis, keyspace):
            break
        await asyncio.sleep(0.01)
    assert [(r.method, r.code, r.reason) for r in records] == [
        ("/pointauth.v1.PointsService/CaptureHold", "UNAUTHENTICATED", "CREDENTIALS_MISSING")
    ]
    # JSON can't print nanos -1: the request is kept in protobuf's text format instead.
    text = f"points: 1 purchase_time {{ seconds: {NOW_S} nanos: -1 }}"
    assert json.loads(records[0].request) == {"text_format": text}
    assert not error_log.records, [describe(r) for r in error_log.records]


async def test_an_invalid_request_with_many_bad_fields_is_answered_invalid_argument(
    fuzz_server: PointauthServer, fuzz_pki: Pki
) -> None:
    lines = [pb.BasketLine(sku="sku-coffee", category="drinks", quantity=1, amount=-1)] * 500  # at the limit
    request = pb.SimulateEarnRequest(
        point_of_sale=STORE, purchase_amount=1000, purchase_time=Timestamp(seconds=NOW_S), basket=lines
    )
    error = await raw_call(fuzz_server, fuzz_pki, "till", "PointsService/SimulateEarn", request)
    assert error is not None
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert [i.reason for i in error_details(error)[1]] == ["INVALID_ARGUMENT"]
    # The first 20 violations are named; the metadata counts them all, the 500 lines' and
    # purchase_amount's (not the lines' sum), and the answer stays small.
    _, infos = error_details(error)
    assert infos[0].metadata["violations"] == "501"
    named = ", ".join(f"basket[{i}].amount" for i in range(20))
    assert error.details() == f"invalid request: {named} and 481 more"
