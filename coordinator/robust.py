"""Robust aggregation: how far one client can pull the global model, bounded.

Plain FedAvg lets a single update set the global model: scale it, and the weighted mean follows.
The defences here compose with any strategy (FedAvg, FedProx, FedGen), all pure numpy, applied in
this order to the cohort's accepted updates:

1. Weight cap (``cap_weights``): an update's weight is its claimed example count, at most what the
   round's local steps x batch size could have trained on, so a lying count buys nothing.
2. Norm clipping (``clip_norm``): the update (the client's state minus the global one, over the
   float tensors) is scaled down to at most that L2 norm.
3. The aggregator: ``mean`` (weighted, FedAvg's), coordinate-wise ``trimmed-mean`` (the
   ``trim_fraction`` largest and smallest values of every coordinate dropped) or ``median``, or
   ``krum`` / ``multi-krum`` (Blanchard et al., NeurIPS 2017: keep the update(s) closest to their
   n - f - 2 nearest neighbours, for at most f = ``byzantine`` attackers, then average those).

Integer tensors (BatchNorm's ``num_batches_tracked``) are counters: the plain mean keeps the
largest, as before; every robust aggregator takes their median, which one client cannot move.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from fedgen.export.codec import State

AggregatorName = Literal["mean", "trimmed-mean", "median", "krum", "multi-krum"]

#: Ledger extras robust aggregation adds to every round when any defence is on.
ROBUST_METRICS = ("robust_clipped_updates", "robust_excluded_updates", "robust_max_update_norm")


class RobustError(ValueError):
    """A cohort the configured aggregator cannot combine (too few updates for Krum's f)."""


@dataclass(frozen=True)
class RobustSettings:
    """``[robust]`` as the strategies use it (see ``config.RobustConfig`` for the ranges)."""

    aggregator: AggregatorName = "mean"
    trim_fraction: float = 0.2
    byzantine: int = 1
    multi_krum_keep: int | None = None  # None: n - f
    clip_norm: float | None = None
    cap_weights: bool = False

    @property
    def active(self) -> bool:
        return self.aggregator != "mean" or self.clip_norm is not None or self.cap_weights

    def min_updates(self) -> int:
        """The fewest updates the aggregator needs (Krum: n > 2f + 2)."""
        return 2 * self.byzantine + 3 if self.aggregator in ("krum", "multi-krum") else 1


@dataclass(frozen=True)
class Contribution:
    """One accepted update as the aggregator sees it."""

    client_id: str
    state: State
    weight: float


@dataclass(frozen=True)
class Screened:
    """The updates that reach the aggregate, and what the defences did to the cohort."""

    contributions: list[Contribution]
    excluded: list[str] = field(default_factory=list)  # by Krum
    clipped: list[str] = field(default_factory=list)
    max_norm: float = 0.0  # the largest update norm before clipping

    def extras(self) -> dict[str, float]:
        return {
            "robust_clipped_updates": float(len(self.clipped)),
            "robust_excluded_updates": float(len(self.excluded)),
            "robust_max_update_norm": round(self.max_norm, 6),
        }


def float_keys(state: State) -> list[str]:
    return [k for k, v in state.items() if np.issubdtype(v.dtype, np.floating)]


def update_vector(state: State, global_state: State, keys: Sequence[str]) -> np.ndarray:
    """The update as one float64 vector: the client's float tensors minus the global ones."""
    if not keys:
        return np.zeros(0)
    return np.concatenate([(state[k].astype(np.float64) - global_state[k].astype(np.float64)).ravel() for k in keys])


def clip_state(state: State, global_state: State, keys: Sequence[str], max_norm: float) -> tuple[State, float]:
    """The state whose update has L2 norm at most ``max_norm``, and the norm it had."""
    norm = float(np.linalg.norm(update_vector(state, global_state, keys)))
    if norm <= max_norm:
        return state, norm
    scale = max_norm / norm
    out = dict(state)
    for k in keys:
        g = global_state[k].astype(np.float64)
        out[k] = (g + (state[k].astype(np.float64) - g) * scale).astype(state[k].dtype)
    return out, norm


def krum_scores(vectors: np.ndarray, byzantine: int) -> np.ndarray:
    """Each update's summed squared distance to its n - f - 2 nearest other updates."""
    n = len(vectors)
    sq = np.sum(vectors**2, axis=1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * vectors @ vectors.T, 0.0)
    neighbours = n - byzantine - 2
    scores = np.empty(n)
    for i in range(n):
        others = np.sort(np.delete(dist[i], i))
        scores[i] = float(np.sum(others[:neighbours]))
    return scores


def screen(
    settings: RobustSettings, results: Sequence[Contribution], global_state: State, max_trained: int
) -> Screened:
    """Steps 1 and 2, then Krum's selection: what reaches the aggregate."""
    if len(results) < settings.min_updates():
        raise RobustError(
            f"{settings.aggregator} with byzantine = {settings.byzantine} needs at least "
            f"{settings.min_updates()} updates, the round has {len(results)}"
        )
    if not settings.active:  # FedAvg as it always was: no norms computed, nothing to report
        return Screened(list(results))
    keys = float_keys(global_state)
    kept: list[Contribution] = []
    clipped: list[str] = []
    max_norm = 0.0
    for c in results:
        weight = min(c.weight, float(max_trained)) if settings.cap_weights else c.weight
        state = c.state
        if settings.clip_norm is not None:
            state, norm = clip_state(state, global_state, keys, settings.clip_norm)
            if norm > settings.clip_norm:
                clipped.append(c.client_id)
        else:
            norm = float(np.linalg.norm(update_vector(state, global_state, keys)))
        max_norm = max(max_norm, norm if math.isfinite(norm) else math.inf)
        kept.append(replace(c, state=state, weight=weight))
    excluded: list[str] = []
    if settings.aggregator in ("krum", "multi-krum"):
        vectors = np.stack([update_vector(c.state, global_state, keys) for c in kept])
        order = np.argsort(krum_scores(vectors, settings.byzantine), kind="stable")
        keep = 1 if settings.aggregator == "krum" else (settings.multi_krum_keep or len(kept) - settings.byzantine)
        chosen = set(order[: min(keep, len(kept))].tolist())
        excluded = [c.client_id for i, c in enumerate(kept) if i not in chosen]
        kept = [c for i, c in enumerate(kept) if i in chosen]
    return Screened(kept, excluded, clipped, max_norm)


def weighted_average(states: Sequence[tuple[State, float]]) -> State:
    """FedAvg: sum_k (n_k / sum n) * w_k for float tensors.

    Integer tensors (BatchNorm's num_batches_tracked) are counters, not weights: the result keeps
    the largest, so it stays a count rather than a meaningless mean.
    """
    if not states:
        raise ValueError("cannot average zero states")
    total = float(sum(w for _, w in states))
    if not total > 0:
        raise ValueError(f"total weight must be positive, got {total}")
    out: State = {}
    for key, first in states[0][0].items():
        if np.issubdtype(first.dtype, np.floating):
            acc = np.zeros(first.shape, dtype=np.float64)
            for state, weight in states:
                acc += state[key].astype(np.float64) * (weight / total)
            out[key] = acc.astype(first.dtype)
        else:
            out[key] = np.max(np.stack([s[key] for s, _ in states]), axis=0).astype(first.dtype)
    return out


def coordinate_wise(
    contributions: Sequence[Contribution], how: Literal["trimmed-mean", "median"], trim: float
) -> State:
    """Coordinate-wise trimmed mean or median (unweighted: a weight is a claim, a value is a vote)."""
    out: State = {}
    n = len(contributions)
    cut = math.floor(trim * n) if how == "trimmed-mean" else 0
    for key, first in contributions[0].state.items():
        stacked = np.stack([c.state[key].astype(np.float64) for c in contributions])
        if not np.issubdtype(first.dtype, np.floating):
            out[key] = np.rint(np.median(stacked, axis=0)).astype(first.dtype)
        elif how == "median":
            out[key] = np.median(stacked, axis=0).astype(first.dtype)
        else:
            ordered = np.sort(stacked, axis=0)
            out[key] = ordered[cut : n - cut].mean(axis=0).astype(first.dtype)
    return out


def aggregate(settings: RobustSettings, screened: Screened) -> State:
    """Step 3: the screened updates combined by the configured aggregator."""
    if settings.aggregator in ("trimmed-mean", "median"):
        return coordinate_wise(screened.contributions, settings.aggregator, settings.trim_fraction)
    if settings.aggregator in ("krum", "multi-krum"):
        # Krum's survivors are averaged; their weights no longer decide much, so they are equal.
        return weighted_average([(c.state, 1.0) for c in screened.contributions])
    return weighted_average([(c.state, c.weight) for c in screened.contributions])


def first_non_finite(state: State) -> str | None:
    """The first tensor holding NaN or Inf, or None: such a model is never committed."""
    for key, value in state.items():
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
            return key
    return None
