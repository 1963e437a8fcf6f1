"""Authentication, per-client rate limits and request parsing as a gRPC server interceptor.

The interceptor turns away a call before any handler runs: Fleet calls other than Join need a
valid client credential (`authorization: Bearer <credential>`), Control calls need the operator
token when one is configured, and each client gets a token bucket of requests. It is public so
that a coordinator mounted on someone else's `grpc.aio.Server` keeps the same guarantees
(`fedgen.coordinator.server.coordinator_interceptors`). The servicers check credentials again
(defence in depth, and to learn the caller's client id).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

import grpc

from fedgen.coordinator import errors
from fedgen.core.transport import bearer_from_metadata

_LOGGER = logging.getLogger(__name__)

FLEET_PREFIX = "/fedgen.v1.Fleet/"
CONTROL_PREFIX = "/fedgen.v1.Control/"
JOIN_METHOD = FLEET_PREFIX + "Join"


class Authenticator(Protocol):
    def authenticate(self, credential: str | None) -> str: ...


def check_operator(operator_token_sha256: str | None, token: str | None) -> None:
    """Raises Unauthenticated unless `token` hashes to the configured operator token (if any)."""
    if operator_token_sha256 is None:
        return
    digest = hashlib.sha256(token.encode()).hexdigest() if token else ""
    if not hmac.compare_digest(digest, operator_token_sha256):
        raise errors.Unauthenticated("Control needs the operator token: 'authorization: Bearer <token>'")


@dataclass
class TokenBucket:
    """`rate` requests per second sustained, `burst` at once (a pure function of the clock)."""

    rate: float
    burst: int
    tokens: float = field(init=False)
    updated: float = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = float(self.burst)
        self.updated = -1.0

    def take(self, now: float) -> bool:
        if self.updated >= 0:
            self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class RateLimiter:
    """One token bucket per client id; 0 requests per second disables it."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[str, TokenBucket] = {}

    def check(self, client_id: str) -> None:
        if self.rate <= 0:
            return
        bucket = self._buckets.get(client_id)
        if bucket is None:
            bucket = self._buckets[client_id] = TokenBucket(self.rate, self.burst)
        if not bucket.take(self.clock()):
            raise errors.ResourceExhausted(
                f"rate limit: client {client_id} exceeded {self.rate:g} requests/s (burst {self.burst}); slow down"
            )


# Generic in the type stubs only: aliases by name, so nothing subscripts them at run time.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


def _handler_like(handler: Handler, behaviour: Any, streaming_behaviour: Any) -> Handler:
    """A handler of the same shape (unary or streaming each way) as ``handler``, with no request
    deserializer: the behaviour gets the request's raw bytes."""
    kwargs: dict[str, Any] = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming_behaviour, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(behaviour, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming_behaviour, **kwargs)
    return grpc.unary_unary_rpc_method_handler(behaviour, **kwargs)


def _refusal(handler: Handler, code: grpc.StatusCode, message: str) -> Handler:
    """A handler of the same shape as ``handler`` that only aborts with ``code`` (a refused call's
    bytes are never parsed)."""

    async def unary_response(_request: Any, context: Context) -> None:
        await context.abort(code, message)

    async def stream_response(_request: Any, context: Context) -> AsyncIterator[Any]:
        nothing: tuple[Any, ...] = ()
        for item in nothing:  # an async generator, as streaming handlers are, that yields nothing
            yield item
        await context.abort(code, message)

    return _handler_like(handler, unary_response, stream_response)


def _parsing(handler: Handler) -> Handler:
    """The same handler, but it parses request bytes itself: malformed protobuf becomes
    INVALID_ARGUMENT naming the message type, instead of gRPC's UNKNOWN/INTERNAL."""
    parse_bytes: Callable[[bytes], Any] | None = handler.request_deserializer
    if parse_bytes is None:
        return handler
    # grpc.aio handlers are coroutines (the stubs describe the synchronous API).
    inner: Any = handler.stream_stream or handler.stream_unary or handler.unary_stream or handler.unary_unary

    async def parse(raw: bytes, context: Context) -> Any:
        try:
            return parse_bytes(raw)
        except Exception as err:  # DecodeError, or anything a malformed message provokes
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {err}")

    async def parsed(raw_requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[Any]:
        async for raw in raw_requests:
            yield await parse(raw, context)

    async def unary_response(request: Any, context: Context) -> Any:
        parsed_request = parsed(request, context) if handler.request_streaming else await parse(request, context)
        return await inner(parsed_request, context)

    async def stream_response(request: Any, context: Context) -> AsyncIterator[Any]:
        parsed_request = parsed(request, context) if handler.request_streaming else await parse(request, context)
        async for item in inner(parsed_request, context):
            yield item

    return _handler_like(handler, unary_response, stream_response)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Credentials for Fleet, the operator token for Control, a request budget per client.

    Calls to other services on the same server (health, reflection, the user's own) pass untouched.
    """

    def __init__(self, authenticator: Authenticator, operator_token_sha256: str | None, limiter: RateLimiter) -> None:
        self.authenticator = authenticator
        self.operator_token_sha256 = operator_token_sha256
        self.limiter = limiter

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or not method.startswith((FLEET_PREFIX, CONTROL_PREFIX)):
            return handler
        secret = bearer_from_metadata(details.invocation_metadata)
        try:
            if method.startswith(CONTROL_PREFIX):
                check_operator(self.operator_token_sha256, secret)
            elif method != JOIN_METHOD:
                self.limiter.check(self.authenticator.authenticate(secret))
        except (errors.Unauthenticated, errors.ResourceExhausted) as err:
            _LOGGER.info("[%s] %s: %s", method.lstrip("/"), err.code.name, err)
            return _refusal(handler, err.code, str(err))
        return _parsing(handler)
