"""GroupService through gRPC against real Redis: registering and listing the group directory,
every refusal (and that it changed nothing), the tills' point-of-sale check, and a change made
through one server process reaching another."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import msgspec
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from redis.asyncio import Redis

from pointauth.client import PointauthError, PointsClient, new_request_id
from pointauth.server.api.group import page_token
from pointauth.server.app import PointauthServer
from pointauth.server.clock import ManualClock
from pointauth.server.config import GroupSettings, Settings
from pointauth.server.ledger import Keyspace, codec
from pointauth.v1 import common_pb2
from pointauth.v1 import group_service_pb2 as gpb
from tests.conftest import CARD, DAY_MS, GROUP, START_MS, STORE, at
from tests.helpers import account_state


def pos(company_id: str, store_id: str, terminal_id: str) -> common_pb2.PointOfSale:
    return common_pb2.PointOfSale(
        company_id=company_id, store_id=store_id, terminal_id=terminal_id, channel=common_pb2.CHANNEL_STORE
    )


async def snapshot(redis: Redis) -> dict[bytes, object]:
    """Every key and its value, streams included: a refusal here writes nothing at all, but for
    the audit trail's record of it (an operator action is recorded whatever its outcome)."""
    out: dict[bytes, object] = {}
    keys: list[bytes] = await redis.keys("*")  # type: ignore[assignment]  # replies are bytes
    for key in sorted(keys):
        kind = await redis.type(key)
        if kind == b"hash":
            out[key] = await redis.hgetall(key)
        elif kind == b"zset":
            out[key] = await redis.zrange(key, 0, -1, withscores=True)
        elif kind == b"stream":
            entries: Any = await redis.xrange(key)
            out[key] = [(entry_id, fields) for entry_id, fields in entries if codec.AUDIT_FIELD not in fields]
        else:
            out[key] = await redis.get(key)
    return out


async def refusal(call: Awaitable[object]) -> PointauthError:
    with pytest.raises(PointauthError) as raised:
        await call
    return raised.value


def error_infos(error: grpc.aio.AioRpcError) -> list[error_details_pb2.ErrorInfo]:
    infos = []
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            assert isinstance(value, bytes)
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    infos.append(info)
    return infos


