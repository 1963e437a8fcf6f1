"""Which refusals mean "try later", and how long to wait: one policy for every Python client.

"Try later" is UNAVAILABLE (the link dropped, the coordinator restarts or drains), CANCELLED (a
call gRPC's server held in its backlog past ``server.max_pending_wait_s``, or a draining server),
DEADLINE_EXCEEDED (a coordinator that hangs rather than goes away) and RESOURCE_EXHAUSTED when it
is transient: the coordinator's own limits then send a retry delay in the ``grpc-retry-pushback-ms``
trailer (gRFC A6), and gRPC's backlog refusal ("Too many pending requests") and concurrency limit
are transient by nature. A RESOURCE_EXHAUSTED without pushback from anything else (a message over
the size limit, a federation at ``auth.max_clients``) cannot succeed when repeated.

Waits are exponential with full jitter, so a crowd refused together does not return together;
a server's pushback is a floor, jittered upward by up to half.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

#: gRPC's server pushback trailer (gRFC A6): how long to wait before retrying a refused call.
PUSHBACK_TRAILER = "grpc-retry-pushback-ms"
#: Codes that mean the call may succeed later, whatever their details say.
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED})
#: RESOURCE_EXHAUSTED details that gRPC itself sends for an overloaded server (no pushback).
OVERLOAD_DETAILS = ("Too many pending requests", "Concurrent RPC limit exceeded")


def pushback_s(err: grpc.RpcError) -> float | None:
    """The wait a refusal asked for, in seconds; None when it carries no pushback."""
    trailing = getattr(err, "trailing_metadata", None)
    for key, value in (trailing() if callable(trailing) else None) or ():
        if key == PUSHBACK_TRAILER and isinstance(value, str) and value.isdigit():
            return int(value) / 1000
    return None


def is_overload(err: grpc.RpcError) -> bool:
    """gRPC's own "server too busy" refusals, which carry no pushback."""
    details = err.details() or ""
    return err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and any(d in details for d in OVERLOAD_DETAILS)


@dataclass(frozen=True)
class RetryPolicy:
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 15.0
    multiplier: float = 2.0
    # Give up on a call after retrying this long (a device may be offline for a while).
    give_up_after_s: float = 600.0

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(max, initial * multiplier**attempt)]."""
        return rng.uniform(0, min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**attempt))

    def delay(self, err: grpc.RpcError, attempt: int, rng: random.Random) -> float | None:
        """How long to wait before retrying `err`'s call; None when retrying cannot help."""
        pushback = pushback_s(err)
        if pushback is not None and (err.code() in TRANSIENT or err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED):
            # At least what the server asked for, jittered so refused clients do not return at once.
            return min(self.max_backoff_s, pushback) * rng.uniform(1.0, 1.5)
        if err.code() in TRANSIENT or is_overload(err):
            return self.backoff(attempt, rng)
        return None
