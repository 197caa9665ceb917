"""The audit trail's gRPC side: a server interceptor, outermost, that records every operator
action (OPERATOR_ACTIONS, whatever its outcome) and every call refused for its credentials or
permissions (any method), with who, what, when, from where and the request, through
services/audit.py's Auditor, before the call is answered."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import msgspec
from google.protobuf import json_format, text_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from pointauth.server.api.permissions import is_public
from pointauth.server.ledger.codec import AUDIT_REQUEST_MAX, AuditRecord
from pointauth.server.services.audit import Auditor

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
if TYPE_CHECKING:  # grpc's runtime classes are not generic; only the stubs are
    Handler = grpc.RpcMethodHandler[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]

_ACTIONS = {
    "AdminService": ("CreateAccount", "GrantPoints"),
    "MembersService": (
        "UpdateProfile", "CloseAccount", "LinkCard", "UnlinkCard", "BlockCard", "UnblockCard", "ReissueCard",
        "MergeAccounts",
    ),
    "GroupService": ("RegisterCompany", "RegisterStore", "RegisterTerminal"),
    "RulesService": ("PublishRuleSet",),
    "SettlementService": ("Settle",),
}  # fmt: skip
OPERATOR_ACTIONS = frozenset(f"/pointauth.v1.{service}/{rpc}" for service, rpcs in _ACTIONS.items() for rpc in rpcs)
"""Every call of these is recorded: the back office's changes to accounts, cards, the directory,
rules and settlement (the till's calls are the journal's). The other RPCs of these services
only read."""
REFUSED_ACCESS = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
"""Refusals recorded for any method."""

Identify = Callable[[Context], tuple[str, str]]
"""The caller's (actor, role) as the audit trail names them (access.AccessGuard.identify)."""


def _anonymous(context: Context) -> tuple[str, str]:
    return "", ""


def request_json(request: object) -> str:
    """The request as protobuf's JSON, or, if longer than AUDIT_REQUEST_MAX, a JSON object that
    says so and keeps its start (always valid JSON: audit_log.request is jsonb)."""
    if not isinstance(request, Message):
        return ""  # a body that did not parse
    try:
        text = json_format.MessageToJson(request, preserving_proto_field_name=True, indent=None)
    except json_format.Error:
        # Values JSON has no form for (a Timestamp's negative nanos, a field mask path it can't
        # spell): the request is recorded all the same, in protobuf's text format.
        text = msgspec.json.encode({"text_format": text_format.MessageToString(request, as_one_line=True)}).decode()
    if len(text) <= AUDIT_REQUEST_MAX:
        return text
    return msgspec.json.encode({"truncated": text[: AUDIT_REQUEST_MAX // 2], "size": len(text)}).decode()


def refusal_reason(context: Context) -> str:
    """The ErrorInfo reason of the status the call was aborted with ("" if none)."""
    for key, value in context.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return str(info.reason)
    return ""


class AuditTrail(grpc.aio.ServerInterceptor):
    """Wraps every non-public unary handler once (cached per method)."""

    def __init__(self, auditor: Auditor, identify: Identify | None = None) -> None:
        self.auditor = auditor
        self.identify = identify or _anonymous
        self._handlers: dict[str, Handler] = {}
        self._pending: set[asyncio.Task[None]] = set()

    async def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Handler | None:
        method: str = details.method
        cached = self._handlers.get(method)
        if cached is not None:
            return cached
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None or is_public(method):
            return handler
        behavior: Callable[[Any, Context], Awaitable[Any]] = handler.unary_unary  # type: ignore[assignment]
        wrapped = grpc.unary_unary_rpc_method_handler(
            self._recorded(method, behavior),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._handlers[method] = wrapped
        return wrapped

    def _recorded(
        self, method: str, behavior: Callable[[Any, Context], Awaitable[Any]]
    ) -> Callable[[Any, Context], Awaitable[Any]]:
        action = method in OPERATOR_ACTIONS

        async def recorded(request: Any, context: Context) -> Any:
            try:
                response = await behavior(request, context)
            except grpc.aio.AbortError:
                code = context.code()
                if action or code in REFUSED_ACCESS:
                    name = code.name if isinstance(code, grpc.StatusCode) else str(code)
                    record = self._record(method, context, request, name, refusal_reason(context))
                    await (self.auditor.action(record) if action else self.auditor.refusal(record))
                raise
            except asyncio.CancelledError:
                # The caller went away (or its deadline passed) while the action ran: it may have
                # been done all the same, so it is recorded, in a task of its own that the
                # cancellation of this one does not stop.
                if action:
                    record = self._record(method, context, request, "CANCELLED", "")
                    task = asyncio.create_task(self.auditor.action(record))
                    self._pending.add(task)
                    task.add_done_callback(self._pending.discard)
                raise
            if action:
                await self.auditor.action(self._record(method, context, request, "OK", ""))
            return response

        return recorded

    async def close(self) -> None:
        """Waits for the records of cancelled calls; records nothing after (the server's Redis
        client closes next: a write then would open a connection nobody closes)."""
        await asyncio.gather(*self._pending, return_exceptions=True)
        self.auditor.closed = True

    def _record(self, method: str, context: Context, request: object, code: str, reason: str) -> AuditRecord:
        actor, role = self.identify(context)
        return self.auditor.now(method, actor, role, context.peer(), code, reason, request_json(request))
