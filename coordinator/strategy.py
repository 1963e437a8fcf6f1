"""Strategies behind one narrow interface: configure a round, aggregate a round.

A strategy owns everything algorithm-specific the round engine moves without understanding: the
parameters it sends clients, the artifacts it ships beside the global model (with the encodings
each may travel in), the figures it adds to the ledger, and the state it keeps across restarts.
Aggregation is a pure function of the clients' results; strategies never touch sockets.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from fedgen.coordinator import robust
from fedgen.coordinator.config import CoordinatorConfig, StrategyName, TrainingConfig
from fedgen.coordinator.model import ModelContract
from fedgen.coordinator.robust import ROBUST_METRICS, Contribution, RobustSettings, Screened
from fedgen.export.codec import State
from fedgen.export.encoding import Encoding


@dataclass(frozen=True)
class RoundPlan:
    """What every client of a round is asked to do (sent in TrainTask.config)."""

    local_steps: int
    batch_size: int
    learning_rate: float
    params: dict[str, float] = field(default_factory=dict)

    @property
    def max_trained_examples(self) -> int:
        """The most examples a client can have trained on in this round (steps x batch size)."""
        return self.local_steps * self.batch_size


@dataclass(frozen=True)
class ClientResult:
    client_id: str
    state: State
    num_examples: int
    label_counts: Sequence[int]
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class RoundArtifact:
    """Something besides the global model that every client of a round must hold."""

    kind: str  # one of the strategy's ArtifactSpec kinds
    data: bytes


@dataclass(frozen=True)
class ArtifactSpec:
    """One kind of artifact a strategy ships, and how it may travel.

    ``kind`` is the lower-case name of a ``fleet.proto`` ArtifactKind (``generator_onnx`` for
    ARTIFACT_KIND_GENERATOR_ONNX). ``encode`` makes the artifact in another encoding from the
    one the strategy produced (blocking: the engine calls it in a worker thread); ``available``
    says whether this installation can make an encoding at all.
    """

    kind: str
    ladder: tuple[Encoding, ...]  # most faithful first (the adaptive policy chooses among them)
    fixed: Encoding  # what the fixed policy sends
    encode: Callable[[bytes, Encoding], bytes]
    available: Callable[[Encoding], bool] = lambda encoding: True


@dataclass(frozen=True)
class Aggregate:
    state: State
    # Strategy-specific figures for the ledger (their names: Strategy.metric_names).
    extras: dict[str, float] = field(default_factory=dict)


class Strategy(ABC):
    name: StrategyName

    def __init__(self, training: TrainingConfig, robust_settings: RobustSettings | None = None) -> None:
        self.training = training
        self.robust = robust_settings or RobustSettings()

    def configure_round(self, round_: int) -> RoundPlan:
        t = self.training
        return RoundPlan(t.local_steps, t.batch_size, t.learning_rate * t.lr_decay**round_, self.round_params(round_))

    def round_params(self, round_: int) -> dict[str, float]:
        return {}

    def artifact_specs(self) -> tuple[ArtifactSpec, ...]:
        """The kinds of artifact ``round_artifacts`` may return (none for FedAvg)."""
        return ()

    def round_artifacts(self, round_: int) -> list[RoundArtifact]:
        """Extra artifacts for this round's clients (blocking: called in a worker thread)."""
        return []

    def metric_names(self) -> tuple[str, ...]:
        """The ledger extras ``aggregate_round`` reports (the ledger's CSV has a column for each)."""
        return ROBUST_METRICS if self.robust.active else ()

    def screen(
        self, round_: int, results: Sequence[ClientResult], global_state: State
    ) -> tuple[list[ClientResult], Screened]:
        """The results that reach the aggregate, weight-capped and clipped (``robust.screen``)."""
        max_trained = self.configure_round(round_).max_trained_examples
        contributions = [Contribution(r.client_id, r.state, float(r.num_examples)) for r in results]
        screened = robust.screen(self.robust, contributions, global_state, max_trained)
        by_id = {r.client_id: r for r in results}
        return [replace(by_id[c.client_id], state=c.state) for c in screened.contributions], screened

    def combine(self, screened: Screened) -> Aggregate:
        """The screened results combined by the configured aggregator (FedAvg's mean by default)."""
        extras = screened.extras() if self.robust.active else {}
        return Aggregate(robust.aggregate(self.robust, screened), extras)

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
    name: StrategyName = "fedavg"

    def aggregate_round(self, round_: int, results: Sequence[ClientResult], global_state: State) -> Aggregate:
        return self.combine(self.screen(round_, results, global_state)[1])


class FedProx(FedAvg):
    """FedAvg aggregation; clients add (mu/2)·||w - w_global||² to their loss."""

    name: StrategyName = "fedprox"

    def round_params(self, round_: int) -> dict[str, float]:
        return {"proximal_mu": self.training.proximal_mu}


def make_strategy(config: CoordinatorConfig, model: ModelContract) -> Strategy:
    """The strategy the config names (FedGen's torch-heavy generator code is imported only for it)."""
    name = config.federation.strategy
    settings = config.robust.settings()
    if name == "fedavg":
        return FedAvg(config.training, settings)
    if name == "fedprox":
        return FedProx(config.training, settings)
    from fedgen.coordinator.fedgen import FedGen

    return FedGen(config.training, config.fedgen, model, config.bandwidth, config.federation.seed, settings)
