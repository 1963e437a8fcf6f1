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
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

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


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts with `code`."""

    async def unary_response(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    async def stream_response(_request: Any, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        await context.abort(code, message)
        yield  # pragma: no cover  (makes this an async generator, as streaming handlers are)

    # No request deserializer: a refused call's bytes are never parsed.
    kwargs = dict(request_deserializer=None, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream_response, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary_response, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream_response, **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary_response, **kwargs)


def _parsing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The same handler, but it parses request bytes itself: malformed protobuf becomes
    INVALID_ARGUMENT naming the message type, instead of gRPC's UNKNOWN/INTERNAL."""
    parse_bytes = handler.request_deserializer
    if parse_bytes is None:
        return handler

    async def parse(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return parse_bytes(raw)
        except Exception as err:  # DecodeError, or anything a malformed message provokes
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {err}")

    kwargs = dict(request_deserializer=None, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        async def stream_stream(raw_requests: Any, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
            async def requests():  # type: ignore[no-untyped-def]
                async for raw in raw_requests:
                    yield await parse(raw, context)
            async for item in handler.stream_stream(requests(), context):
                yield item
        return grpc.stream_stream_rpc_method_handler(stream_stream, **kwargs)
    if handler.request_streaming:
        async def stream_unary(raw_requests: Any, context: grpc.aio.ServicerContext) -> Any:
            async def requests():  # type: ignore[no-untyped-def]
                async for raw in raw_requests:
                    yield await parse(raw, context)
            return await handler.stream_unary(requests(), context)
        return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)
    if handler.response_streaming:
        async def unary_stream(raw: bytes, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
            async for item in handler.unary_stream(await parse(raw, context), context):
                yield item
        return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)

    async def unary_unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        return await handler.unary_unary(await parse(raw, context), context)
    return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)


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
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
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
