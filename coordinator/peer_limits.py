"""Limits per network peer (the caller's IP address), for calls that come before any identity.

A client id's own request budget lives in `auth.RateLimiter`; this bounds what an address can do
before it holds a credential: how fast it may Join, and how many wrong secrets (enrollment token,
client credential, operator token) it may present. Past the failure budget a peer's Join and
Control calls are refused unchecked, so a weak operator-chosen token cannot be guessed at speed,
and its failing Fleet calls are answered RESOURCE_EXHAUSTED with a time to retry. Behind a proxy
every caller has the proxy's address: raise the limits there (or set them to 0).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from fedgen.coordinator import errors
from fedgen.coordinator.auth_bucket import TokenBucket

#: Peers whose buckets are remembered (least recently seen forgotten first).
MAX_PEERS = 100_000


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer string: "ipv4:10.0.0.7:53412" -> "10.0.0.7",
    "ipv6:[::1]:53412" -> "::1"; a unix socket or an unknown form is itself."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        host = rest.rpartition(":")[0] or rest
        return host.strip("[]")
    return peer or "unknown"


class _Buckets:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._by_peer: OrderedDict[str, TokenBucket] = OrderedDict()

    def get(self, host: str) -> TokenBucket:
        bucket = self._by_peer.get(host)
        if bucket is None:
            bucket = self._by_peer[host] = TokenBucket(self.rate, self.burst)
            if len(self._by_peer) > MAX_PEERS:
                self._by_peer.popitem(last=False)
        self._by_peer.move_to_end(host)
        return bucket


class PeerLimits:
    """Join rate and failed-authentication budget per peer address; a rate of 0 disables either."""

    def __init__(
        self,
        joins_per_second: float,
        join_burst: int,
        failures_per_second: float,
        failure_burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._joins = _Buckets(joins_per_second, join_burst)
        self._failures = _Buckets(failures_per_second, failure_burst)
        self._clock = clock

    def check_join(self, peer: str) -> None:
        """RESOURCE_EXHAUSTED when this peer joins faster than allowed (or is locked out)."""
        self.check_not_locked_out(peer)
        if self._joins.rate <= 0:
            return
        host = peer_host(peer)
        if not self._joins.get(host).take(self._clock()):
            raise errors.ResourceExhausted(
                f"join rate limit: {host} exceeded {self._joins.rate:g} joins/s (burst {self._joins.burst})",
                1.0 / self._joins.rate,
            )

    def check_not_locked_out(self, peer: str) -> None:
        """RESOURCE_EXHAUSTED while this peer has spent its failed-authentication budget."""
        if self._failures.rate <= 0:
            return
        host = peer_host(peer)
        if not self._failures.get(host).has_token(self._clock()):
            raise self._locked_out(host)

    def failed(self, peer: str) -> errors.ResourceExhausted | None:
        """Counts a wrong secret from `peer`; the error to answer instead once the budget is spent."""
        if self._failures.rate <= 0:
            return None
        host = peer_host(peer)
        if self._failures.get(host).take(self._clock()):
            return None
        return self._locked_out(host)

    def _locked_out(self, host: str) -> errors.ResourceExhausted:
        rate = self._failures.rate
        return errors.ResourceExhausted(
            f"too many failed authentications from {host} (over {rate:g}/s, burst {self._failures.burst}); "
            "retry later with a valid secret",
            1.0 / rate,
        )
