"""The device's memory budget: what the process uses, what a task would need, and whether it fits.

Measured, not guessed: the resident set and the memory the OS can give come from psutil. The peak
of a round is Linux's VmHWM, reset before each round (``/proc/self/clear_refs``), so the figure
reported for a round is that round's own peak: psutil exposes no resettable peak, so that one
reading is done here. The estimate of what a task needs is a pure function (``plan_task``), so
the decision to decline is testable without a device.
"""

from __future__ import annotations

import gc
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import psutil

from fedgen.core.memory import trim_heap

_LOGGER = logging.getLogger(__name__)

MIB = 1024 * 1024
# The constants below were calibrated on x86_64 (torch 2.13, onnxruntime 1.32) with
# benchmarks/edge_footprint.py: a FedGen round's measured peak stayed 7-17 MiB under the estimate.
#: Head-room kept free for the allocator, Python objects and gRPC buffers during a round.
SAFETY_MIB = 12.0
#: Bytes of activations (forward kept for backward, plus gradients) per training example when the
#: task's model has not been measured on this device (``trainer.activation_bytes_per_example``
#: measures it); this is the MNIST classifier's with margin.
ACTIVATION_BYTES_PER_EXAMPLE = 32 * 1024
#: Copies of the model a round holds at once: the decoded global state, the torch module, its
#: gradients, the FedProx anchor or the encoded upload, and the serialized payload.
MODEL_COPIES = 5
#: onnxruntime's session for the generator: the graph, its weights, arenas; a multiple of its file.
ONNX_SESSION_FACTOR = 4.0
ONNX_SESSION_BASE_MIB = 4.0
_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def rss_mib() -> float | None:
    """Resident set size of this process now, MiB (None where the platform does not say)."""
    try:
        return float(psutil.Process().memory_info().rss) / MIB
    except (psutil.Error, OSError):
        return None


def peak_rss_mib() -> float | None:
    """Peak resident set size since the last ``reset_peak_rss()`` (or process start), MiB; Linux only."""
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024  # "VmHWM:   123456 kB"
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0), so the next peak is one round's own."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def freeze_start_up() -> None:
    """Collects once, then moves every object alive after start-up (torch, onnxruntime, gRPC, the
    task's model and data) into the collector's permanent generation (``gc.freeze``).

    A full collection after start-up walks about 180,000 objects and costs a round as much CPU as
    its 20 training steps (0.1 CPU-s on one x86_64 core) while freeing nothing a round made:
    frozen, the same collection walks only what the round allocated.
    """
    gc.collect()
    gc.freeze()
    trim_heap()


def release_free_memory() -> None:
    """Frees what a round left behind (its reference cycles, then glibc's free pages, back to the
    OS), so the next round's baseline is what the process really holds, not what the allocator
    kept. Cheap only after ``freeze_start_up()``: the collection then skips start-up's objects."""
    gc.collect()
    trim_heap()


def available_memory_mib() -> float | None:
    """What the OS can give a new workload without swapping (Linux's MemAvailable), MiB."""
    try:
        return float(psutil.virtual_memory().available) / MIB
    except (psutil.Error, OSError):
        return None


def effective_budget_mib(
    declared_mib: float, available_mib: float | None, current_rss_mib: float | None
) -> float | None:
    """The budget the client holds itself to: the declared one, but never more than the process
    could grow to (what it holds now plus what the OS says is available). None = no limit known."""
    ceiling = None if available_mib is None else available_mib + (current_rss_mib or 0.0)
    if declared_mib > 0:
        return declared_mib if ceiling is None else min(declared_mib, ceiling)
    return ceiling


@dataclass(frozen=True)
class TaskNeeds:
    """What one local round holds in memory besides what the process holds already."""

    model_bytes: int  # the global model artifact
    generator_bytes: int  # the ONNX generator artifact (0 without FedGen's regulariser)
    batch_size: int  # the task's batch size
    gen_batch_size: int = 0  # generated latents per step (FedGen)
    # Measured on the device for the task's model (a dry training step): bytes one real example
    # holds during a step, and one generated latent (it runs through the head only).
    activation_bytes: int = ACTIVATION_BYTES_PER_EXAMPLE
    latent_bytes: int = ACTIVATION_BYTES_PER_EXAMPLE


@dataclass(frozen=True)
class MemoryPlan:
    fits: bool
    # Examples per forward/backward pass: the task's batch is split into micro-batches whose
    # gradients are accumulated, so the optimisation step is the same.
    micro_batch: int
    needed_mib: float  # estimated peak of the round
    budget_mib: float | None
    reason: str = ""


def plan_task(baseline_mib: float, budget_mib: float | None, needs: TaskNeeds) -> MemoryPlan:
    """The largest micro-batch that keeps the round's estimated peak within the budget.

    peak = baseline (the process now) + model copies + generator session + activations of one
    micro-batch (and the generated latents) + a safety margin.
    """
    fixed = (
        baseline_mib
        + MODEL_COPIES * needs.model_bytes / MIB
        + SAFETY_MIB
        + (ONNX_SESSION_BASE_MIB + ONNX_SESSION_FACTOR * needs.generator_bytes / MIB if needs.generator_bytes else 0.0)
    )
    per_example, per_latent = needs.activation_bytes / MIB, needs.latent_bytes / MIB

    def need(micro: int) -> float:
        return fixed + per_example * micro + per_latent * needs.gen_batch_size

    if budget_mib is None:
        return MemoryPlan(True, needs.batch_size, need(needs.batch_size), None)
    for micro in _divisor_sizes(needs.batch_size):
        if need(micro) <= budget_mib:
            return MemoryPlan(True, micro, need(micro), budget_mib)
    return MemoryPlan(
        False,
        1,
        need(1),
        budget_mib,
        f"needs about {math.ceil(need(1))} MiB even one example at a time; budget {budget_mib:.0f} MiB",
    )


def _divisor_sizes(batch: int) -> list[int]:
    """Micro-batch sizes to try, largest first: the batch, then halvings down to 1."""
    sizes, m = [], max(1, batch)
    while True:
        sizes.append(m)
        if m == 1:
            return sizes
        m = max(1, m // 2)
