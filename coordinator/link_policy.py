"""Per-client encodings chosen from measured link speed: a pure policy and the estimate it uses.

Every transfer is timed (downloads by the client, uploads by the coordinator). The
``LinkEstimator`` keeps an exponentially weighted mean of each client's throughput per
direction, seeded by the link the device declared when it joined. ``choose_encodings`` is a
pure function: given each transfer's encodings (most faithful first, with their sizes), a
link and a budget in seconds, it keeps everything as faithful as the budget allows,
degrading first the transfer whose next encoding saves the most time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from fedgen.export.encoding import Encoding

Direction = Literal["down", "up"]

#: Throughput assumed for a client that declared none and has not been measured yet (bits/s).
DEFAULT_ASSUMED_BPS = 20e6
#: Per-transfer latency assumed until one has been measured.
DEFAULT_ASSUMED_LATENCY_S = 0.05
#: Transfers smaller than this teach the rate estimate nothing: latency and buffering dominate
#: them (a 6 KB upload can reach the coordinator in one burst faster than the link's rate).
MIN_OBSERVED_BYTES = 16 * 1024


@dataclass(frozen=True)
class Rung:
    """One encoding of one transfer and its size on the wire."""

    encoding: Encoding
    size_bytes: int


@dataclass(frozen=True)
class Transfer:
    """Something a client must move this round, with its encodings, most faithful first."""

    key: str  # "model", "upload", or an artifact kind of the strategy
    direction: Direction
    rungs: tuple[Rung, ...]

    def __post_init__(self) -> None:
        if not self.rungs:
            raise ValueError(f"transfer {self.key!r} has no encodings")


@dataclass(frozen=True)
class Link:
    down_bps: float
    up_bps: float
    # Time per transfer that does not depend on its size (request round trip).
    latency_s: float = 0.0

    def seconds(self, direction: Direction, size_bytes: int) -> float:
        bps = self.down_bps if direction == "down" else self.up_bps
        return self.latency_s + 8.0 * size_bytes / max(bps, 1.0)


@dataclass(frozen=True)
class EncodingPlan:
    choices: dict[str, Encoding]  # transfer key -> encoding
    sizes: dict[str, int]
    expected_s: float
    fits: bool  # False: even the most compact encodings exceed the budget

    @property
    def names(self) -> dict[str, str]:
        return {key: encoding.name for key, encoding in self.choices.items()}


def choose_encodings(transfers: list[Transfer], link: Link, budget_s: float) -> EncodingPlan:
    """The most faithful encodings whose expected total transfer time fits ``budget_s``.

    ``budget_s <= 0`` means no budget: every transfer keeps its first (most faithful)
    encoding. Otherwise, while the plan is over budget, the transfer whose next smaller
    encoding saves the most seconds steps down (ties: the earlier transfer). When nothing
    can step down any more the most compact plan is returned with ``fits=False``.
    """
    level = {t.key: 0 for t in transfers}

    def cost(t: Transfer, i: int) -> float:
        return link.seconds(t.direction, t.rungs[i].size_bytes)

    def total() -> float:
        return sum(cost(t, level[t.key]) for t in transfers)

    def next_smaller(t: Transfer) -> int | None:
        current = t.rungs[level[t.key]].size_bytes
        for i in range(level[t.key] + 1, len(t.rungs)):
            if t.rungs[i].size_bytes < current:
                return i
        return None

    while budget_s > 0 and total() > budget_s:
        best: tuple[float, Transfer, int] | None = None
        for t in transfers:
            i = next_smaller(t)
            if i is None:
                continue
            saving = cost(t, level[t.key]) - cost(t, i)
            if best is None or saving > best[0]:
                best = (saving, t, i)
        if best is None:
            break
        level[best[1].key] = best[2]
    expected = total()
    return EncodingPlan(
        choices={t.key: t.rungs[level[t.key]].encoding for t in transfers},
        sizes={t.key: t.rungs[level[t.key]].size_bytes for t in transfers},
        expected_s=expected,
        fits=budget_s <= 0 or expected <= budget_s,
    )


@dataclass(frozen=True)
class DownloadTiming:
    """One download as the client timed it: from its request to the last byte, and to the first chunk."""

    wire_bytes: int
    seconds: float
    first_chunk_seconds: float = 0.0
    first_chunk_bytes: int = 0

    def valid(self) -> bool:
        return (
            math.isfinite(self.seconds)
            and math.isfinite(self.first_chunk_seconds)
            and 0 <= self.first_chunk_seconds <= self.seconds <= 86_400
            and 0 <= self.first_chunk_bytes <= self.wire_bytes
        )


@dataclass
class LinkEstimator:
    """EWMAs of each client's measured throughput per direction and of its per-transfer latency.

    Throughput is seeded by the client's declared profile; the first measurement replaces the
    declaration, later ones are averaged in. A download's chunks after the first
    measure the rate; the first chunk, less its own transmission time, measures the latency
    (request round trip) that every transfer pays whatever its size.
    """

    weight: float = 0.5  # of the newest measurement
    assumed_bps: float = DEFAULT_ASSUMED_BPS
    assumed_latency_s: float = DEFAULT_ASSUMED_LATENCY_S
    _down: dict[str, float] = field(default_factory=dict)
    _up: dict[str, float] = field(default_factory=dict)
    _latency: dict[str, float] = field(default_factory=dict)
    _measured: set[tuple[str, str]] = field(default_factory=set)  # (client, "down" | "up") seen on the wire

    def seed(self, client_id: str, down_bps: float, up_bps: float) -> None:
        """The device's own claim, used until a transfer has been measured."""
        if down_bps > 0:
            self._down.setdefault(client_id, float(down_bps))
        if up_bps > 0:
            self._up.setdefault(client_id, float(up_bps))

    def observe(self, client_id: str, direction: Direction, wire_bytes: int, seconds: float) -> float | None:
        """Folds in one timed transfer; returns its throughput, or None if too small to learn from."""
        if wire_bytes < MIN_OBSERVED_BYTES or not seconds > 0 or not math.isfinite(seconds):
            return None
        bps = 8.0 * wire_bytes / seconds
        table = self._down if direction == "down" else self._up
        if (client_id, direction) not in self._measured:  # a measurement beats a declaration
            self._measured.add((client_id, direction))
            table.pop(client_id, None)
        self._fold(table, client_id, bps)
        return bps

    def observe_download(self, client_id: str, t: DownloadTiming) -> None:
        """Rate from the chunks after the first (when there are enough of them), latency from the first."""
        if not t.valid() or t.wire_bytes == 0:
            return
        if t.first_chunk_bytes:
            self.observe(client_id, "down", t.wire_bytes - t.first_chunk_bytes, t.seconds - t.first_chunk_seconds)
            rate = self._down.get(client_id, self.assumed_bps)
            self._fold(self._latency, client_id, max(0.0, t.first_chunk_seconds - 8.0 * t.first_chunk_bytes / rate))
        else:
            self.observe(client_id, "down", t.wire_bytes, t.seconds)

    def _fold(self, table: dict[str, float], client_id: str, value: float) -> None:
        previous = table.get(client_id)
        table[client_id] = value if previous is None else (1 - self.weight) * previous + self.weight * value

    def link(self, client_id: str) -> Link:
        return Link(
            self._down.get(client_id, self.assumed_bps),
            self._up.get(client_id, self.assumed_bps),
            self._latency.get(client_id, self.assumed_latency_s),
        )
