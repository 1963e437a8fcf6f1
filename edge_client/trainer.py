"""Local training on the device's own data (pure PyTorch, no transport)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedcore.models import Classifier, ClassifierConfig, load_numpy_state, state_to_numpy


@dataclass(frozen=True)
class TrainPlan:
    local_steps: int
    batch_size: int
    learning_rate: float
    strategy: str = "fedavg"
    proximal_mu: float = 0.0


@dataclass(frozen=True)
class TrainResult:
    state: dict[str, np.ndarray]
    num_examples: int
    label_counts: list[int]
    metrics: dict[str, float]
    train_seconds: float


class BatchStream:
    """Minibatches that persist across rounds: shuffled, drop_last, restarting when exhausted.

    This is how FedGen's official users draw batches (get_next_train_batch), so 20 local
    steps walk through the shard instead of re-reading its first 640 examples every round.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self._rng = np.random.default_rng(seed)
        self._order = np.empty(0, dtype=np.int64)
        self._pos = 0

    def next(self, batch_size: int) -> np.ndarray:
        size = min(batch_size, self.n)
        if self._pos + size > len(self._order):
            self._order = self._rng.permutation(self.n)
            self._pos = 0
        idx = self._order[self._pos : self._pos + size]
        self._pos += size
        return idx


class LocalTrainer:
    def __init__(self, images: np.ndarray, labels: np.ndarray, n_classes: int = 10, seed: int = 0,
                 model_config: ClassifierConfig = ClassifierConfig()) -> None:
        """images: normalised float32 [N,1,28,28]; labels: int64 [N]."""
        if len(images) != len(labels) or len(labels) == 0:
            raise ValueError(f"need matching, non-empty images and labels (got {len(images)} and {len(labels)})")
        self.images = torch.from_numpy(images)
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.n_classes = n_classes
        self.model = Classifier(model_config)
        self.batches = BatchStream(len(labels), seed)
        torch.manual_seed(seed)

    def train(self, global_state: dict[str, np.ndarray], plan: TrainPlan) -> TrainResult:
        started = time.monotonic()
        load_numpy_state(self.model, global_state)
        model = self.model
        model.train()
        anchor = [p.detach().clone() for p in model.parameters()] if plan.proximal_mu > 0 else None
        optimizer = torch.optim.SGD(model.parameters(), lr=plan.learning_rate)
        counts = np.zeros(self.n_classes, dtype=np.int64)
        loss_sum, correct, seen = 0.0, 0, 0
        for _ in range(plan.local_steps):
            idx = torch.from_numpy(self.batches.next(plan.batch_size))
            x, y = self.images[idx], self.labels[idx]
            counts += np.bincount(y.numpy(), minlength=self.n_classes)[: self.n_classes]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if anchor is not None:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
                loss = loss + 0.5 * plan.proximal_mu * prox
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        return TrainResult(
            state=state_to_numpy(model),
            num_examples=len(self.labels),
            label_counts=counts.tolist(),
            metrics={"loss": loss_sum / seen, "accuracy": correct / seen, "steps": float(plan.local_steps)},
            train_seconds=time.monotonic() - started,
        )
