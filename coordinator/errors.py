"""Domain errors: each carries the gRPC status code it answers with, so the servicers and the
auth interceptor share one mapping (``err.code``) and the round engine never imports a servicer."""

from __future__ import annotations

from typing import ClassVar

import grpc


class FederationError(Exception):
    """Base: the message is sent to the caller verbatim, so it must say what was wrong."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN


class Unauthenticated(FederationError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(FederationError):
    code = grpc.StatusCode.PERMISSION_DENIED


class InvalidArgument(FederationError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(FederationError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class NotFound(FederationError):
    code = grpc.StatusCode.NOT_FOUND


class OutOfRange(FederationError):
    code = grpc.StatusCode.OUT_OF_RANGE


class AlreadyExists(FederationError):
    code = grpc.StatusCode.ALREADY_EXISTS


class DeadlineExceeded(FederationError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


#: The trailer that tells a client when a refused call may be tried again (gRPC's server pushback,
#: gRFC A6). Only transient refusals carry it; a client retries RESOURCE_EXHAUSTED only with it.
PUSHBACK_TRAILER = "grpc-retry-pushback-ms"


class ResourceExhausted(FederationError):
    """Over a limit. With `retry_after_s` the limit is transient (a rate, a shared buffer, a full
    disk) and the caller hears when to retry; without it, retrying the same call cannot succeed."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def trailers(err: FederationError) -> tuple[tuple[str, str], ...]:
    """Trailing metadata for an error's status: the pushback of a transient refusal."""
    retry_after_s = getattr(err, "retry_after_s", None)
    if retry_after_s is None:
        return ()
    return ((PUSHBACK_TRAILER, str(max(1, round(retry_after_s * 1000)))),)


class Unavailable(FederationError):
    """Transient: the coordinator cannot answer yet (e.g. it is recovering its state); retry."""

    code = grpc.StatusCode.UNAVAILABLE


class Recovering(Unavailable):
    def __init__(self) -> None:
        super().__init__("the coordinator is recovering its state after a restart; retry shortly")
