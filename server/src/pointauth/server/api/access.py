"""The access guard: the one place where calls are authenticated, authorized and rate-limited,
a server interceptor in front of the error boundary.

For every unary call of a method that is not public (health, reflection), in this order:
1. who: an `authorization: Bearer <api key>` metadata entry names a credential (its SHA-256
   compared in constant time); without one, under mTLS, the client certificate's identity
   (SAN, or CN) does. None: UNAUTHENTICATED (CREDENTIALS_MISSING); a key or certificate no
   credential has: UNAUTHENTICATED (CREDENTIALS_INVALID); a revoked one: UNAUTHENTICATED
   (CREDENTIAL_REVOKED);
2. may it: the role (or a partner's scope) and the point of sale's company, from the method and
   the request alone (api/permissions.py): PERMISSION_DENIED before anything is looked up;
3. how often: a token bucket per credential in this process: RESOURCE_EXHAUSTED (RATE_LIMITED)
   with a RetryInfo delay.

Refusals are logged with the credential's id, never its key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import grpc

from pointauth.server.api.credentials import CredentialStore
from pointauth.server.api.errors import ApiError
from pointauth.server.api.permissions import decide, is_public
from pointauth.server.domain.credentials import Credential, credential_id_of_key
from pointauth.server.domain.reasons import ErrorReason

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
if TYPE_CHECKING:  # grpc's runtime classes are not generic; only the stubs are
    Handler = grpc.RpcMethodHandler[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]

_BEARER = "bearer "
_CALLER: ContextVar[Credential | None] = ContextVar("pointauth_caller", default=None)


def caller_id() -> str | None:
    """The id of the call's credential (None: the server runs without auth)."""
    credential = _CALLER.get()
    return credential.id if credential is not None else None


def caller_company() -> str | None:
    """The company the call's credential acts for (a till's), for handlers whose request alone
    does not say whose something is: a capture, void, refund or receipt names a hold or
    transaction (`<account>.<seq>`), not a point of sale, so only the record can tell whether it
    is the caller's company's. None when it acts for none (an operator, a kiosk) or the server
    runs without auth: then nothing is limited to a company. gRPC runs each call in a context of
    its own, so the guard's value is seen by that call's handler alone."""
    credential = _CALLER.get()
    return credential.company if credential is not None and credential.company else None


class TokenBucket:
    """`rate` calls a second on average, `burst` at once after a pause."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = burst, now

    def take(self, now: float) -> float:
        """0 if a call may go now (and counts it); otherwise the seconds until one may."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


def _unauthenticated(reason: ErrorReason.ValueType, message: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNAUTHENTICATED, reason, message)


