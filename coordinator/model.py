"""What the coordinator needs to know about the model it federates, and nothing more: the task's
identity, the state a valid update must have, the number of classes, how round 0's model is made,
how a global model is evaluated on held-out data, and (for FedGen) the latent size and a head to
teach the generator with. The round engine sees only this contract, never a network class; it is
made from a task (``fedgen.core.task``) by ``evaluation.task_contract``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from fedgen.core.task import GeneratorHint, PreparedTask, TaskIdentity
from fedgen.export.codec import State

#: Key -> (shape, dtype): what a valid update must look like.
StateSpec = Mapping[str, tuple[tuple[int, ...], np.dtype[np.generic]]]
#: State-dict keys of the head start with this (``head.weight``, ``head.bias`` for a Linear head).
HEAD_PREFIX = "head."


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    loss: float
    examples: int


@dataclass(frozen=True)
class ModelContract:
    identity: TaskIdentity
    spec: StateSpec
    n_classes: int
    #: The model of round 0, from a seed (the same seed gives the same model).
    initial_state: Callable[[int], State]
    #: The size of the latent the head takes (what FedGen's generator must produce).
    latent_dim: int
    #: A fresh head module; FedGen loads each client's ``head.*`` tensors into it to teach the generator.
    make_head: Callable[[], nn.Module]
    generator: GeneratorHint = field(default_factory=GeneratorHint)
    #: The global model on the held-out set (blocking: the engine calls it in a worker thread); None = no evaluation.
    evaluate: Callable[[State], EvalResult] | None = None
    #: The task itself, for exporting a global model as a deployable file (None: exports are refused).
    task: PreparedTask | None = None

    def tensor_shapes(self) -> dict[str, tuple[tuple[int, ...], bool]]:
        """(shape, is_float) per tensor, for predicting the size of an upload not seen yet."""
        return {k: (shape, dtype.kind == "f") for k, (shape, dtype) in self.spec.items()}

    def head_state(self, state: State) -> dict[str, np.ndarray]:
        """The head's tensors of a model state, keyed as the head module names them."""
        return {k.removeprefix(HEAD_PREFIX): v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
