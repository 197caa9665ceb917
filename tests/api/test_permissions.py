"""Who may call what, as a table of role x RPC x outcome over every RPC of every service in the
protos: an RPC added without a rule, or a rule left for an RPC that is gone, fails here.

The expected outcomes are derived independently of api/permissions.py's table, from the rules
as the issue states them: tills and kiosks by explicit lists, auditors by the Get/List/Export
names, operators by the admin services plus every read."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

import pointauth.v1
from pointauth.server.api.permissions import ROLES_BY_RPC, check_scopes, decide, is_public, rpc_name
from pointauth.server.domain.credentials import Credential, CredentialsError, Role
from pointauth.server.domain.reasons import ErrorReason
from pointauth.v1 import common_pb2


def _proto_rpcs() -> dict[str, type[Message]]:
    """Every RPC of every service in pointauth.v1 ("Service/Method"), with its request type."""
    rpcs: dict[str, type[Message]] = {}
    for module in pkgutil.iter_modules(pointauth.v1.__path__):
        if not module.name.endswith("_pb2"):
            continue
        descriptor = importlib.import_module(f"pointauth.v1.{module.name}").DESCRIPTOR
        for service in descriptor.services_by_name.values():
            for method in service.methods:
                rpcs[f"{service.name}/{method.name}"] = GetMessageClass(method.input_type)
    return rpcs


RPCS = _proto_rpcs()

TILL = {
    "PointsService/EarnPoints",
    "PointsService/AuthorizeHold",
    "PointsService/CaptureHold",
    "PointsService/VoidHold",
    "PointsService/RedeemPoints",
    "PointsService/RefundTransaction",
    "PointsService/GetBalance",
    "PointsService/GetReceipt",
    "PointsService/SimulateEarn",
    "PointsService/CheckIn",
    "PointsService/UseCoupon",
}
KIOSK = {
    "PointsService/GetBalance",
    "PointsService/GetReceipt",
    "PointsService/SimulateEarn",
    "PointsService/CheckIn",
    "MembersService/GetAccount",
    "MembersService/LinkCard",
    "MembersService/BlockCard",
    "MembersService/ReissueCard",
}
ADMIN_SERVICES = {"AdminService", "MembersService", "GroupService", "RulesService", "SettlementService"}
PARTNER_SCOPE = ("PointsService/GetBalance", "PointsService/EarnPoints")


def _is_read(rpc: str) -> bool:
    return rpc.split("/")[1].startswith(("Get", "List", "Export"))


def expected_allowed(role: Role, rpc: str) -> bool:
    match role:
        case Role.TILL:
            return rpc in TILL
        case Role.KIOSK:
            return rpc in KIOSK
        case Role.PARTNER:
            return rpc in PARTNER_SCOPE
        case Role.OPERATOR:
            return rpc.split("/")[0] in ADMIN_SERVICES or _is_read(rpc) or rpc == "PointsService/SimulateEarn"
        case Role.AUDITOR:
            return _is_read(rpc)


def credential(role: Role, company: str = "") -> Credential:
    scope = PARTNER_SCOPE if role is Role.PARTNER else ()
    return Credential(id=f"{role}-1", role=role, company=company, scope=scope, certificate=f"{role}-1")


def test_every_rpc_in_the_protos_has_a_rule_and_every_rule_an_rpc() -> None:
    assert "SettlementService/Settle" in RPCS  # the protos were found, settlement's included
    assert set(ROLES_BY_RPC) == set(RPCS)


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("rpc", sorted(RPCS))
def test_role_may_call_rpc(role: Role, rpc: str) -> None:
    outcome = decide(credential(role), f"/pointauth.v1.{rpc}", RPCS[rpc]())
    if expected_allowed(role, rpc):
        assert outcome is None
    else:
        assert outcome is not None
        assert (outcome.code, outcome.reason) == (grpc.StatusCode.PERMISSION_DENIED, ErrorReason.METHOD_NOT_ALLOWED)
        assert outcome.metadata == {"role": str(role), "method": rpc}


def test_every_role_is_refused_some_rpc_and_allowed_some() -> None:
    for role in Role:
        allowed = {rpc for rpc in RPCS if decide(credential(role), f"/pointauth.v1.{rpc}", RPCS[rpc]()) is None}
        assert allowed, role
        assert allowed != set(RPCS), role


POS_RPCS = sorted(rpc for rpc, request in RPCS.items() if "point_of_sale" in request.DESCRIPTOR.fields_by_name)


def _with_point_of_sale(rpc: str, company_id: str) -> Any:
    request: Any = RPCS[rpc]()
    request.point_of_sale.CopyFrom(
        common_pb2.PointOfSale(company_id=company_id, store_id="store-9", terminal_id="kiosk-1")
    )
    return request


@pytest.mark.parametrize("rpc", POS_RPCS)
def test_a_company_bound_credential_names_only_its_company_points_of_sale(rpc: str) -> None:
    role = Role.TILL if rpc in TILL else Role.OPERATOR
    bound = credential(role, company="acme")
    assert decide(bound, f"/pointauth.v1.{rpc}", _with_point_of_sale(rpc, "acme")) is None
    refused = decide(bound, f"/pointauth.v1.{rpc}", _with_point_of_sale(rpc, "partner"))
    assert refused is not None
    assert (refused.code, refused.reason) == (grpc.StatusCode.PERMISSION_DENIED, ErrorReason.COMPANY_NOT_ALLOWED)
    assert refused.metadata == {"field": "point_of_sale.company_id", "company_id": "acme"}
    # A credential of no company is not bound to one.
    assert decide(credential(role), f"/pointauth.v1.{rpc}", _with_point_of_sale(rpc, "partner")) is None
    # A point of sale naming no company is no other company's: validation refuses it, naming the field.
    assert decide(bound, f"/pointauth.v1.{rpc}", _with_point_of_sale(rpc, "")) is None


def test_the_points_of_sale_checked_are_those_the_issue_names() -> None:
    assert set(POS_RPCS) >= {
        "PointsService/EarnPoints",
        "PointsService/AuthorizeHold",
        "PointsService/RedeemPoints",
        "PointsService/RefundTransaction",
        "PointsService/CheckIn",
        "PointsService/UseCoupon",
        "AdminService/GrantPoints",
    }


def test_the_method_is_decided_before_the_company() -> None:
    kiosk = credential(Role.KIOSK, company="acme")
    refused = decide(
        kiosk, "/pointauth.v1.PointsService/RedeemPoints", _with_point_of_sale("PointsService/RedeemPoints", "x")
    )
    assert refused is not None
    assert refused.reason == ErrorReason.METHOD_NOT_ALLOWED


def test_methods_of_other_packages_are_refused_unless_public() -> None:
    assert rpc_name("/grpc.health.v1.Health/Check") == ""
    assert is_public("/grpc.health.v1.Health/Check")
    assert is_public("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
    assert not is_public("/pointauth.v1.PointsService/GetBalance")
    refused = decide(credential(Role.OPERATOR), "/other.v1.Secret/Get", None)
    assert refused is not None
    assert refused.reason == ErrorReason.METHOD_NOT_ALLOWED


def test_a_scope_naming_an_unknown_rpc_refuses_the_file() -> None:
    partner = Credential(id="p", role=Role.PARTNER, scope=("PointsService/GetBalanse",), certificate="p")
    with pytest.raises(CredentialsError, match="GetBalanse"):
        check_scopes([partner])
