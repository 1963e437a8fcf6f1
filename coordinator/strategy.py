"""Strategies behind one narrow interface: configure a round, aggregate a round.

Aggregation is a pure function of the clients' results; strategies never touch sockets.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from coordinator.config import FedGenConfig, TrainingConfig

State = dict[str, np.ndarray]


@dataclass(frozen=True)
class RoundPlan:
    """What every client of a round is asked to do (sent in TrainTask.config)."""

    local_steps: int
    batch_size: int
    learning_rate: float
    params: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientResult:
    client_id: str
    state: State
    num_examples: int
    label_counts: Sequence[int]
    metrics: Mapping[str, float]


#: Kind of the FedGen generator artifact (an ONNX file) in RoundArtifact and the round store.
GENERATOR_ONNX = "generator_onnx"


@dataclass(frozen=True)
class RoundArtifact:
    """Something besides the global model that every client of a round must hold."""

    kind: str  # GENERATOR_ONNX
    data: bytes


@dataclass(frozen=True)
class Aggregate:
    state: State
    # Strategy-specific figures for the ledger (e.g. generator loss for FedGen).
    extras: dict[str, float] = field(default_factory=dict)


def weighted_average(states: Sequence[tuple[State, float]]) -> State:
    """FedAvg: sum_k (n_k / sum n) * w_k for float tensors.

    Integer tensors (BatchNorm's num_batches_tracked) are counters, not weights: the
    result keeps the largest, so it stays a count rather than a meaningless mean.
    """
    if not states:
        raise ValueError("cannot average zero states")
    total = float(sum(w for _, w in states))
    if not total > 0:
        raise ValueError(f"total weight must be positive, got {total}")
    keys = list(states[0][0])
    out: State = {}
    for key in keys:
        first = states[0][0][key]
        if np.issubdtype(first.dtype, np.floating):
            acc = np.zeros(first.shape, dtype=np.float64)
            for state, weight in states:
                acc += state[key].astype(np.float64) * (weight / total)
            out[key] = acc.astype(first.dtype)
        else:
            out[key] = np.max(np.stack([s[key] for s, _ in states]), axis=0).astype(first.dtype)
    return out


class Strategy(ABC):
    name: str

    def __init__(self, training: TrainingConfig) -> None:
        self.training = training

    def configure_round(self, round_: int) -> RoundPlan:
        t = self.training
        return RoundPlan(t.local_steps, t.batch_size, t.learning_rate * t.lr_decay**round_, self.round_params(round_))

    def round_params(self, round_: int) -> dict[str, float]:
        return {}

    def round_artifacts(self, round_: int) -> list[RoundArtifact]:
        """Extra artifacts for this round's clients (FedGen: the generator)."""
        return []

    def label_space(self, n_classes: int) -> list[int]:
        """Labels clients may sample for a generator regulariser (all, unless a strategy knows better)."""
        return list(range(n_classes))

    def state_bytes(self) -> bytes | None:
        """Strategy state that must survive a restart (FedGen: generator and optimizer), or None."""
        return None

    def load_state_bytes(self, data: bytes) -> None:
        raise ValueError(f"strategy {self.name!r} keeps no state")

    @abstractmethod
    def aggregate_round(self, round_: int, results: Sequence[ClientResult], global_state: State) -> Aggregate:
        """Combine the cohort's results into the next global state."""


class FedAvg(Strategy):
    name = "fedavg"

    def aggregate_round(self, round_: int, results: Sequence[ClientResult], global_state: State) -> Aggregate:
        return Aggregate(weighted_average([(r.state, r.num_examples) for r in results]))


class FedProx(FedAvg):
    """FedAvg aggregation; clients add (mu/2)·||w - w_global||² to their loss."""

    name = "fedprox"

    def round_params(self, round_: int) -> dict[str, float]:
        return {"proximal_mu": self.training.proximal_mu}


STRATEGY_NAMES = ("fedavg", "fedprox", "fedgen")


def make_strategy(name: str, training: TrainingConfig, fedgen: FedGenConfig | None = None, seed: int = 0) -> Strategy:
    if name == "fedavg":
        return FedAvg(training)
    if name == "fedprox":
        return FedProx(training)
    if name == "fedgen":
        from coordinator.fedgen import FedGen  # torch-heavy generator code only when asked for

        return FedGen(training, fedgen or FedGenConfig(), seed)
    raise ValueError(f"unknown strategy {name!r}; available: {', '.join(STRATEGY_NAMES)}")
