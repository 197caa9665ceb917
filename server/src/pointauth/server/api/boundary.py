"""The error boundary: the one place where every unary call's failures become a gRPC status with
exactly one ErrorInfo, and where load is shed before it can queue past a till's deadline.

- a call whose deadline passed while it waited to be started: DEADLINE_EXCEEDED (DEADLINE_PASSED),
  nothing done (the caller has given up on it);
- a body larger than `max_message_bytes`: INVALID_ARGUMENT (REQUEST_TOO_LARGE), not parsed;
- a body that is not valid protobuf: INVALID_ARGUMENT (MALFORMED_REQUEST), for every method;
- more than `max_in_flight` calls at once in this process: RESOURCE_EXHAUSTED (SERVER_OVERLOADED);
- refusals (ApiError, LedgerRefusal): their own code and reason;
- not sent to Redis within `redis.pool_wait_seconds`: RESOURCE_EXHAUSTED (SERVER_OVERLOADED);
- Redis down, restarting or loading: UNAVAILABLE (BACKEND_UNAVAILABLE);
- anything else: INTERNAL with a generic message; the exception is logged, never sent.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError

from pointauth.server.api.errors import (
    ApiError,
    backend_unavailable,
    deadline_passed,
    from_refusal,
    internal_error,
    malformed_request,
    overloaded,
    request_too_large,
)
from pointauth.server.ledger import BACKEND_ERRORS, LedgerRefusal, PoolExhausted

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
if TYPE_CHECKING:  # grpc's runtime classes are not generic; only the stubs are
    Handler = grpc.RpcMethodHandler[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]

# Stand for a request whose bytes did not parse, or were too many to parse: the deserializer
# cannot abort the call itself.
_MALFORMED = object()
_TOO_LARGE = object()


def _tolerant(deserialize: Callable[[bytes], Any], max_bytes: int) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        if len(data) > max_bytes:
            return _TOO_LARGE
        try:
            return deserialize(data)
        except DecodeError:  # corrupt wire format, or a string field that is not UTF-8
            return _MALFORMED

    return parse


class ErrorBoundary(grpc.aio.ServerInterceptor):
    """Wraps the unary handlers once per method (cached); `shed_prefix` names the methods that
    count against `max_in_flight` (ours, not health checks, which must answer under load)."""

    def __init__(
        self, *, max_in_flight: int, retry_delay_ms: int, max_message_bytes: int, shed_prefix: str = "/pointauth."
    ) -> None:
        self.max_in_flight = max_in_flight
        self.max_message_bytes = max_message_bytes
        self.retry_delay_ms = retry_delay_ms
        self.shed_prefix = shed_prefix
        self.in_flight = 0
        self._handlers: dict[str, Handler] = {}

    async def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Handler | None:
        method: str = details.method
        cached = self._handlers.get(method)
        if cached is not None:
            return cached
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler  # unknown method (not cached: names come from clients), or streaming
        behavior: Callable[[Any, Context], Awaitable[Any]] = handler.unary_unary  # type: ignore[assignment]
        wrapped = grpc.unary_unary_rpc_method_handler(
            self._guard(method, behavior),
            request_deserializer=_tolerant(handler.request_deserializer, self.max_message_bytes),
            response_serializer=handler.response_serializer,
        )
        self._handlers[method] = wrapped
        return wrapped

    def _guard(
        self, method: str, behavior: Callable[[Any, Context], Awaitable[Any]]
    ) -> Callable[[Any, Context], Awaitable[Any]]:
        shed = method.startswith(self.shed_prefix)

        async def guarded(request: Any, context: Context) -> Any:
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                error = deadline_passed()
            elif request is _TOO_LARGE:
                error = request_too_large(self.max_message_bytes)
            elif request is _MALFORMED:
                error = malformed_request()
            elif shed and self.in_flight >= self.max_in_flight:
                error = overloaded(f"{self.max_in_flight} calls in flight", self.retry_delay_ms)
            else:
                counted = int(shed)
                self.in_flight += counted
                try:
                    return await behavior(request, context)
                except LedgerRefusal as refusal:
                    error = from_refusal(refusal)
                except ApiError as api_error:
                    error = api_error
                except PoolExhausted as exc:
                    log.warning("%s shed: %s", method, exc)
                    error = overloaded("the call waited too long to be sent to Redis", self.retry_delay_ms)
                except grpc.aio.AbortError:
                    raise
                except BACKEND_ERRORS as exc:
                    log.warning("%s: Redis unavailable: %s: %s", method, type(exc).__name__, exc)
                    error = backend_unavailable("Redis", self.retry_delay_ms)
                except Exception:
                    log.exception("%s failed", method)
                    error = internal_error()
                finally:
                    self.in_flight -= counted
            await context.abort_with_status(error.to_status())
            raise AssertionError("abort_with_status returned")  # pragma: no cover

        return guarded
