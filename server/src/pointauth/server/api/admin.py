"""AdminService: opening accounts and granting points outside a purchase."""

from __future__ import annotations

from typing import Any

import grpc

from pointauth.server.api import convert
from pointauth.server.api.convert import fingerprint
from pointauth.server.api.members import card_kind, new_profile
from pointauth.server.api.validation import Violations
from pointauth.server.domain.ids import transaction_id
from pointauth.server.services.accounts import AccountsService
from pointauth.v1 import admin_service_pb2 as pb
from pointauth.v1 import admin_service_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class AdminServicer(admin_service_pb2_grpc.AdminServiceServicer):
    def __init__(self, accounts: AccountsService) -> None:
        self.accounts = accounts

    async def CreateAccount(self, request: pb.CreateAccountRequest, context: Context) -> pb.CreateAccountResponse:
        v = Violations()
        request_id = v.request_id(request.request_id)
        account = v.identifier("account_id", request.account_id)
        card = v.card_number("card_number", request.card_number)
        kind = card_kind(v, "card_kind", request.card_kind)
        profile = new_profile(v, "profile", request.profile if request.HasField("profile") else None)
        v.raise_if_any()
        await self.accounts.open(
            account,
            card,
            kind=kind,
            profile=profile,
            request_id=request_id,
            fingerprint=fingerprint("CreateAccount", request),
        )
        return pb.CreateAccountResponse(account_id=account, card_number=card)

    async def GrantPoints(self, request: pb.GrantPointsRequest, context: Context) -> pb.GrantPointsResponse:
        v = Violations()
        request_id = v.request_id(request.request_id)
        card = v.card_number("card_number", request.card_number)
        points = v.points("points", request.points)
        kind = v.lot_kind("kind", request.kind)
        pos = v.point_of_sale(request.point_of_sale if request.HasField("point_of_sale") else None)
        expire_ms = 0
        if not request.HasField("expire_time"):
            v.add("expire_time", "is required")
        else:
            expire_ms = v.timestamp("expire_time", request.expire_time)
        v.raise_if_any()
        assert pos is not None
        account, result = await self.accounts.grant(
            card,
            points=points,
            expire_ms=expire_ms,
            kind=kind,
            pos=pos,
            request_id=request_id,
            fingerprint=fingerprint("GrantPoints", request),
        )
        return pb.GrantPointsResponse(
            transaction_id=transaction_id(account, result.tx),
            lot=convert.lot(result.lots[0]),
            balance=convert.balance(result),
        )
