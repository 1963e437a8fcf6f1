"""Evaluation of the global model on held-out data (server side)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedcore.models import Classifier, ClassifierConfig, load_numpy_state


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    loss: float
    examples: int


@torch.no_grad()
def evaluate_state(
    state: dict[str, np.ndarray],
    images: np.ndarray,
    labels: np.ndarray,
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
