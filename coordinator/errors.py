"""Domain errors raised by the round engine; servicers map each to one gRPC status code."""
from __future__ import annotations


class FederationError(Exception):
    """Base: the message is sent to the caller verbatim, so it must say what was wrong."""


class Unauthenticated(FederationError):
    pass


class PermissionDenied(FederationError):
    pass


class InvalidArgument(FederationError):
    pass


class FailedPrecondition(FederationError):
    pass


class NotFound(FederationError):
    pass


class OutOfRange(FederationError):
    pass


class ResourceExhausted(FederationError):
    pass


class Unavailable(FederationError):
    """Transient: the coordinator cannot answer yet (e.g. it is recovering its state); retry."""
