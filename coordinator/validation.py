"""Checks an update must pass before it is persisted: the coordinator's input boundary."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedgen.coordinator.errors import InvalidArgument
from fedgen.coordinator.model import StateSpec
from fedgen.export.codec import State

#: Absurd example counts are rejected rather than allowed to dominate a weighted average.
MAX_NUM_EXAMPLES = 100_000_000


class UpdateRejected(InvalidArgument):
    """The update is invalid; the message names the offending tensor or field."""


def validate_state(state: State, spec: StateSpec) -> None:
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


def validate_counts(
    num_examples: int, label_counts: Sequence[int], n_classes: int, max_trained: int | None = None
) -> None:
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
            f"label_counts sum to {total}, more than the {max_trained} examples "
            "the task's local steps x batch size allow"
        )


#: Longest a client may say it trained for (a week): anything above is a broken clock or a lie.
MAX_TRAIN_SECONDS = 7 * 24 * 3600.0


def validate_report(metrics: Mapping[str, float], train_seconds: float) -> None:
    """The numbers a client reports beside its update end up in the ledger: finite and sane."""
    for key, value in metrics.items():
        if not math.isfinite(value):
            raise UpdateRejected(f"metric {key!r} is not finite")
    if not math.isfinite(train_seconds) or not 0 <= train_seconds <= MAX_TRAIN_SECONDS:
        raise UpdateRejected(f"train_seconds must be finite and in [0, {MAX_TRAIN_SECONDS:g}], got {train_seconds!r}")
    correct, total = metrics.get("local_test_correct"), metrics.get("local_test_total")
    if (correct is None) != (total is None):
        raise UpdateRejected("local_test_correct and local_test_total must be reported together")
    whole = correct is not None and total is not None and float(correct).is_integer() and float(total).is_integer()
    if correct is not None and total is not None and not (whole and 0 <= correct <= total <= MAX_NUM_EXAMPLES):
        raise UpdateRejected(
            f"local test counts must be whole numbers with 0 <= correct <= total (got {correct!r} of {total!r})"
        )
