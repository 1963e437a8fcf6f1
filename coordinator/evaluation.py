"""A task's contract with the round engine, and the evaluation of a global model on held-out data."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedgen.coordinator.model import EvalResult, ModelContract
from fedgen.core.data import Dataset
from fedgen.core.models import load_numpy_state, state_to_numpy
from fedgen.core.task import PreparedTask
from fedgen.export.codec import State


@torch.no_grad()
def evaluate_state(task: PreparedTask, state: State, data: Dataset, batch_size: int = 1000) -> EvalResult:
    """Accuracy and mean cross-entropy of ``state`` on ``data`` (stored examples, preprocessed by the task)."""
    model = task.model()
    load_numpy_state(model, state)
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(data), batch_size):
        x = task.task.preprocess(torch.from_numpy(data.samples[start : start + batch_size]))
        y = torch.from_numpy(data.labels[start : start + batch_size]).long()
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    n = len(data)
    return EvalResult(correct / n if n else float("nan"), loss_sum / n if n else float("nan"), n)


def task_contract(task: PreparedTask, test: Dataset | None = None, warm_start: State | None = None) -> ModelContract:
    """The task's state spec, a seeded initial model (or the warm start), evaluation on ``test``."""

    def initial_state(seed: int) -> State:
        if warm_start is not None:
            return dict(warm_start)
        torch.manual_seed(seed)
        return state_to_numpy(task.model())

    def evaluate(state: State) -> EvalResult:
        assert test is not None
        return evaluate_state(task, state, test)

    return ModelContract(
        identity=task.identity,
        spec=task.spec,
        n_classes=task.task.n_classes,
        initial_state=initial_state,
        latent_dim=task.latent_dim,
        make_head=task.head,
        generator=task.task.generator,
        evaluate=evaluate if test is not None else None,
        task=task,
    )
