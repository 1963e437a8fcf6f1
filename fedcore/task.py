"""Tasks: your model and your data, the one thing you write to federate them.

A task is a class with a name, a version, the shape and dtype of one stored example, the number
of classes, a model, and readers for its data. Write one, install it beside this project on the
coordinator host and on each device, and name it once: ``[task] name = "my_pkg.my_task:SensorTask"``
in the coordinator's TOML and ``fedgen-client --task my_pkg.my_task:SensorTask``. Built-in tasks
are found by name (``mnist``, ``fashion-mnist``, ``fashion-mnist-resnet``, ``cifar10``, ``har``);
a package may register its own in the ``fedgen.tasks`` entry-point group.

A minimal task::

    class SensorTask(Task):
        name, version = "vibration", "1"
        input = InputSpec(shape=(3, 64), dtype="float32")  # one stored example
        n_classes = 4

        def build_model(self) -> nn.Module:  # any module; `head` maps the latent to logits
            return nn.Sequential(OrderedDict(
                features=nn.Sequential(nn.Conv1d(3, 16, 5), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten()),
                head=nn.Linear(16, 4)))

        def read_source(self, source: str, split: str) -> Dataset:  # what `fedgen partition` splits
            with np.load(Path(source) / f"{split}.npz") as f:
                return Dataset(f["x"], f["y"].astype(np.int64), name=f"vibration-{split}")

FedGen needs the model split at a latent layer: ``head`` names the submodule that maps the latent
(a ``[batch, features]`` tensor) to logits; the body is everything before it. The split is checked
by a dry forward pass on the input spec (``prepare``), which also finds the latent size the
generator must produce. The state-dict keys of the split model (``body.*``, ``head.*``) are the
names tensors have on the wire.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from fedgen.core.data import DataError, Dataset, load_shard

_LOGGER = logging.getLogger(__name__)

#: The entry-point group packages register tasks in (name = "package.module:Class").
ENTRY_POINT_GROUP = "fedgen.tasks"
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class TaskError(ValueError):
    """A task that cannot be loaded or used; the message names it and what was expected."""


@dataclass(frozen=True)
class InputSpec:
    """One example as it is stored and sent to ``preprocess``: its shape and numpy dtype."""

    shape: tuple[int, ...]
    dtype: str

    def describe(self) -> str:
        return f"{self.dtype} [N, {', '.join(map(str, self.shape))}]"


@dataclass(frozen=True)
class GeneratorHint:
    """FedGen's generator for this task (the coordinator's ``[fedgen]`` config may override it).

    The official code's advice for latents larger than the MNIST CNN's: more hidden units or layers.
    """

    hidden_dims: tuple[int, ...] = (256,)
    noise_dim: int = 32


class Task(ABC):
    """Your model, its inputs and classes, and the readers for your data."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    input: ClassVar[InputSpec]
    n_classes: ClassVar[int]
    #: The submodule that maps the latent to logits (FedGen's generator produces its input).
    head: ClassVar[str] = "head"
    generator: ClassVar[GeneratorHint] = GeneratorHint()

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh, untrained model (the same architecture on every call)."""

    @abstractmethod
    def read_source(self, source: str, split: str) -> Dataset:
        """The data set a federation is drawn from: ``split`` is "train" (what ``fedgen partition``
        splits over devices) or "test" (held out: the coordinator evaluates on it). ``source`` is
        the path the user gave, or "builtin" where the task ships data."""

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of stored examples -> the model's input (e.g. uint8 pixels -> normalised floats)."""
        return x.float()

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Training-time augmentation of a preprocessed batch (none by default)."""
        return x

    def read_local(self, path: Path) -> tuple[Dataset, Dataset | None]:
        """A device's own data: by default a shard file written by ``fedgen partition``."""
        return load_shard(path)

    def read_eval(self, source: str) -> Dataset:
        """The coordinator's held-out set (by default the source's test split)."""
        return self.read_source(source, "test")


# --------------------------------------------------------------------------- the split


class SplitModel(nn.Module):
    """``head(body(x))``: the body maps an input to its latent ``[batch, features]``, the head to logits."""

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.body(x))
        return logits


def _split(task: Task, model: nn.Module) -> SplitModel:
    """The model cut at ``task.head``: that submodule becomes the head, the model without it the body."""
    try:
        head = model.get_submodule(task.head)
    except AttributeError:
        raise TaskError(
            f"task {task.name!r}: the model has no submodule {task.head!r} to use as its head "
            f"(set the task's `head` to the layer that maps the latent to logits)"
        ) from None
    if head is model:
        raise TaskError(f"task {task.name!r}: the head {task.head!r} is the whole model")
    parent_name, _, leaf = task.head.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, nn.Identity())  # the model now ends where the head began: it is the body
    body = getattr(model, "body", None)
    if task.head == "head" and isinstance(body, nn.Module) and len(list(model.children())) == 2:
        return SplitModel(body, head)  # a model already cut as body + head: its own key names
    return SplitModel(model, head)


@dataclass(frozen=True)
class TaskIdentity:
    """What a device and the coordinator must agree on: the task, its version, its tensors."""

    name: str
    version: str
    state_spec_sha256: str

    def describe(self) -> str:
        return f"{self.name} {self.version} (state spec {self.state_spec_sha256[:12]})"


StateSpec = dict[str, tuple[tuple[int, ...], np.dtype[Any]]]


