"""PointsClient: the typed async client for tills, kiosks and partner systems."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Self, TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from pointauth.client._errors import error_from_rpc
from pointauth.client._security import ClientTLS, security_from
from pointauth.v1 import (
    admin_service_pb2 as admin_pb,
)
from pointauth.v1 import (
    admin_service_pb2_grpc,
    common_pb2,
    group_service_pb2_grpc,
    members_service_pb2_grpc,
    points_service_pb2_grpc,
    rules_service_pb2_grpc,
    settlement_service_pb2_grpc,
)
from pointauth.v1 import (
    group_service_pb2 as group_pb,
)
from pointauth.v1 import (
    members_service_pb2 as members_pb,
)
from pointauth.v1 import (
    points_service_pb2 as pb,
)
from pointauth.v1 import (
    rules_service_pb2 as rules_pb,
)
from pointauth.v1 import (
    settlement_service_pb2 as settlement_pb,
)

T = TypeVar("T")


class _State(enum.Enum):
    UNOPENED = 1
    OPENED = 2
    CLOSED = 3


def new_request_id() -> str:
    """A fresh request id. Keep it to retry the same request safely."""
    return str(uuid.uuid4())


def _timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


class PointsClient:
    """`async with PointsClient("host:50051") as client:` calls PointsService, AdminService,
    MembersService, GroupService and RulesService.

    Every mutating method of a member's points, account or cards takes an optional
    `request_id`; pass the same one to retry a call whose outcome is unknown: the server applies
    it once and answers as the first time. Registering a group entry is create-or-update by id
    (safe to repeat); publishing a rule set again makes another version with the same rules.
    Failures raise `PointauthError` subclasses with the server's reason and field violations.

    Security: `tls` (the server's CA, and a client certificate for mTLS) and `api_key` (sent as
    `authorization: Bearer <key>` on every call); `plaintext=True` for a server without TLS.
    What they leave open comes from POINTAUTH_CA_FILE, POINTAUTH_CERT_FILE, POINTAUTH_KEY_FILE,
    POINTAUTH_API_KEY(_FILE) and POINTAUTH_PLAINTEXT; with none of them, TLS against the system's
    CAs. Ignored when a `channel` is given, except the API key.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 5.0,
        channel: grpc.aio.Channel | None = None,
        tls: ClientTLS | None = None,
        api_key: str | None = None,
        plaintext: bool = False,
    ) -> None:
        self._target = target
        self._timeout = timeout
        self._channel = channel
        self._security = security_from(tls, api_key, plaintext)
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {self._security.api_key}"),) if self._security.api_key else ()
        )
        self._state = _State.UNOPENED

    async def __aenter__(self) -> Self:
        if self._state is not _State.UNOPENED:
            raise RuntimeError("a PointsClient can be opened only once")
        if self._channel is None:
            tls = self._security.tls
            # A connection of its own: gRPC otherwise shares one between the channels of a
            # process to one address, so that clients opened to spread load would all land on
            # one server process (SO_REUSEPORT spreads connections) and one stream limit.
            options = [("grpc.use_local_subchannel_pool", 1)]
            self._channel = (
                grpc.aio.insecure_channel(self._target, options=options)
                if tls is None
                else grpc.aio.secure_channel(self._target, tls.channel_credentials(), options=options)
            )
        self._points = points_service_pb2_grpc.PointsServiceStub(self._channel)
        self._admin = admin_service_pb2_grpc.AdminServiceStub(self._channel)
        self._members = members_service_pb2_grpc.MembersServiceStub(self._channel)
        self._group = group_service_pb2_grpc.GroupServiceStub(self._channel)
        self._rules = rules_service_pb2_grpc.RulesServiceStub(self._channel)
        self._settlement = settlement_service_pb2_grpc.SettlementServiceStub(self._channel)
        self._state = _State.OPENED
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._state = _State.CLOSED
        if self._channel is not None:
            await self._channel.close()

    async def _call(self, call: Callable[..., Awaitable[T]], request: object) -> T:
        if self._state is not _State.OPENED:
            raise RuntimeError("use the client inside `async with PointsClient(...)`")
        try:
            return await call(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc.code(), exc.details() or "", exc.trailing_metadata()) from None

    async def earn_points(
        self,
        card_number: str,
        point_of_sale: common_pb2.PointOfSale,
        purchase_amount: int,
        purchase_time: datetime,
        *,
        basket: Sequence[pb.BasketLine] = (),
        request_id: str | None = None,
    ) -> pb.EarnPointsResponse:
        """Points for a purchase; with a basket, purchase_amount is the sum of its lines."""
        request = pb.EarnPointsRequest(
            request_id=request_id or new_request_id(),
            card_number=card_number,
            point_of_sale=point_of_sale,
            purchase_amount=purchase_amount,
            purchase_time=_timestamp(purchase_time),
            basket=basket,
        )
        return await self._call(self._points.EarnPoints, request)

    async def check_in(
        self,
        card_number: str,
        point_of_sale: common_pb2.PointOfSale,
        visit_time: datetime,
        *,
        request_id: str | None = None,
    ) -> pb.CheckInResponse:
        """Points for a visit, by the rule set's visit rules, each within its limit."""
        request = pb.CheckInRequest(
            request_id=request_id or new_request_id(),
            card_number=card_number,
            point_of_sale=point_of_sale,
            visit_time=_timestamp(visit_time),
        )
        return await self._call(self._points.CheckIn, request)

    async def use_coupon(
        self,
        card_number: str,
        coupon_id: str,
        point_of_sale: common_pb2.PointOfSale,
        *,
        request_id: str | None = None,
    ) -> pb.Coupon:
        """Uses a coupon of the member's at a sale, once; returns it with its use time."""
        request = pb.UseCouponRequest(
            request_id=request_id or new_request_id(),
            card_number=card_number,
            coupon_id=coupon_id,
            point_of_sale=point_of_sale,
        )
        return (await self._call(self._points.UseCoupon, request)).coupon

    async def simulate_earn(
        self,
        point_of_sale: common_pb2.PointOfSale,
        purchase_amount: int,
        purchase_time: datetime,
        *,
        card_number: str = "",
        basket: Sequence[pb.BasketLine] = (),
    ) -> pb.SimulateEarnResponse:
        """What EarnPoints would give, changing nothing (with a card: the member's limits as now)."""
        request = pb.SimulateEarnRequest(
            card_number=card_number,
            point_of_sale=point_of_sale,
            purchase_amount=purchase_amount,
            purchase_time=_timestamp(purchase_time),
            basket=basket,
        )
        return await self._call(self._points.SimulateEarn, request)

    async def publish_rule_set(self, rule_set: rules_pb.RuleSet) -> rules_pb.RuleSet:
        """Checks a rule set and makes it the current version; returns it with its version."""
        response = await self._call(self._rules.PublishRuleSet, rules_pb.PublishRuleSetRequest(rule_set=rule_set))
        return response.rule_set

    async def get_rule_set(self, version: int = 0) -> rules_pb.RuleSet:
        """A published version (0: the current one)."""
        return (await self._call(self._rules.GetRuleSet, rules_pb.GetRuleSetRequest(version=version))).rule_set

    async def authorize_hold(
        self,
        card_number: str,
        point_of_sale: common_pb2.PointOfSale,
        points: int,
        *,
        hold_ttl: timedelta | None = None,
        request_id: str | None = None,
    ) -> pb.AuthorizeHoldResponse:
        request = pb.AuthorizeHoldRequest(
            request_id=request_id or new_request_id(),
            card_number=card_number,
            point_of_sale=point_of_sale,
            points=points,
        )
        if hold_ttl is not None:
            request.hold_ttl.CopyFrom(Duration(seconds=int(hold_ttl.total_seconds())))
        return await self._call(self._points.AuthorizeHold, request)

    async def capture_hold(
        self,
        hold_id: str,
        points: int | None = None,
        *,
        purchase_amount: int | None = None,
        purchase_time: datetime | None = None,
        basket: Sequence[pb.BasketLine] = (),
        request_id: str | None = None,
    ) -> pb.CaptureHoldResponse:
        """Spends a hold; with purchase_amount and purchase_time, also earns for the sale it
        completes, in the same call."""
        request = pb.CaptureHoldRequest(request_id=request_id or new_request_id(), hold_id=hold_id, basket=basket)
        if points is not None:
            request.points = points
        if purchase_amount is not None:
            request.purchase_amount = purchase_amount
        if purchase_time is not None:
            request.purchase_time.CopyFrom(_timestamp(purchase_time))
        return await self._call(self._points.CaptureHold, request)

    async def void_hold(self, hold_id: str, *, request_id: str | None = None) -> pb.VoidHoldResponse:
        request = pb.VoidHoldRequest(request_id=request_id or new_request_id(), hold_id=hold_id)
        return await self._call(self._points.VoidHold, request)

    async def redeem_points(
        self, card_number: str, point_of_sale: common_pb2.PointOfSale, points: int, *, request_id: str | None = None
    ) -> pb.RedeemPointsResponse:
        request = pb.RedeemPointsRequest(
            request_id=request_id or new_request_id(),
            card_number=card_number,
            point_of_sale=point_of_sale,
            points=points,
        )
        return await self._call(self._points.RedeemPoints, request)

    async def refund_transaction(
        self,
        transaction_id: str,
        points: int | None = None,
        *,
        point_of_sale: common_pb2.PointOfSale | None = None,
        request_id: str | None = None,
    ) -> pb.RefundTransactionResponse:
        request = pb.RefundTransactionRequest(
            request_id=request_id or new_request_id(), transaction_id=transaction_id, point_of_sale=point_of_sale
        )
        if points is not None:
            request.points = points
        return await self._call(self._points.RefundTransaction, request)

    async def get_balance(self, card_number: str, *, page_size: int = 0, page_token: str = "") -> pb.GetBalanceResponse:
        """The balance and a page of lots (page_size 0: the server's default, 20); pass the
        answer's next_page_token for the next lots."""
        request = pb.GetBalanceRequest(card_number=card_number, page_size=page_size, page_token=page_token)
        return await self._call(self._points.GetBalance, request)

    async def get_receipt(self, transaction_id: str) -> pb.Receipt:
        response = await self._call(self._points.GetReceipt, pb.GetReceiptRequest(transaction_id=transaction_id))
        return response.receipt

    async def create_account(
        self,
        account_id: str,
        card_number: str,
        *,
        profile: members_pb.MemberProfile | None = None,
        card_kind: members_pb.CardKind.ValueType = members_pb.CARD_KIND_PHYSICAL,
        request_id: str | None = None,
    ) -> admin_pb.CreateAccountResponse:
        request = admin_pb.CreateAccountRequest(
            request_id=request_id or new_request_id(),
            account_id=account_id,
            card_number=card_number,
            profile=profile,
            card_kind=card_kind,
        )
        return await self._call(self._admin.CreateAccount, request)

    async def get_account(self, *, account_id: str = "", card_number: str = "") -> members_pb.Account:
        """By account id or by any of its cards (give one)."""
        request = (
            members_pb.GetAccountRequest(card_number=card_number)
            if card_number
            else members_pb.GetAccountRequest(account_id=account_id)
        )
        return (await self._call(self._members.GetAccount, request)).account

    async def update_profile(
        self, account_id: str, profile: members_pb.MemberProfile, paths: list[str], *, request_id: str | None = None
    ) -> members_pb.Account:
        """Changes the profile fields `paths` names (e.g. ["birth_month", "birth_day"], ["attributes.segment"])."""
        request = members_pb.UpdateProfileRequest(
            request_id=request_id or new_request_id(), account_id=account_id, profile=profile
        )
        request.update_mask.paths.extend(paths)
        return (await self._call(self._members.UpdateProfile, request)).account

    async def close_account(self, account_id: str, *, request_id: str | None = None) -> members_pb.CloseAccountResponse:
        request = members_pb.CloseAccountRequest(request_id=request_id or new_request_id(), account_id=account_id)
        return await self._call(self._members.CloseAccount, request)

    async def link_card(
        self,
        account_id: str,
        card_number: str,
        *,
        kind: members_pb.CardKind.ValueType = members_pb.CARD_KIND_PHYSICAL,
        request_id: str | None = None,
    ) -> members_pb.Card:
        request = members_pb.LinkCardRequest(
            request_id=request_id or new_request_id(), account_id=account_id, card_number=card_number, kind=kind
        )
        return (await self._call(self._members.LinkCard, request)).card

    async def unlink_card(self, account_id: str, card_number: str, *, request_id: str | None = None) -> None:
        request = members_pb.UnlinkCardRequest(
            request_id=request_id or new_request_id(), account_id=account_id, card_number=card_number
        )
        await self._call(self._members.UnlinkCard, request)

    async def block_card(self, card_number: str, *, request_id: str | None = None) -> members_pb.BlockCardResponse:
        request = members_pb.BlockCardRequest(request_id=request_id or new_request_id(), card_number=card_number)
        return await self._call(self._members.BlockCard, request)

    async def unblock_card(self, card_number: str, *, request_id: str | None = None) -> members_pb.UnblockCardResponse:
        request = members_pb.UnblockCardRequest(request_id=request_id or new_request_id(), card_number=card_number)
        return await self._call(self._members.UnblockCard, request)

    async def merge_accounts(
        self,
        source_account_id: str,
        target_account_id: str,
        *,
        operator_id: str,
        reason: str,
        request_id: str | None = None,
    ) -> members_pb.MergeAccountsResponse:
        """Merges the source account into the target (see MembersService.MergeAccounts)."""
        request = members_pb.MergeAccountsRequest(
            request_id=request_id or new_request_id(),
            source_account_id=source_account_id,
            target_account_id=target_account_id,
            operator_id=operator_id,
            reason=reason,
        )
        return await self._call(self._members.MergeAccounts, request)

    async def reissue_card(
        self,
        card_number: str,
        new_card_number: str,
        *,
        new_card_kind: members_pb.CardKind.ValueType = members_pb.CARD_KIND_PHYSICAL,
        request_id: str | None = None,
    ) -> members_pb.ReissueCardResponse:
        request = members_pb.ReissueCardRequest(
            request_id=request_id or new_request_id(),
            card_number=card_number,
            new_card_number=new_card_number,
            new_card_kind=new_card_kind,
        )
        return await self._call(self._members.ReissueCard, request)

    async def grant_points(
        self,
        card_number: str,
        points: int,
        expire_time: datetime,
        point_of_sale: common_pb2.PointOfSale,
        *,
        kind: common_pb2.LotKind.ValueType = common_pb2.LOT_KIND_REGULAR,
        request_id: str | None = None,
    ) -> admin_pb.GrantPointsResponse:
        request = admin_pb.GrantPointsRequest(
            request_id=request_id or new_request_id(),
            card_number=card_number,
            points=points,
            kind=kind,
            expire_time=_timestamp(expire_time),
            point_of_sale=point_of_sale,
        )
        return await self._call(self._admin.GrantPoints, request)

    # -- the group directory (GroupService): registering is create-or-update, safe to retry -----

    async def register_company(
        self, company_id: str, *, display_name: str = "", point_value: tuple[int, int] | None = None
    ) -> group_pb.Company:
        """`point_value`: (yen, per points: 1 or 100) one of its points is worth in settlement;
        None: 1 yen per point."""
        company = group_pb.Company(company_id=company_id, display_name=display_name)
        if point_value is not None:
            company.point_value.CopyFrom(group_pb.PointValue(yen=point_value[0], points=point_value[1]))
        request = group_pb.RegisterCompanyRequest(company=company)
        return (await self._call(self._group.RegisterCompany, request)).company

    async def register_store(
        self, store_id: str, *, company_id: str, region_id: str, display_name: str = ""
    ) -> group_pb.Store:
        """A store of a registered company; a store never changes company."""
        request = group_pb.RegisterStoreRequest(
            store=group_pb.Store(
                store_id=store_id, company_id=company_id, region_id=region_id, display_name=display_name
            )
        )
        return (await self._call(self._group.RegisterStore, request)).store

    async def register_terminal(self, store_id: str, terminal_id: str, *, display_name: str = "") -> group_pb.Terminal:
        request = group_pb.RegisterTerminalRequest(
            terminal=group_pb.Terminal(store_id=store_id, terminal_id=terminal_id, display_name=display_name)
        )
        return (await self._call(self._group.RegisterTerminal, request)).terminal

    async def list_companies(self) -> list[group_pb.Company]:
        response = await self._call(self._group.ListCompanies, group_pb.ListCompaniesRequest())
        return list(response.companies)

    async def list_stores(
        self, company_id: str = "", *, page_size: int = 0, page_token: str = ""
    ) -> group_pb.ListStoresResponse:
        """One page of stores by id, of one company ("": of all); pass its next_page_token for
        the next (empty on the last page)."""
        request = group_pb.ListStoresRequest(company_id=company_id, page_size=page_size, page_token=page_token)
        return await self._call(self._group.ListStores, request)

    async def list_terminals(self, store_id: str) -> list[group_pb.Terminal]:
        response = await self._call(self._group.ListTerminals, group_pb.ListTerminalsRequest(store_id=store_id))
        return list(response.terminals)

    async def settle(
        self, period: str, *, close: bool = False, company_id: str = "", include_stores: bool = False
    ) -> settlement_pb.Statement:
        """The statement of a period (YYYY-MM) between group companies; with `close`, stored for
        good (refused until every event of the period is in the journal)."""
        request = settlement_pb.SettleRequest(
            period=period, close=close, company_id=company_id, include_stores=include_stores
        )
        return (await self._call(self._settlement.Settle, request)).statement

    async def get_statement(
        self, period: str, *, company_id: str = "", include_stores: bool = False
    ) -> settlement_pb.Statement:
        """A closed period's statement."""
        request = settlement_pb.GetStatementRequest(period=period, company_id=company_id, include_stores=include_stores)
        return (await self._call(self._settlement.GetStatement, request)).statement

    async def list_statements(self, company_id: str = "") -> list[settlement_pb.Statement]:
        """The closed periods' headers, newest first."""
        request = settlement_pb.ListStatementsRequest(company_id=company_id)
        return list((await self._call(self._settlement.ListStatements, request)).statements)

    async def export_statement(self, period: str, *, company_id: str = "") -> str:
        """A closed period's statement as CSV."""
        request = settlement_pb.ExportStatementRequest(period=period, company_id=company_id)
        return (await self._call(self._settlement.ExportStatement, request)).csv
