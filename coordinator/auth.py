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
from typing import Any, Protocol, TypeAlias

import grpc

from fedgen.coordinator import errors
from fedgen.coordinator.auth_bucket import TokenBucket
from fedgen.coordinator.call_slots import CallSlots
from fedgen.coordinator.cert_identity import check_certified
from fedgen.coordinator.peer_limits import PeerLimits
from fedgen.core.transport import bearer_from_metadata

_LOGGER = logging.getLogger(__name__)

FLEET_PREFIX = "/fedgen.v1.Fleet/"
CONTROL_PREFIX = "/fedgen.v1.Control/"
JOIN_METHOD = FLEET_PREFIX + "Join"
UPLOAD_METHOD = FLEET_PREFIX + "UploadUpdate"

#: Largest request message each call may carry, checked on the raw bytes before they are parsed.
#: Only an upload's payload chunks are large (bounded by server.max_message_bytes); every other
#: message is a few hundred bytes, so a 1.5 MB Join is refused before it costs anything.
MAX_REQUEST_BYTES = 16 * 1024


class Authenticator(Protocol):
    def authenticate(self, credential: str | None) -> str: ...


def check_operator(operator_token_sha256: str | None, token: str | None) -> None:
    """Raises Unauthenticated unless `token` hashes to the configured operator token (if any)."""
    if operator_token_sha256 is None:
        return
    digest = hashlib.sha256(token.encode()).hexdigest() if token else ""
    if not hmac.compare_digest(digest, operator_token_sha256):
        raise errors.Unauthenticated("Control needs the operator token: 'authorization: Bearer <token>'")


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
                f"rate limit: client {client_id} exceeded {self.rate:g} requests/s (burst {self.burst}); slow down",
                1.0 / self.rate,
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


#: Admits a call (returning the caller's client id, if it has one) or raises a FederationError.
Guard: TypeAlias = Callable[[Context], "str | None"]


def _guarded(handler: Handler, guard: Guard, max_request_bytes: int | None, slots: CallSlots) -> Handler:
    """The same handler behind ``guard`` (which refuses the call before a byte of it is parsed)
    and holding one of ``slots`` while it runs, parsing request bytes itself: malformed protobuf
    becomes INVALID_ARGUMENT naming the message type, instead of gRPC's UNKNOWN/INTERNAL, and a
    message over ``max_request_bytes`` is refused unread (RESOURCE_EXHAUSTED)."""
    parse_bytes: Callable[[bytes], Any] | None = handler.request_deserializer
    if parse_bytes is None:
        return handler
    # grpc.aio handlers are coroutines (the stubs describe the synchronous API).
    inner: Any = handler.stream_stream or handler.stream_unary or handler.unary_stream or handler.unary_unary

    async def admit(context: Context) -> str | None:
        try:
            caller = guard(context)
            slots.take(caller)
        except errors.FederationError as err:
            await context.abort(err.code, str(err), errors.trailers(err))
        return caller

    async def parse(raw: bytes, context: Context) -> Any:
        if max_request_bytes is not None and len(raw) > max_request_bytes:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request message of {len(raw)} bytes exceeds this call's limit of {max_request_bytes}",
            )
        try:
            return parse_bytes(raw)
        except Exception as err:  # DecodeError, or anything a malformed message provokes
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {err}")

    async def parsed(raw_requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[Any]:
        async for raw in raw_requests:
            yield await parse(raw, context)

    async def unary_response(request: Any, context: Context) -> Any:
        caller = await admit(context)
        try:
            parsed_request = parsed(request, context) if handler.request_streaming else await parse(request, context)
            return await inner(parsed_request, context)
        finally:
            slots.give_back(caller)

    async def stream_response(request: Any, context: Context) -> AsyncIterator[Any]:
        caller = await admit(context)
        try:
            parsed_request = parsed(request, context) if handler.request_streaming else await parse(request, context)
            async for item in inner(parsed_request, context):
                yield item
        finally:
            slots.give_back(caller)

    return _handler_like(handler, unary_response, stream_response)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Credentials for Fleet, the operator token for Control, a request budget per client, a
    failed-authentication budget per peer address, and caps on calls in flight.

    Calls to other services on the same server (health, reflection, the user's own) pass untouched.
    """

    def __init__(
        self,
        authenticator: Authenticator,
        operator_token_sha256: str | None,
        limiter: RateLimiter,
        peers: PeerLimits | None = None,
        slots: CallSlots | None = None,
        certified_ids: bool = False,
    ) -> None:
        self.authenticator = authenticator
        self.operator_token_sha256 = operator_token_sha256
        self.limiter = limiter
        self.peers = peers or PeerLimits(0, 1, 0, 1)
        self.slots = slots or CallSlots(1 << 62, 1 << 62)
        self.certified_ids = certified_ids  # a credential counts only on its own certificate's connection

    def _check_control(self, secret: str | None, context: Context) -> None:
        peer = context.peer()
        self.peers.check_not_locked_out(peer)  # a weak operator token is not guessed at speed
        try:
            check_operator(self.operator_token_sha256, secret)
        except errors.Unauthenticated as err:
            raise self.peers.failed(peer) or err from None

    def _check_client(self, secret: str | None, context: Context) -> str:
        try:
            client_id = self.authenticator.authenticate(secret)
        except errors.Unauthenticated as err:
            # Credentials are 192-bit secrets: a right one is never refused for its peer's failures.
            raise self.peers.failed(context.peer()) or err from None
        if self.certified_ids:
            check_certified(context.auth_context(), client_id)
        self.limiter.check(client_id)
        return client_id

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
        name = method.lstrip("/")

        def guard(context: Context) -> str | None:
            try:
                if method.startswith(CONTROL_PREFIX):
                    self._check_control(secret, context)
                elif method != JOIN_METHOD:  # Join's enrollment token is checked by the registry
                    return self._check_client(secret, context)
                return None
            except errors.FederationError as err:
                # A peer refused for its failures is not logged per call (a flood would fill the disk).
                level = logging.DEBUG if isinstance(err, errors.ResourceExhausted) else logging.INFO
                _LOGGER.log(level, "[%s] %s from %s: %s", name, err.code.name, context.peer(), err)
                raise

        return _guarded(handler, guard, None if method == UPLOAD_METHOD else MAX_REQUEST_BYTES, self.slots)
