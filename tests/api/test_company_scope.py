"""A till acts on its own company's holds and transactions only, end to end over real TLS (API
keys) and mTLS: capture, void, refund and receipt name just an id (`<account>.<seq>`, easy to
guess), and another company's is answered exactly as an unknown id, changing nothing, whether
asked directly, with a sale, after a merge, or with the owner's request id; its owner and an
operator go on as before."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis

from pointauth.client import ClientTLS, PointauthError, PointsClient
from pointauth.server.api.credentials import write_credentials_atomically
from pointauth.server.app import PointauthServer
from pointauth.server.clock import ManualClock
from pointauth.server.config import Settings
from pointauth.server.devstack.certificates import Pki, ensure_pki
from pointauth.server.domain.credentials import Credential, Role, encode_credentials, key_sha256, new_api_key
from pointauth.server.domain.group import Entry
from pointauth.server.ledger import Keyspace
from tests.api.test_access import PARTNER_STORE, TRANSPORTS, Unchanged, refused, secured_settings
from tests.conftest import CARD, DAY_MS, STORE, at

CARD_2 = "4000000000000002"
WHO = ("till-acme", "till-partner", "operator-1")
KEYS = {who: new_api_key(who) for who in WHO}
CREDENTIALS = [
    Credential(id="till-acme", role=Role.TILL, company="acme"),
    Credential(id="till-partner", role=Role.TILL, company="partner"),
    Credential(id="operator-1", role=Role.OPERATOR),
]
CREDENTIALS = [msgspec.structs.replace(c, key_sha256=key_sha256(KEYS[c.id]), certificate=c.id) for c in CREDENTIALS]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return ensure_pki(tmp_path_factory.mktemp("pki"), WHO)


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
    tmp_path: Path,
    transport: str,
) -> AsyncIterator[PointauthServer]:
    path = tmp_path / "credentials.toml"
    write_credentials_atomically(path, encode_credentials(CREDENTIALS))
    secure = secured_settings(settings, pki, path, mtls=transport == "mtls")
    async with PointauthServer(secure, clock, sweeper=False) as running:
        yield running


Connect = Callable[[str], PointsClient]


@pytest.fixture
def as_(secured: PointauthServer, pki: Pki, transport: str) -> Connect:
    address = f"127.0.0.1:{secured.port}"

    def connect(who: str) -> PointsClient:
        if transport == "mtls":
            return PointsClient(
                address, tls=ClientTLS.from_files(pki.ca_cert, pki.client_cert(who), pki.client_key(who))
            )
        return PointsClient(address, tls=ClientTLS.from_files(pki.ca_cert), api_key=KEYS[who])

    return connect


async def open_member(as_: Connect, clock: ManualClock, account: str, card: str) -> None:
    async with as_("operator-1") as operator:
        await operator.create_account(account, card)
        await operator.grant_points(card, 1000, at(clock.now_ms() + 30 * DAY_MS), STORE)


def told(error: PointauthError, named: str) -> tuple[Any, ...]:
    """Everything the caller learns from a refusal, the id it named left out of the message."""
    return (
        type(error),
        error.code,
        error.reason,
        error.message.replace(named, "<id>"),
        error.metadata,
        error.field_violations,
        error.retry_delay,
    )


class Untouched(Unchanged):
    """Unchanged, and also nothing at all appended to the account's shard stream (not even an
    idempotency note) and none of `request_ids` taken on the account."""

    def __init__(self, redis: Redis, keyspace: Keyspace, account_id: str, *request_ids: str) -> None:
        super().__init__(redis, keyspace, account_id)
        self.request_ids = request_ids

    async def snapshot(self) -> tuple[Any, Any]:
        keys = self.keyspace.account(self.account_id)
        taken = [await self.redis.exists(self.keyspace.idempotency(self.account_id, r)) for r in self.request_ids]
        assert taken == [0] * len(self.request_ids)
        state, events = await super().snapshot()
        return (state, await self.redis.hgetall(keys.transactions)), (events, await self.redis.xrange(keys.events))


async def test_another_companys_hold_and_transaction_are_unknown_ids_to_a_till(
    as_: Connect, clock: ManualClock, redis: Redis, keyspace: Keyspace
) -> None:
    await open_member(as_, clock, "member-1", CARD)
    now = at(clock.now_ms())
    async with as_("till-partner") as partner, as_("till-acme") as acme:
        hold = (await partner.authorize_hold(CARD, PARTNER_STORE, 100)).hold_id
        sold = (await partner.redeem_points(CARD, PARTNER_STORE, 50)).transaction_id
        rids = [str(uuid.uuid4()) for _ in range(5)]
        async with Untouched(redis, keyspace, "member-1", *rids):
            theirs = {
                "capture": await refused(acme.capture_hold(hold, 10, request_id=rids[0])),
                "capture with a sale": await refused(
                    acme.capture_hold(hold, 10, purchase_amount=1000, purchase_time=now, request_id=rids[1])
                ),
                "void": await refused(acme.void_hold(hold, request_id=rids[2])),
                "refund": await refused(acme.refund_transaction(sold, request_id=rids[3])),
                "refund at its store": await refused(
                    acme.refund_transaction(sold, 10, point_of_sale=STORE, request_id=rids[4])
                ),
                "receipt": await refused(acme.get_receipt(sold)),
                "receipt of the hold": await refused(acme.get_receipt(hold)),
            }

        def unknown(named: str) -> dict[str, Any]:
            return {
                "capture": acme.capture_hold(named, 10),
                "capture with a sale": acme.capture_hold(named, 10, purchase_amount=1000, purchase_time=now),
                "void": acme.void_hold(named),
                "refund": acme.refund_transaction(named),
                "refund at its store": acme.refund_transaction(named, 10, point_of_sale=STORE),
                "receipt": acme.get_receipt(named),
                "receipt of the hold": acme.get_receipt(named),
            }

        # An unknown seq of the same account, and an unknown account: the same answers.
        for named in ("member-1.999", "nobody.7"):
            for call, pending in unknown(named).items():
                mine = hold if call in ("capture", "capture with a sale", "void", "receipt of the hold") else sold
                assert told(theirs[call], mine) == told(await refused(pending), named), call
        assert {(e.reason, e.code.name) for e in theirs.values()} == {
            ("HOLD_NOT_FOUND", "NOT_FOUND"),
            ("TRANSACTION_NOT_FOUND", "NOT_FOUND"),
        }

        # The owner's till goes on as if nothing had been asked.
        captured = await partner.capture_hold(hold, 10)
        assert (captured.captured_points, captured.released_points) == (10, 90)
        assert (await partner.refund_transaction(sold, 20)).refunded_points == 20
        assert (await partner.get_receipt(sold)).refunded_points == 20
        # And the till of the company whose points they were (issuer acme) still sees its own.
        ours = (await acme.redeem_points(CARD, STORE, 5)).transaction_id
        assert (await acme.get_receipt(ours)).used_points == 5
    async with as_("operator-1") as operator:  # bound to no company: reads every receipt
        assert (await operator.get_receipt(sold)).used_points == 50
        assert (await operator.get_receipt(hold)).used_points == 100


async def test_a_merged_accounts_transaction_is_refunded_by_its_company_only(
    as_: Connect, clock: ManualClock, redis: Redis, keyspace: Keyspace
) -> None:
    await open_member(as_, clock, "member-1", CARD)
    await open_member(as_, clock, "member-2", CARD_2)
    async with as_("till-partner") as partner:
        sold = (await partner.redeem_points(CARD_2, PARTNER_STORE, 40)).transaction_id
    async with as_("operator-1") as operator:
        await operator.merge_accounts("member-2", "member-1", operator_id="desk-1", reason="one member")
    rid = str(uuid.uuid4())
    async with as_("till-acme") as acme:
        async with Untouched(redis, keyspace, "member-1", rid), Untouched(redis, keyspace, "member-2", rid):
            theirs = await refused(acme.refund_transaction(sold, request_id=rid))
            receipt = await refused(acme.get_receipt(sold))
        assert told(theirs, sold) == told(await refused(acme.refund_transaction("member-2.999")), "member-2.999")
        assert told(receipt, sold) == told(await refused(acme.get_receipt("member-2.999")), "member-2.999")
        assert theirs.reason == "TRANSACTION_NOT_FOUND"
    async with as_("till-partner") as partner:
        refund = await partner.refund_transaction(sold)
        assert refund.refunded_points == 40
        assert refund.transaction_id.startswith("member-1.")  # landed on the account merged into
        assert (await partner.get_receipt(sold)).used_points == 40


async def test_a_retry_gets_its_first_answer_and_another_company_only_an_unknown_id(
    as_: Connect, clock: ManualClock, redis: Redis, keyspace: Keyspace
) -> None:
    await open_member(as_, clock, "member-1", CARD)
    capture_id, refund_id = str(uuid.uuid4()), str(uuid.uuid4())
    async with as_("till-partner") as partner, as_("till-acme") as acme:
        hold = (await partner.authorize_hold(CARD, PARTNER_STORE, 100)).hold_id
        sold = (await partner.redeem_points(CARD, PARTNER_STORE, 50)).transaction_id
        captured = await partner.capture_hold(hold, 30, request_id=capture_id)
        refunded = await partner.refund_transaction(sold, 10, request_id=refund_id)
        async with Untouched(redis, keyspace, "member-1"):
            # The owner's very request (whose answer a replay would give), and other bodies under
            # its request id (IDEMPOTENCY_KEY_REUSED would tell the id is taken).
            replays = [
                await refused(acme.capture_hold(hold, 30, request_id=capture_id)),
                await refused(acme.capture_hold(hold, 31, request_id=capture_id)),
                await refused(acme.void_hold(hold, request_id=capture_id)),
                await refused(acme.refund_transaction(sold, 10, request_id=refund_id)),
                await refused(acme.refund_transaction(sold, 11, request_id=refund_id)),
            ]
        assert [e.reason for e in replays] == ["HOLD_NOT_FOUND"] * 3 + ["TRANSACTION_NOT_FOUND"] * 2
        assert await partner.capture_hold(hold, 30, request_id=capture_id) == captured
        assert await partner.refund_transaction(sold, 10, request_id=refund_id) == refunded
