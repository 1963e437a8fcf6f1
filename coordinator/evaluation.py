"""The built-in classifier's contract with the round engine, and its evaluation on held-out data."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from fedgen.coordinator.model import EvalResult, ModelContract
from fedgen.core.models import Classifier, ClassifierConfig, load_numpy_state, state_spec, state_to_numpy
from fedgen.export.codec import State


@torch.no_grad()
def evaluate_state(
    state: State,
    images: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64],
    config: ClassifierConfig = ClassifierConfig(),
    batch_size: int = 1000,
) -> EvalResult:
    """Accuracy and mean cross-entropy of `state` on normalised images [N,1,28,28]."""
    model = Classifier(config)
    load_numpy_state(model, state)
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(labels), batch_size):
        x = torch.from_numpy(images[start : start + batch_size])
        y = torch.from_numpy(labels[start : start + batch_size]).long()
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    n = len(labels)
    return EvalResult(correct / n if n else float("nan"), loss_sum / n if n else float("nan"), n)


def classifier_contract(
    config: ClassifierConfig = ClassifierConfig(),
    test_set: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]] | None = None,
) -> ModelContract:
    """FedGen's MNIST classifier: its state spec, a seeded initial model, evaluation on ``test_set``."""

    def initial_state(seed: int) -> State:
        torch.manual_seed(seed)
        return state_to_numpy(Classifier(config))

    def evaluate(state: State) -> EvalResult:
        assert test_set is not None
        return evaluate_state(state, *test_set, config)

    return ModelContract(
        state_spec(Classifier(config)), config.n_classes, initial_state, evaluate if test_set is not None else None
    )
