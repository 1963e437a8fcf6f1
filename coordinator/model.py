"""What the coordinator needs to know about the model it federates, and nothing more: the state a
valid update must have, the number of classes, how round 0's model is made, and how a global model
is evaluated on held-out data. The round engine sees only this contract, never a network class."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from fedgen.export.codec import State

#: Key -> (shape, dtype): what a valid update must look like.
StateSpec = Mapping[str, tuple[tuple[int, ...], np.dtype[np.generic]]]


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    loss: float
    examples: int


@dataclass(frozen=True)
class ModelContract:
    spec: StateSpec
    n_classes: int
    #: The model of round 0, from a seed (the same seed gives the same model).
    initial_state: Callable[[int], State]
    #: The global model on the held-out set (blocking: the engine calls it in a worker thread); None = no evaluation.
    evaluate: Callable[[State], EvalResult] | None = None

    def tensor_shapes(self) -> dict[str, tuple[tuple[int, ...], bool]]:
        """(shape, is_float) per tensor, for predicting the size of an upload not seen yet."""
        return {k: (shape, dtype.kind == "f") for k, (shape, dtype) in self.spec.items()}
