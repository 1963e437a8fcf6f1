"""The task a coordinator federates, made ready at start-up: loaded, checked by a dry forward
pass, its held-out set read and checked, and a warm-start model (if any) checked against it, all
before the port opens, so a task that does not fit is an error at start-up and never mid-round."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from google.protobuf.message import DecodeError

from fedgen.coordinator.config import CoordinatorConfig
from fedgen.coordinator.evaluation import task_contract
from fedgen.coordinator.model import ModelContract, StateSpec
from fedgen.core.task import PreparedTask, TaskError, prepare
from fedgen.export.codec import CodecError, State, bundle_from_bytes, decode_state

_LOGGER = logging.getLogger(__name__)
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format


def load_task_contract(config: CoordinatorConfig) -> tuple[PreparedTask, ModelContract]:
    """The configured task and its contract with the round engine (blocking: run it in a thread)."""
    task = prepare(config.task.name)
    n_classes = config.data.n_classes
    if n_classes is not None and n_classes != task.task.n_classes:
        raise TaskError(
            f"data.n_classes is {n_classes} but task {task.task.name!r} has {task.task.n_classes} "
            "classes (drop data.n_classes or fix it)"
        )
    source = config.data.test_data_dir
    test = task.check(task.task.read_eval(source), f"the held-out set of task {task.task.name!r} ({source})")
    _LOGGER.info(
        "task %s: %d parameters, latent %d, %d held-out examples",
        task.identity.describe(),
        task.parameters,
        task.latent_dim,
        len(test),
    )
    warm = read_warm_start(Path(config.task.warm_start).expanduser(), task) if config.task.warm_start else None
    return task, task_contract(task, test, warm)


def read_warm_start(path: Path, task: PreparedTask) -> State:
    """A trained model to start round 0 from: a ``torch.save``d state dict (the split model's keys or
    the model's own) or a TensorBundle (``fedgen export --format bundle``), checked against the task."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise TaskError(f"warm start {path}: cannot read it: {err.strerror}") from None
    what = f"warm start {path}"
    if data.startswith(_ZIP_MAGIC):
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many kinds for a damaged or hostile file
            raise TaskError(f"{what}: not a loadable torch state dict ({err})") from None
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise TaskError(f"{what}: holds a {type(loaded).__name__}, expected a state dict of tensors")
        keys = task.key_map()
        state = {keys.get(str(k), str(k)): v.detach().cpu().numpy() for k, v in loaded.items()}
    else:
        try:
            state = decode_state(bundle_from_bytes(data))
        except (CodecError, DecodeError, ValueError) as err:
            raise TaskError(f"{what}: neither a torch state dict nor a TensorBundle ({err})") from None
    return fit_state(state, task.spec, f"{what} for task {task.identity.describe()}")


def fit_state(state: State, spec: StateSpec, what: str) -> State:
    """``state`` in exactly the spec's keys, shapes and dtypes (floats may be cast), all finite."""
    missing, unexpected = sorted(set(spec) - set(state)), sorted(set(state) - set(spec))
    if missing or unexpected:
        raise TaskError(
            f"{what}: keys differ: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    out: State = {}
    for key, (shape, dtype) in spec.items():
        array = np.asarray(state[key])
        if tuple(array.shape) != shape:
            raise TaskError(f"{what}: tensor {key!r} has shape {list(array.shape)}, expected {list(shape)}")
        if array.dtype != dtype and not (array.dtype.kind == "f" and dtype.kind == "f"):
            raise TaskError(f"{what}: tensor {key!r} is {array.dtype}, expected {dtype}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise TaskError(f"{what}: tensor {key!r} has NaN or infinite values")
        out[key] = np.array(array, dtype=dtype, order="C")  # (ascontiguousarray makes a 0-d array 1-d)
    if not out:
        raise TaskError(f"{what}: the state is empty")
    return out