def state_spec(model: nn.Module) -> StateSpec:
    """Key -> (shape, numpy dtype): what a valid update must look like."""
    return {k: (tuple(v.shape), np.dtype(str(v.dtype).removeprefix("torch."))) for k, v in model.state_dict().items()}


def spec_digest(spec: StateSpec) -> str:
    text = json.dumps([[k, list(shape), dtype.str] for k, (shape, dtype) in sorted(spec.items())])
    return hashlib.sha256(text.encode()).hexdigest()


class PreparedTask:
    """A task whose model has been built and checked once: split, latent size, state spec, identity."""

    def __init__(self, task: Task) -> None:
        self.task = task
        dummy = self.task.preprocess(torch.zeros((2, *task.input.shape), dtype=torch_dtype(task.input.dtype)))
        raw = task.build_model()
        raw.eval()
        with torch.no_grad():
            try:
                whole = raw(dummy)
            except Exception as err:
                raise TaskError(
                    f"task {task.name!r}: the model does not accept its input spec "
                    f"{task.input.describe()} after preprocess: {err}"
                ) from None
            model = _split(task, raw)
            latent = model.body(dummy)
            if latent.dim() != 2:
                raise TaskError(
                    f"task {task.name!r}: the body's output has shape {list(latent.shape)}; the head "
                    f"{task.head!r} must take a [batch, features] latent (flatten before it)"
                )
            logits = model.head(latent)
        if logits.shape != whole.shape or not torch.allclose(logits, whole, rtol=1e-5, atol=1e-6):
            raise TaskError(
                f"task {task.name!r}: head(body(x)) differs from the model's own output: its forward "
                f"does more after {task.head!r}; name the layer that maps the latent to logits"
            )
        if tuple(logits.shape) != (2, task.n_classes):
            raise TaskError(
                f"task {task.name!r}: the head gives shape {list(logits.shape)}, expected "
                f"[batch, {task.n_classes}] (one logit per class)"
            )
        self.latent_dim = int(latent.shape[1])
        self.spec = state_spec(model)
        self.identity = TaskIdentity(task.name, task.version, spec_digest(self.spec))
        self.parameters = sum(p.numel() for p in model.parameters())
        self.buffer_names = frozenset(name for name, _ in model.named_buffers())

    def model(self) -> SplitModel:
        return _split(self.task, self.task.build_model())

    def key_map(self) -> dict[str, str]:
        """The model's own state-dict keys (as ``build_model`` names them) -> the split model's keys
        (the wire names), so a state dict saved from the unsplit model can be loaded."""
        raw = self.task.build_model()
        own = {id(t): k for k, t in raw.state_dict(keep_vars=True).items()}
        split = _split(self.task, raw)
        return {own[id(t)]: k for k, t in split.state_dict(keep_vars=True).items() if id(t) in own}

    def head(self) -> nn.Module:
        """A fresh head module (FedGen's teacher is the cohort's heads, loaded into copies of it)."""
        return self.model().head

    def check(self, data: Dataset, what: str) -> Dataset:
        """The data set, if its examples fit the input spec and its labels the classes; else a DataError."""
        spec = self.task.input
        if data.samples.dtype != np.dtype(spec.dtype) or tuple(data.samples.shape[1:]) != spec.shape:
            raise DataError(
                f"{what}: examples are {data.samples.dtype} {list(data.samples.shape)}, task "
                f"{self.task.name!r} expects {spec.describe()}"
            )
        if len(data) and (data.labels.min() < 0 or data.labels.max() >= self.task.n_classes):
            raise DataError(
                f"{what}: labels span {int(data.labels.min())}..{int(data.labels.max())}, task "
                f"{self.task.name!r} has classes 0..{self.task.n_classes - 1}"
            )
        return data


def torch_dtype(name: str) -> torch.dtype:
    try:
        return getattr(torch, np.dtype(name).name)  # type: ignore[no-any-return]
    except (AttributeError, TypeError):
        raise TaskError(f"input dtype {name!r} has no torch equivalent") from None


# --------------------------------------------------------------------------- finding tasks


def available_tasks() -> dict[str, str]:
    """Task name -> import path, for every task registered in the entry-point group."""
    return {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def load_task(spec: str) -> Task:
    """A task by registered name (``mnist``) or import path (``package.module:Class``)."""
    registered = available_tasks()
    path = registered.get(spec, spec)
    if not _IMPORT_PATH.fullmatch(path):
        raise TaskError(
            f"unknown task {spec!r}: give a registered name ({', '.join(sorted(registered)) or 'none'}) "
            "or an import path package.module:Class"
        )
    module_name, _, class_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise TaskError(
            f"task {spec!r}: cannot import {module_name!r} ({err}); is it installed beside fedgen?"
        ) from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TaskError(f"task {spec!r}: {module_name}.{class_name} is not a fedgen Task subclass")
    for attribute in ("name", "input", "n_classes"):
        if not hasattr(cls, attribute):
            raise TaskError(f"task {spec!r}: {class_name} does not set {attribute!r}")
    try:
        return cls()
    except TypeError as err:
        raise TaskError(f"task {spec!r}: {class_name}() cannot be made: {err}") from None


def prepare(spec: str | Task) -> PreparedTask:
    return PreparedTask(load_task(spec) if isinstance(spec, str) else spec)