def bearer_key(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value[: len(_BEARER)].lower() == _BEARER:
            return value[len(_BEARER) :].strip()
    return None


class AccessGuard(grpc.aio.ServerInterceptor):
    """Wraps each non-public unary handler once (cached per method)."""

    def __init__(
        self,
        credentials: CredentialStore,
        *,
        mtls: bool,
        rate_per_second: int,
        burst: int,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.credentials = credentials
        self.mtls = mtls
        self.rate_per_second = rate_per_second
        self.burst = burst
        self.monotonic = monotonic
        # Keyed by (id, rate): a credential whose rate the file changes gets a fresh bucket.
        self._buckets: dict[tuple[str, int], TokenBucket] = {}
        self._handlers: dict[str, Handler] = {}

    async def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Handler | None:
        method: str = details.method
        if is_public(method):
            return await continuation(details)
        cached = self._handlers.get(method)
        if cached is not None:
            return cached
        handler = await continuation(details)
        if handler is None:
            return None  # unknown method: gRPC answers UNIMPLEMENTED
        if handler.unary_unary is None:
            log.error("%s is not unary and not public: refused to everyone", method)
            return None
        behavior: Callable[[Any, Context], Awaitable[Any]] = handler.unary_unary  # type: ignore[assignment]
        wrapped = grpc.unary_unary_rpc_method_handler(
            self._guard(method, behavior),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._handlers[method] = wrapped
        return wrapped

    def _guard(
        self, method: str, behavior: Callable[[Any, Context], Awaitable[Any]]
    ) -> Callable[[Any, Context], Awaitable[Any]]:
        async def guarded(request: Any, context: Context) -> Any:
            credential, error = self._check(method, request, context)
            if error is None:
                # For the call's handler (caller_company): this call's task alone sees it.
                _CALLER.set(credential)
                return await behavior(request, context)
            await context.abort_with_status(error.to_status())
            raise AssertionError("abort_with_status returned")  # pragma: no cover

        return guarded

    def check(self, method: str, request: Any, context: Context) -> ApiError | None:
        """None if the call may go on; otherwise the refusal to answer with."""
        return self._check(method, request, context)[1]

    def _check(self, method: str, request: Any, context: Context) -> tuple[Credential | None, ApiError | None]:
        """The caller's credential, and None if it may go on or the refusal to answer with."""
        try:
            credential = self.authenticate(context)
        except ApiError as refused:
            log.info("%s refused: %s (peer %s)", method, refused, context.peer())
            return None, refused
        denied = decide(credential, method, request)
        if denied is not None:
            log.info("%s refused to %s: %s", method, credential.id, denied)
            return credential, denied
        rate = credential.rate_per_second or self.rate_per_second
        bucket = self._buckets.get((credential.id, rate))
        now = self.monotonic()
        if bucket is None:
            bucket = self._buckets[credential.id, rate] = TokenBucket(rate, max(self.burst, 1), now)
        wait = bucket.take(now)
        if wait > 0:
            return credential, ApiError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                ErrorReason.RATE_LIMITED,
                f"credential {credential.id!r} is limited to {rate} calls a second; retry with the same request_id",
                retry_delay_ms=max(1, math.ceil(wait * 1000)),
            )
        return credential, None

    def authenticate(self, context: Context) -> Credential:
        try:
            return self._authenticate(context)
        except ApiError as refused:
            # A credential issued a moment ago works at once: look at the file now rather than
            # at the next poll (a stat; it is read again only if it changed).
            if refused.reason != ErrorReason.CREDENTIALS_INVALID or not self.credentials.reload_if_changed():
                raise
        return self._authenticate(context)

    def _authenticate(self, context: Context) -> Credential:
        key = bearer_key(context.invocation_metadata())
        if key is not None:
            credential = self.credentials.by_id.get(credential_id_of_key(key))
            digest = hashlib.sha256(key.encode()).hexdigest()
            # Compared even for an unknown id, so the answer takes as long either way.
            stored = credential.key_sha256 if credential is not None and credential.key_sha256 else "0" * 64
            if not hmac.compare_digest(digest, stored) or credential is None:
                raise _unauthenticated(ErrorReason.CREDENTIALS_INVALID, "the API key is not valid")
        elif self.mtls:
            # The transport verified the certificate against tls.client_ca_file; only that makes
            # its identities trustworthy, so they are read under mTLS alone.
            identities = [i.decode(errors="replace") for i in context.peer_identities() or ()]
            found = [self.credentials.by_certificate[i] for i in identities if i in self.credentials.by_certificate]
            if not found:
                raise _unauthenticated(
                    ErrorReason.CREDENTIALS_INVALID, "no credential names this client certificate's identity"
                )
            credential = found[0]
        else:
            raise _unauthenticated(
                ErrorReason.CREDENTIALS_MISSING, "this call needs credentials: metadata `authorization: Bearer <key>`"
            )
        if credential.revoked:
            raise _unauthenticated(ErrorReason.CREDENTIAL_REVOKED, f"credential {credential.id!r} has been revoked")
        return credential

    def identify(self, context: Context) -> tuple[str, str]:
        """Who the call is from, as the audit trail names them: (credential id, role); for a
        caller without a valid credential, what it presented (`key:<id>`, `certificate:<identity>`,
        or "") and no role."""
        try:
            credential = self._authenticate(context)
        except ApiError:
            key = bearer_key(context.invocation_metadata())
            if key is not None:
                return f"key:{credential_id_of_key(key)}", ""
            identities = [i.decode(errors="replace") for i in context.peer_identities() or ()] if self.mtls else []
            return (f"certificate:{identities[0]}" if identities else ""), ""
        return credential.id, credential.role.value
