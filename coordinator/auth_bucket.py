"""A token bucket: the one rate-limit primitive (per client id in `auth`, per peer in `peer_limits`)."""

from __future__ import annotations

from dataclasses import dataclass, field


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

    def has_token(self, now: float) -> bool:
        """Whether `take` would succeed now (takes nothing)."""
        if self.updated >= 0:
            return min(float(self.burst), self.tokens + (now - self.updated) * self.rate) >= 1.0
        return self.burst >= 1
