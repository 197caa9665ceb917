"""Who may call what: every RPC's roles, in one table, and the decision for one call.

The decision reads only the credential, the method and the request's point of sale, so it is
made before anything is looked up: a caller refused PERMISSION_DENIED learns nothing about the
cards, holds or transactions it named (NOT_FOUND can't be used to probe ids).

- An RPC missing from the table is refused to every role (and a test fails for it).
- A partner may call exactly the RPCs of its scope.
- A credential with a company may name only that company's points of sale.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf.message import Message

from pointauth.server.api.errors import ApiError
from pointauth.server.domain.credentials import Credential, CredentialsError, Role
from pointauth.server.domain.reasons import ErrorReason

PACKAGE = "pointauth.v1"

# Answered to anyone, without credentials: load balancers' health checks, and reflection (it
# describes the public .proto files, nothing else).
PUBLIC_SERVICES = frozenset(
    {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)

_T, _K, _O, _A = Role.TILL, Role.KIOSK, Role.OPERATOR, Role.AUDITOR

# Operators read everything an auditor can. A kiosk may block a lost card, link an app id and
# reissue a card, but not unblock one: a blocked card's thief could walk up to a kiosk too.
ROLES_BY_RPC: dict[str, frozenset[Role]] = {
    name: frozenset(roles)
    for name, roles in {
        "PointsService/EarnPoints": {_T},
        "PointsService/AuthorizeHold": {_T},
        "PointsService/CaptureHold": {_T},
        "PointsService/VoidHold": {_T},
        "PointsService/RedeemPoints": {_T},
        "PointsService/RefundTransaction": {_T},
        "PointsService/GetBalance": {_T, _K, _O, _A},
        "PointsService/GetReceipt": {_T, _K, _O, _A},
        "PointsService/SimulateEarn": {_T, _K, _O},
        "PointsService/CheckIn": {_T, _K},
        "PointsService/UseCoupon": {_T},
        "AdminService/CreateAccount": {_O},
        "AdminService/GrantPoints": {_O},
        "MembersService/GetAccount": {_K, _O, _A},
        "MembersService/UpdateProfile": {_O},
        "MembersService/CloseAccount": {_O},
        "MembersService/LinkCard": {_K, _O},
        "MembersService/UnlinkCard": {_O},
        "MembersService/BlockCard": {_K, _O},
        "MembersService/UnblockCard": {_O},
        "MembersService/ReissueCard": {_K, _O},
        "MembersService/MergeAccounts": {_O},
        "GroupService/RegisterCompany": {_O},
        "GroupService/RegisterStore": {_O},
        "GroupService/RegisterTerminal": {_O},
        "GroupService/ListCompanies": {_O, _A},
        "GroupService/ListStores": {_O, _A},
        "GroupService/ListTerminals": {_O, _A},
        "RulesService/PublishRuleSet": {_O},
        "RulesService/GetRuleSet": {_O, _A},
        "SettlementService/Settle": {_O},
        "SettlementService/GetStatement": {_O, _A},
        "SettlementService/ListStatements": {_O, _A},
        "SettlementService/ExportStatement": {_O, _A},
    }.items()
}


def rpc_name(method: str) -> str:
    """ "/pointauth.v1.PointsService/GetBalance" -> "PointsService/GetBalance" ("" for another
    package's method)."""
    service, _, name = method.lstrip("/").partition("/")
    package, _, short = service.rpartition(".")
    return f"{short}/{name}" if package == PACKAGE else ""


def is_public(method: str) -> bool:
    return method.lstrip("/").partition("/")[0] in PUBLIC_SERVICES


def check_scopes(credentials: Iterable[Credential]) -> None:
    """A scope naming no RPC is a typing mistake that would grant nothing: refuse the file."""
    for credential in credentials:
        unknown = [rpc for rpc in credential.scope if rpc not in ROLES_BY_RPC]
        if unknown:
            raise CredentialsError(f"credential {credential.id!r}: scope names unknown RPCs {unknown}")


def may_call(credential: Credential, rpc: str) -> bool:
    if credential.role is Role.PARTNER:
        return rpc in credential.scope
    return credential.role in ROLES_BY_RPC.get(rpc, frozenset())


def decide(credential: Credential, method: str, request: Any) -> ApiError | None:
    """None if the credential may make this call; otherwise the PERMISSION_DENIED to answer."""
    rpc = rpc_name(method)
    if not may_call(credential, rpc):
        return ApiError(
            grpc.StatusCode.PERMISSION_DENIED,
            ErrorReason.METHOD_NOT_ALLOWED,
            f"credential {credential.id!r} ({credential.role}) may not call {rpc or method}",
            {"role": str(credential.role), "method": rpc or method},
        )
    if credential.company and isinstance(request, Message):
        # Only a parsed request names a point of sale; a malformed body is refused further in, and
        # so is one naming no company (INVALID_ARGUMENT point_of_sale.company_id, like any missing
        # field): no company is not another company.
        point_of_sale = _point_of_sale(request)
        if point_of_sale is not None and point_of_sale.company_id not in ("", credential.company):
            return ApiError(
                grpc.StatusCode.PERMISSION_DENIED,
                ErrorReason.COMPANY_NOT_ALLOWED,
                f"credential {credential.id!r} acts for company {credential.company!r} only",
                {"field": "point_of_sale.company_id", "company_id": credential.company},
            )
    return None


def _point_of_sale(request: Message) -> Any:
    descriptor = request.DESCRIPTOR
    if "point_of_sale" not in descriptor.fields_by_name or not request.HasField("point_of_sale"):
        return None
    return getattr(request, "point_of_sale", None)
