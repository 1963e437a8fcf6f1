"""Checks an update must pass before it is persisted: the coordinator's input boundary."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

State = dict[str, np.ndarray]
Spec = Mapping[str, tuple[tuple[int, ...], np.dtype]]

#: Absurd example counts are rejected rather than allowed to dominate a weighted average.
MAX_NUM_EXAMPLES = 100_000_000


class UpdateRejected(ValueError):
    """The update is invalid; the message names the offending tensor or field."""


def validate_state(state: State, spec: Spec) -> None:
    missing = [k for k in spec if k not in state]
    if missing:
        raise UpdateRejected(f"update is missing tensor(s) {missing}")
    unexpected = [k for k in state if k not in spec]
    if unexpected:
        raise UpdateRejected(f"update has unexpected tensor(s) {unexpected}")
    for key, (shape, dtype) in spec.items():
        arr = state[key]
        if tuple(arr.shape) != tuple(shape):
            raise UpdateRejected(f"update tensor {key!r} has shape {list(arr.shape)}, expected {list(shape)}")
        if arr.dtype != dtype:
            raise UpdateRejected(f"update tensor {key!r} has dtype {arr.dtype}, expected {dtype}")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise UpdateRejected(f"update tensor {key!r} has {bad} non-finite value(s) (NaN or Inf)")


def validate_counts(num_examples: int, label_counts: Sequence[int], n_classes: int,
                    max_trained: int | None = None) -> None:
    """`label_counts` are what the client trained on this round: at most `max_trained`
    (local steps x batch size of its task) in all, and at least one."""
    if num_examples <= 0:
        raise UpdateRejected(f"num_examples must be positive, got {num_examples}")
    if num_examples > MAX_NUM_EXAMPLES:
        raise UpdateRejected(f"num_examples {num_examples} exceeds the limit {MAX_NUM_EXAMPLES}")
    if len(label_counts) != n_classes:
        raise UpdateRejected(f"label_counts has {len(label_counts)} entries, expected {n_classes} (one per label)")
    if sum(label_counts) > MAX_NUM_EXAMPLES:
        raise UpdateRejected(f"label_counts sum to {sum(label_counts)}, above the limit {MAX_NUM_EXAMPLES}")
    total = sum(label_counts)
    if total == 0:
        raise UpdateRejected("label_counts are all zero: the update says it trained on no example")
    if max_trained is not None and total > max_trained:
        raise UpdateRejected(
            f"label_counts sum to {total}, more than the {max_trained} examples the task's local steps x batch size allow"
        )