async def raw_call(server: PointauthServer, method: str, request: Message | bytes) -> grpc.aio.AioRpcError:
    """The call's error as the wire has it (the SDK keeps one ErrorInfo; this counts them)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call: Any = channel.unary_unary(
            f"/pointauth.v1.GroupService/{method}",
            request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
            response_deserializer=lambda raw: raw,
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(request)
    return raised.value


# -- registering and listing ---------------------------------------------------------------------


async def test_registered_entries_are_listed_by_id(client: PointsClient) -> None:
    company = await client.register_company("zeta", display_name="Zeta Mart", point_value=(50, 100))
    assert (company.company_id, company.display_name) == ("zeta", "Zeta Mart")
    assert (company.point_value.yen, company.point_value.points) == (50, 100)
    store = await client.register_store("z-02", company_id="zeta", region_id="tohoku", display_name="Zeta Sendai")
    assert (store.store_id, store.company_id, store.region_id, store.display_name) == (
        "z-02", "zeta", "tohoku", "Zeta Sendai",
    )  # fmt: skip
    await client.register_store("z-01", company_id="zeta", region_id="kanto")
    terminal = await client.register_terminal("z-01", "till-2", display_name="Till 2")
    assert (terminal.store_id, terminal.terminal_id, terminal.display_name) == ("z-01", "till-2", "Till 2")
    await client.register_terminal("z-01", "kiosk-1")

    companies = await client.list_companies()
    assert [(c.company_id, c.display_name, c.point_value.yen, c.point_value.points) for c in companies] == [
        ("acme", "Acme Retail", 1, 1), ("partner", "Partner Foods", 1, 1), ("zeta", "Zeta Mart", 50, 100),
    ]  # fmt: skip
    every = await client.list_stores()
    assert [(s.store_id, s.company_id, s.region_id) for s in every.stores] == [
        ("store-1", "acme", "kanto"), ("store-9", "partner", "kansai"), ("z-01", "zeta", "kanto"),
        ("z-02", "zeta", "tohoku"),
    ]  # fmt: skip
    assert every.next_page_token == ""
    zeta = await client.list_stores("zeta")
    assert [s.store_id for s in zeta.stores] == ["z-01", "z-02"]
    terminals = await client.list_terminals("z-01")
    assert [(t.store_id, t.terminal_id, t.display_name) for t in terminals] == [
        ("z-01", "kiosk-1", ""), ("z-01", "till-2", "Till 2"),
    ]  # fmt: skip
    assert await client.list_terminals("z-02") == []


async def test_stores_are_listed_in_pages(client: PointsClient) -> None:
    for n in range(7):
        await client.register_store(f"a-{n:02d}", company_id="acme", region_id="kanto")

    pages: list[list[str]] = []
    token = ""
    while True:
        page = await client.list_stores("acme", page_size=3, page_token=token)
        pages.append([s.store_id for s in page.stores])
        token = page.next_page_token
        if not token:
            break
    assert pages == [["a-00", "a-01", "a-02"], ["a-03", "a-04", "a-05"], ["a-06", "store-1"]]

    # A page of every company's stores continues across companies, by store id.
    first = await client.list_stores(page_size=8)
    assert [s.store_id for s in first.stores][-2:] == ["a-06", "store-1"]
    rest = await client.list_stores(page_token=first.next_page_token)
    assert ([s.store_id for s in rest.stores], rest.next_page_token) == (["store-9"], "")
    # Exactly a page: the last page names no next one.
    exact = await client.list_stores("partner", page_size=1)
    assert ([s.store_id for s in exact.stores], exact.next_page_token) == (["store-9"], "")
    # A store registered between pages shows on the page it sorts into.
    second_page = (await client.list_stores("acme", page_size=3)).next_page_token
    await client.register_store("a-035", company_id="acme", region_id="kanto")
    assert [s.store_id for s in (await client.list_stores("acme", page_size=3, page_token=second_page)).stores] == [
        "a-03", "a-035", "a-04",
    ]  # fmt: skip


async def test_registering_again_updates_in_place_and_an_identical_entry_writes_nothing(
    client: PointsClient, redis: Redis, keyspace: Keyspace
) -> None:
    keys = keyspace.directory()

    async def changes() -> list[Any]:
        """The directory's changes in its stream (which has the audit trail's records too)."""
        entries: Any = await redis.xrange(keys.events)
        return [fields for _, fields in entries if codec.DIRECTORY_FIELD in fields]

    version = int(await redis.get(keys.version) or 0)
    stream_length = len(await changes())
    await client.register_store("store-1", company_id="acme", region_id="kanto", display_name="Acme Shinjuku")
    assert (int(await redis.get(keys.version) or 0), len(await changes())) == (version, stream_length)

    await client.register_store("store-1", company_id="acme", region_id="kansai", display_name="Acme Namba")
    assert (int(await redis.get(keys.version) or 0), len(await changes())) == (version + 1, stream_length + 1)
    stores = (await client.list_stores("acme")).stores
    assert [(s.store_id, s.region_id, s.display_name) for s in stores] == [("store-1", "kansai", "Acme Namba")]
    # The hash and the stream entry hold the same entry, at the version the key now has.
    stored = codec.decode_store(await redis.hget(keys.stores, "store-1"))  # type: ignore[arg-type]
    assert stored == codec.StoreEntry("store-1", "acme", "kansai", "Acme Namba")
    assert codec.decode_stream_entry((await changes())[-1]) == codec.DirectoryChange(version + 1, START_MS, stored)


# -- refusals of registrations and lists ---------------------------------------------------------

REFUSED_REGISTRATIONS = [
    (
        "store of an unknown company",
        "RegisterStore",
        gpb.RegisterStoreRequest(store=gpb.Store(store_id="store-2", company_id="nobody", region_id="kanto")),
        grpc.StatusCode.NOT_FOUND,
        "COMPANY_NOT_FOUND",
        {"field": "store.company_id"},
    ),
    (
        "store moved to another company",
        "RegisterStore",
        gpb.RegisterStoreRequest(store=gpb.Store(store_id="store-1", company_id="partner", region_id="kanto")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "STORE_OF_OTHER_COMPANY",
        {"field": "store.company_id", "store_company_id": "acme"},
    ),
    (
        "terminal of an unknown store",
        "RegisterTerminal",
        gpb.RegisterTerminalRequest(terminal=gpb.Terminal(store_id="store-404", terminal_id="till-1")),
        grpc.StatusCode.NOT_FOUND,
        "STORE_NOT_FOUND",
        {"field": "terminal.store_id"},
    ),
    (
        "stores of an unknown company",
        "ListStores",
        gpb.ListStoresRequest(company_id="nobody"),
        grpc.StatusCode.NOT_FOUND,
        "COMPANY_NOT_FOUND",
        {"field": "company_id"},
    ),
    (
        "terminals of an unknown store",
        "ListTerminals",
        gpb.ListTerminalsRequest(store_id="store-404"),
        grpc.StatusCode.NOT_FOUND,
        "STORE_NOT_FOUND",
        {"field": "store_id"},
    ),
]


@pytest.mark.parametrize(
    ("case", "method", "request_message", "code", "reason", "metadata"),
    REFUSED_REGISTRATIONS,
    ids=[c[0] for c in REFUSED_REGISTRATIONS],
)
async def test_a_refused_registration_has_one_error_info_and_changes_nothing(
    server: PointauthServer,
    redis: Redis,
    case: str,
    method: str,
    request_message: Message,
    code: grpc.StatusCode,
    reason: str,
    metadata: dict[str, str],
) -> None:
    before = await snapshot(redis)
    error = await raw_call(server, method, request_message)
    assert error.code() == code
    assert [(i.reason, i.domain, dict(i.metadata)) for i in error_infos(error)] == [(reason, "pointauth.v1", metadata)]
    assert await snapshot(redis) == before
    assert server.directory.current.version == len(GROUP)  # one change per entry registered


BAD_INPUT = [
    ("company id missing", "RegisterCompany", gpb.RegisterCompanyRequest(), {"company.company_id"}),
    (
        "company id a placeholder",
        "RegisterCompany",
        gpb.RegisterCompanyRequest(company=gpb.Company(company_id="null")),
        {"company.company_id"},
    ),
    (
        "company name of 201 characters",
        "RegisterCompany",
        gpb.RegisterCompanyRequest(company=gpb.Company(company_id="c-1", display_name="x" * 201)),
        {"company.display_name"},
    ),
    (
        "point value per 10 points, and negative",
        "RegisterCompany",
        gpb.RegisterCompanyRequest(
            company=gpb.Company(company_id="c-1", point_value=gpb.PointValue(yen=-1, points=10))
        ),
        {"company.point_value.yen", "company.point_value.points"},
    ),
    (
        "point value over a million yen",
        "RegisterCompany",
        gpb.RegisterCompanyRequest(
            company=gpb.Company(company_id="c-1", point_value=gpb.PointValue(yen=1_000_001, points=1))
        ),
        {"company.point_value.yen"},
    ),
    (
        "store id, company and region bad",
        "RegisterStore",
        gpb.RegisterStoreRequest(store=gpb.Store(store_id="-s", company_id="a" * 65, region_id="")),
        {"store.store_id", "store.company_id", "store.region_id"},
    ),
    (
        "region not an id",
        "RegisterStore",
        gpb.RegisterStoreRequest(store=gpb.Store(store_id="store-2", company_id="acme", region_id="kan to")),
        {"store.region_id"},
    ),
    (
        "store name of 201 characters",
        "RegisterStore",
        gpb.RegisterStoreRequest(
            store=gpb.Store(store_id="store-2", company_id="acme", region_id="kanto", display_name="店" * 201)
        ),
        {"store.display_name"},
    ),
    (
        "terminal ids bad",
        "RegisterTerminal",
        gpb.RegisterTerminalRequest(terminal=gpb.Terminal(store_id="", terminal_id="till 1")),
        {"terminal.store_id", "terminal.terminal_id"},
    ),
    (
        "terminal name of 201 characters",
        "RegisterTerminal",
        gpb.RegisterTerminalRequest(
            terminal=gpb.Terminal(store_id="store-1", terminal_id="till-2", display_name="t" * 201)
        ),
        {"terminal.display_name"},
    ),
    ("page size negative", "ListStores", gpb.ListStoresRequest(page_size=-1), {"page_size"}),
    ("page size over 1,000", "ListStores", gpb.ListStoresRequest(page_size=1001), {"page_size"}),
    ("page token not ours", "ListStores", gpb.ListStoresRequest(page_token="not-a-token"), {"page_token"}),
    (
        "page token of another company's list",
        "ListStores",
        gpb.ListStoresRequest(company_id="partner", page_token=page_token("acme", "store-1")),
        {"page_token"},
    ),
    ("company filter not an id", "ListStores", gpb.ListStoresRequest(company_id="a/b"), {"company_id"}),
    ("terminals of no store", "ListTerminals", gpb.ListTerminalsRequest(), {"store_id"}),
]


@pytest.mark.parametrize(("case", "method", "request_message", "fields"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
async def test_bad_input_is_invalid_argument_naming_the_field_and_changes_nothing(
    server: PointauthServer, redis: Redis, case: str, method: str, request_message: Message, fields: set[str]
) -> None:
    before = await snapshot(redis)
    error = await raw_call(server, method, request_message)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [i.reason for i in error_infos(error)] == ["INVALID_ARGUMENT"]
    details: Any = dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    violations = set()
    for detail in status_pb2.Status.FromString(details).details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            violations |= {v.field for v in bad.field_violations}
    assert violations == fields
    assert await snapshot(redis) == before


async def test_a_body_that_is_not_protobuf_is_malformed(server: PointauthServer) -> None:
    for method in ("RegisterStore", "ListStores"):
        error = await raw_call(server, method, b"\x0a\x05ab")
        assert (error.code(), [i.reason for i in error_infos(error)]) == (
            grpc.StatusCode.INVALID_ARGUMENT, ["MALFORMED_REQUEST"],
        )  # fmt: skip


# -- the tills' check ----------------------------------------------------------------------------

WRONG_POINTS_OF_SALE = [
    (
        "unknown company",
        pos("nobody", "store-1", "till-1"),
        grpc.StatusCode.NOT_FOUND,
        "COMPANY_NOT_FOUND",
        {"field": "point_of_sale.company_id"},
    ),
    (
        "unknown store",
        pos("acme", "store-404", "till-1"),
        grpc.StatusCode.NOT_FOUND,
        "STORE_NOT_FOUND",
        {"field": "point_of_sale.store_id"},
    ),
    (
        "store of another company",
        pos("acme", "store-9", "kiosk-1"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "STORE_OF_OTHER_COMPANY",
        {"field": "point_of_sale.store_id", "store_company_id": "partner"},
    ),
    (
        "unknown terminal",
        pos("acme", "store-1", "till-404"),
        grpc.StatusCode.NOT_FOUND,
        "TERMINAL_NOT_FOUND",
        {"field": "point_of_sale.terminal_id"},
    ),
    (
        "terminal of another store",
        pos("acme", "store-1", "kiosk-1"),
        grpc.StatusCode.NOT_FOUND,
        "TERMINAL_NOT_FOUND",
        {"field": "point_of_sale.terminal_id"},
    ),
]
# Each call at a point of sale; a refund's gets the transaction it refunds.
TILL_CALLS: dict[str, Callable[[PointsClient, common_pb2.PointOfSale, str], Awaitable[object]]] = {
    "EarnPoints": lambda c, p, _: c.earn_points(CARD, p, 5000, at(START_MS)),
    "AuthorizeHold": lambda c, p, _: c.authorize_hold(CARD, p, 10),
    "RedeemPoints": lambda c, p, _: c.redeem_points(CARD, p, 10),
    "RefundTransaction": lambda c, p, tx: c.refund_transaction(tx, point_of_sale=p),
    "GrantPoints": lambda c, p, _: c.grant_points(CARD, 10, at(START_MS + DAY_MS), p),
}


@pytest.mark.parametrize("method", list(TILL_CALLS))
@pytest.mark.parametrize(
    ("case", "where", "code", "reason", "metadata"), WRONG_POINTS_OF_SALE, ids=[c[0] for c in WRONG_POINTS_OF_SALE]
)
async def test_a_till_call_at_a_point_of_sale_the_directory_lacks_is_refused_and_changes_nothing(
    server: PointauthServer,
    client: PointsClient,
    member: str,
    redis: Redis,
    keyspace: Keyspace,
    method: str,
    case: str,
    where: common_pb2.PointOfSale,
    code: grpc.StatusCode,
    reason: str,
    metadata: dict[str, str],
) -> None:
    refundable = (await client.redeem_points(member, STORE, 10)).transaction_id
    balance = await client.get_balance(member)
    before = await snapshot(redis)
    error = await refusal(TILL_CALLS[method](client, where, refundable))
    assert (error.code, error.reason, error.metadata, error.field_violations) == (code, reason, metadata, {})
    assert await snapshot(redis) == before  # no state, no event, not even an idempotency record
    assert (await client.get_balance(member)).balance == balance.balance


async def test_exactly_one_error_info_for_a_till_refusal(server: PointauthServer, member: str) -> None:
    from pointauth.v1 import points_service_pb2 as pb

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        redeem = channel.unary_unary(
            "/pointauth.v1.PointsService/RedeemPoints",
            request_serializer=pb.RedeemPointsRequest.SerializeToString,
            response_deserializer=pb.RedeemPointsResponse.FromString,
        )
        request = pb.RedeemPointsRequest(
            request_id=new_request_id(), card_number=member, point_of_sale=pos("acme", "store-9", "kiosk-1"), points=1
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await redeem(request)
    infos = error_infos(raised.value)
    assert [(i.reason, dict(i.metadata)) for i in infos] == [
        ("STORE_OF_OTHER_COMPANY", {"field": "point_of_sale.store_id", "store_company_id": "partner"})
    ]


async def test_a_refused_request_id_goes_through_once_the_store_is_registered(
    client: PointsClient, member: str
) -> None:
    request_id = new_request_id()
    where = pos("acme", "store-2", "till-1")
    error = await refusal(client.redeem_points(member, where, 100, request_id=request_id))
    assert error.reason == "STORE_NOT_FOUND"
    await client.register_store("store-2", company_id="acme", region_id="kanto")
    await client.register_terminal("store-2", "till-1")
    redeemed = await client.redeem_points(member, where, 100, request_id=request_id)
    assert redeemed.balance.available_points == 900
    receipt = await client.get_receipt(redeemed.transaction_id)
    assert (receipt.point_of_sale.store_id, receipt.point_of_sale.terminal_id) == ("store-2", "till-1")


async def test_capture_and_void_act_at_the_hold_s_point_of_sale(client: PointsClient, member: str) -> None:
    captured = await client.authorize_hold(member, STORE, 100)
    voided = await client.authorize_hold(member, STORE, 50)
    assert (await client.capture_hold(captured.hold_id, 60)).captured_points == 60
    assert (await client.void_hold(voided.hold_id)).released_points == 50
    refunded = await client.refund_transaction((await client.redeem_points(member, STORE, 10)).transaction_id)
    assert refunded.refunded_points == 10  # no point_of_sale given: nothing to check
    assert (await client.get_balance(member)).balance.available_points == 940


@pytest.mark.parametrize("check", [False])
async def test_with_checks_off_any_point_of_sale_is_accepted(
    settings: Settings, clock: ManualClock, redis: Redis, group: object, check: bool
) -> None:
    unchecked = msgspec.structs.replace(settings, group=GroupSettings(check_points_of_sale=check))
    async with (
        PointauthServer(unchecked, clock, sweeper=False) as server,
        PointsClient(f"127.0.0.1:{server.port}", plaintext=True) as client,
    ):
        await client.create_account("member-1", CARD)
        granted = await client.grant_points(CARD, 100, at(START_MS + DAY_MS), pos("nobody", "nowhere", "none-1"))
        assert granted.balance.available_points == 100
        # The directory is still served.
        assert [c.company_id for c in await client.list_companies()] == ["acme", "partner"]


# -- two server processes ------------------------------------------------------------------------


async def _until(condition: Callable[[], Awaitable[bool]], within_s: float) -> float:
    """Seconds until `condition` held; fails after `within_s`."""
    started = time.monotonic()
    while not await condition():
        assert time.monotonic() - started < within_s, "the condition never held"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_a_change_made_through_one_process_reaches_another_within_its_refresh(
    settings: Settings, clock: ManualClock, client: PointsClient, member: str
) -> None:
    # The other process polls every 0.3 s; a second one never within the test (an hour): its
    # tills keep checking against the directory it loaded, without asking Redis.
    quick = msgspec.structs.replace(settings, group=GroupSettings(refresh_seconds=0.3))
    slow = msgspec.structs.replace(settings, group=GroupSettings(refresh_seconds=3600))
    where = pos("acme", "store-5", "till-1")
    async with (
        PointauthServer(quick, clock, sweeper=False) as other,
        PointauthServer(slow, clock, sweeper=False) as stale,
        PointsClient(f"127.0.0.1:{other.port}", plaintext=True) as other_till,
        PointsClient(f"127.0.0.1:{stale.port}", plaintext=True) as stale_till,
    ):
        assert (await refusal(other_till.redeem_points(member, where, 1))).reason == "STORE_NOT_FOUND"
        await client.register_store("store-5", company_id="acme", region_id="kanto")
        await client.register_terminal("store-5", "till-1")
        version = (await other.directory.store.load()).version

        async def other_has_it() -> bool:
            return other.directory.current.version == version

        assert await _until(other_has_it, within_s=5.0) < 5.0
        assert (await other_till.redeem_points(member, where, 1)).balance.available_points == 999
        # Lists ask Redis for the version first: they show the change at once, in any process.
        assert [s.store_id for s in (await stale_till.list_stores("acme")).stores] == ["store-1", "store-5"]
        # ... and bring that process up to date, so its tills accept the store too.
        assert stale.directory.current.version == version
        assert (await stale_till.redeem_points(member, where, 1)).balance.available_points == 998


async def test_a_process_s_tills_use_its_copy_until_it_refreshes(
    settings: Settings, clock: ManualClock, client: PointsClient, member: str, redis: Redis, keyspace: Keyspace
) -> None:
    slow = msgspec.structs.replace(settings, group=GroupSettings(refresh_seconds=3600))
    where = pos("acme", "store-6", "till-1")
    async with (
        PointauthServer(slow, clock, sweeper=False) as stale,
        PointsClient(f"127.0.0.1:{stale.port}", plaintext=True) as stale_till,
    ):
        await client.register_store("store-6", company_id="acme", region_id="kanto")
        await client.register_terminal("store-6", "till-1")
        # Registered (this process sees it at once), but the stale one has not looked yet.
        assert (await client.redeem_points(member, where, 1)).balance.available_points == 999
        error = await refusal(stale_till.redeem_points(member, where, 1))
        assert error.reason == "STORE_NOT_FOUND"
        assert (await account_state(redis, keyspace, "member-1")).lot_points == 999
        await stale.directory.refresh()  # what its poll does every refresh_seconds
        assert (await stale_till.redeem_points(member, where, 1)).balance.available_points == 998
