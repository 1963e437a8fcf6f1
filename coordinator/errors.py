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


class ResourceExhausted(FederationError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(FederationError):
    """Transient: the coordinator cannot answer yet (e.g. it is recovering its state); retry."""

    code = grpc.StatusCode.UNAVAILABLE


class Recovering(Unavailable):
    def __init__(self) -> None:
        super().__init__("the coordinator is recovering its state after a restart; retry shortly")
