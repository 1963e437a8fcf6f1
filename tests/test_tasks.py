"""The task interface: finding tasks, the split checked by a dry forward pass, the built-ins' sizes,
their readers, warm starts, the coordinator's start-up checks, and every bad input a clear error."""

from __future__ import annotations

import asyncio
import io
from collections import OrderedDict
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.synthetic_data import write_cifar_binary, write_har_arrays
from fedgen.coordinator.config import parse_config
from fedgen.coordinator.engine import TaskMismatch
from fedgen.coordinator.server import build_federation
from fedgen.coordinator.task_setup import fit_state, load_task_contract, read_warm_start
from fedgen.core.data import DataError, Dataset
from fedgen.core.models import state_to_numpy
from fedgen.core.task import InputSpec, Task, TaskError, available_tasks, load_task, prepare, spec_digest
from fedgen.core.tasks.cifar10 import read_cifar_binary
from fedgen.edge.trainer import activation_bytes_per_example, choose_onednn, latent_bytes_per_example
from fedgen.export.model_export import model_to_bundle, model_to_torch


class _Sensor(Task):
    name, version = "sensor", "1"
    input = InputSpec(shape=(4, 16), dtype="float32")
    n_classes = 3
    layers: ClassVar[dict[str, nn.Module]] = {}

    def build_model(self) -> nn.Module:
        return nn.Sequential(
            OrderedDict(features=nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU()), head=nn.Linear(8, 3))
        )

    def read_source(self, source: str, split: str) -> Dataset:
        raise NotImplementedError


class _NoHead(_Sensor):
    head = "classifier"


class _HeadNotLast(_Sensor):
    def build_model(self) -> nn.Module:
        return nn.Sequential(
            OrderedDict(
                features=nn.Sequential(nn.Flatten(), nn.Linear(64, 8)), head=nn.Linear(8, 3), after=nn.Softmax(1)
            )
        )


class _ImageLatent(_Sensor):
    def build_model(self) -> nn.Module:
        return nn.Sequential(OrderedDict(features=nn.Conv1d(4, 4, 3), head=nn.Linear(14, 3)))


class _WrongLogits(_Sensor):
    n_classes = 5


class _WrongInput(_Sensor):
    input = InputSpec(shape=(4, 15), dtype="float32")


# ------------------------------------------------------------------ finding tasks


def test_the_builtin_tasks_are_registered_by_name() -> None:
    assert {"mnist", "fashion-mnist", "fashion-mnist-resnet", "cifar10", "har"} <= set(available_tasks())
    assert load_task("fedgen.core.tasks.images:MnistCnn").name == "mnist"  # by import path too


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no-such-task", "unknown task 'no-such-task': give a registered name"),
        ("no_such_pkg.mod:Task", "cannot import 'no_such_pkg.mod'"),
        ("fedgen.core.data:Dataset", "is not a fedgen Task subclass"),
        ("fedgen.core.tasks.images:Nope", "is not a fedgen Task subclass"),
    ],
)
def test_a_task_that_cannot_be_loaded_says_why(spec: str, message: str) -> None:
    with pytest.raises(TaskError, match=message):
        load_task(spec)


@pytest.mark.parametrize(
    ("task", "message"),
    [
        (_NoHead(), "no submodule 'classifier' to use as its head"),
        (_HeadNotLast(), r"head\(body\(x\)\) differs from the model's own output"),
        (_ImageLatent(), r"body's output has shape \[2, 4, 14\]; the head 'head' must take a \[batch, features\]"),
        (_WrongLogits(), r"the head gives shape \[2, 3\], expected \[batch, 5\]"),
        (_WrongInput(), r"does not accept its input spec float32 \[N, 4, 15\]"),
    ],
)
def test_a_model_without_a_usable_split_is_refused(task: Task, message: str) -> None:
    with pytest.raises(TaskError, match=message):
        prepare(task)


# ------------------------------------------------------------------ the built-ins


@pytest.mark.parametrize(
    ("name", "params", "latent", "hidden"),
    [
        ("mnist", 26_434, 32, (256,)),
        ("fashion-mnist", 26_434, 32, (256,)),
        ("fashion-mnist-resnet", 77_754, 64, (256, 256)),
        ("cifar10", 174_274, 96, (512,)),
        ("har", 16_518, 64, (128,)),
    ],
)
def test_builtin_tasks_sizes(name: str, params: int, latent: int, hidden: tuple[int, ...]) -> None:
    task = prepare(name)
    assert (task.parameters, task.latent_dim, task.task.generator.hidden_dims) == (params, latent, hidden)
    assert all(k.startswith(("body.", "head.")) for k in task.spec)
    assert task.identity.state_spec_sha256 == spec_digest(task.spec)


def test_the_mnist_task_keeps_the_wire_names_of_the_network_it_replaces() -> None:
    task = prepare("mnist")
    assert list(task.spec)[:2] == ["body.conv0.weight", "body.conv0.bias"]
    assert task.spec["head.weight"][0] == (10, 32)
    # mnist and fashion-mnist share a network, so a spec; only the name tells their clients apart.
    assert prepare("fashion-mnist").identity.state_spec_sha256 == task.identity.state_spec_sha256


def test_memory_per_example_is_measured_for_each_model() -> None:
    small, big = prepare("mnist"), prepare("cifar10")
    assert 20_000 < activation_bytes_per_example(small) < 200_000  # a few feature maps of 28x28
    assert activation_bytes_per_example(big) > 20 * activation_bytes_per_example(small)
    assert latent_bytes_per_example(small) < activation_bytes_per_example(small)


def test_cifar_binary_reader_checks_every_length(tmp_path: Path) -> None:
    folder = write_cifar_binary(tmp_path / "cifar-10-batches-bin", per_file=20, test=30)
    train = prepare("cifar10").task.read_source(str(folder), "train")
    assert train.samples.shape == (100, 3, 32, 32) and train.samples.dtype == np.uint8
    raw = (folder / "test_batch.bin").read_bytes()
    assert int(prepare("cifar10").task.read_eval(str(tmp_path)).labels[0]) == raw[0]  # the parent folder works too
    (tmp_path / "short.bin").write_bytes(raw[:-1])
    with pytest.raises(DataError, match="is not a whole number of 3073-byte CIFAR-10 records"):
        read_cifar_binary(tmp_path / "short.bin")
    bad = bytearray(raw)
    bad[0] = 12
    (tmp_path / "label.bin").write_bytes(bytes(bad))
    with pytest.raises(DataError, match="a record has label 12"):
        read_cifar_binary(tmp_path / "label.bin")
    (folder / "data_batch_3.bin").unlink()
    with pytest.raises(DataError, match=r"missing CIFAR-10 binary file\(s\) \['data_batch_3.bin'\]"):
        prepare("cifar10").task.read_source(str(folder), "train")


def test_har_reader_and_the_input_check(tmp_path: Path) -> None:
    task = prepare("har")
    folder = write_har_arrays(tmp_path / "har", train=30, test=10)
    assert len(task.check(task.task.read_source(str(folder), "train"), "har")) == 30
    with pytest.raises(DataError, match="windows file not found"):
        task.task.read_source(str(tmp_path), "train")
    np.savez(tmp_path / "train.npz", x=np.zeros((5, 9, 100), np.float32), y=np.zeros(5, np.int64))
    with pytest.raises(
        DataError, match=r"examples are float32 \[5, 9, 100\], task 'har' expects float32 \[N, 9, 128\]"
    ):
        task.check(task.task.read_source(str(tmp_path), "train"), "the shard")
    np.savez(tmp_path / "train.npz", x=np.zeros((5, 9, 128), np.float32), y=np.full(5, 6))
    with pytest.raises(DataError, match=r"labels span 6..6, task 'har' has classes 0..5"):
        task.check(task.task.read_source(str(tmp_path), "train"), "the shard")


# ------------------------------------------------------------------ warm starts


def _trained_like(seed: int) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    return state_to_numpy(prepare("mnist").model())


def test_warm_start_from_a_torch_state_dict_with_the_models_own_keys(tmp_path: Path) -> None:
    task = prepare(_Sensor())
    raw = task.task.build_model()  # keys as the user's model names them: features.*, head.*
    path = tmp_path / "pretrained.pt"
    torch.save(raw.state_dict(), path)
    state = read_warm_start(path, task)
    assert set(state) == set(task.spec)
    np.testing.assert_array_equal(state["body.features.1.weight"], raw.state_dict()["features.1.weight"].numpy())


def test_warm_start_round_trips_through_the_exported_formats(tmp_path: Path) -> None:
    task, state = prepare("mnist"), _trained_like(3)
    for name, data in (("m.bundle", model_to_bundle(state)), ("m.pt", model_to_torch(state))):
        (tmp_path / name).write_bytes(data)
        loaded = read_warm_start(tmp_path / name, task)
        assert all(np.array_equal(loaded[k], state[k]) for k in state)


def test_a_warm_start_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    task = prepare("mnist")
    cifar = state_to_numpy(prepare("cifar10").model())
    (tmp_path / "cifar.bundle").write_bytes(model_to_bundle(cifar))
    with pytest.raises(TaskError, match=r"warm start .*cifar.bundle for task mnist 1 .*: keys differ: missing"):
        read_warm_start(tmp_path / "cifar.bundle", task)
    wrong = _trained_like(0)
    wrong["head.weight"] = np.zeros((10, 31), np.float32)
    with pytest.raises(TaskError, match=r"tensor 'head.weight' has shape \[10, 31\], expected \[10, 32\]"):
        fit_state(wrong, task.spec, "warm start")
    nan = _trained_like(0)
    nan["head.bias"][3] = np.nan
    with pytest.raises(TaskError, match=r"tensor 'head\.bias' has NaN or infinite values"):
        fit_state(nan, task.spec, "warm start")
    buffer = io.BytesIO()
    torch.save([1, 2, 3], buffer)
    (tmp_path / "list.pt").write_bytes(buffer.getvalue())
    with pytest.raises(TaskError, match="holds a list, expected a state dict of tensors"):
        read_warm_start(tmp_path / "list.pt", task)
    (tmp_path / "junk.bin").write_bytes(b"\x00junk" * 10)
    with pytest.raises(TaskError, match="neither a torch state dict nor a TensorBundle"):
        read_warm_start(tmp_path / "junk.bin", task)
    with pytest.raises(TaskError, match="cannot read it"):
        read_warm_start(tmp_path / "absent.pt", task)


# ------------------------------------------------------------------ the coordinator's start-up checks


def test_a_config_that_contradicts_its_task_is_refused() -> None:
    with pytest.raises(TaskError, match=r"data\.n_classes is 7 but task 'mnist' has 10 classes"):
        load_task_contract(parse_config({"data": {"n_classes": 7}}))
    with pytest.raises(DataError, match="task 'fashion-mnist' ships no data"):
        load_task_contract(parse_config({"task": {"name": "fashion-mnist"}}))
    with pytest.raises(TaskError, match="unknown task 'nope'"):
        load_task_contract(parse_config({"task": {"name": "nope"}}))


def test_warm_start_is_round_zeros_model(tmp_path: Path) -> None:
    state = _trained_like(7)
    (tmp_path / "warm.pt").write_bytes(model_to_torch(state))
    config = parse_config({"state_dir": str(tmp_path / "s"), "task": {"warm_start": str(tmp_path / "warm.pt")}})

    async def initial_model() -> dict[str, np.ndarray]:
        fed = await build_federation(config)
        try:
            return fed.load_state(fed.engine.global_model_sha)
        finally:
            await fed.close()

    got = asyncio.run(initial_model())
    assert all(np.array_equal(got[k], state[k]) for k in state)


def test_a_state_folder_of_another_task_is_refused(tmp_path: Path, fashion_dir: Path) -> None:
    async def start(raw: dict[str, object]) -> None:
        fed = await build_federation(parse_config({"state_dir": str(tmp_path / "s"), **raw}))
        await fed.close()

    asyncio.run(start({}))  # an MNIST federation
    other = {"task": {"name": "fashion-mnist-resnet"}, "data": {"test_data_dir": str(fashion_dir)}}
    with pytest.raises(
        TaskMismatch, match=r"holds a federation of task mnist 1 .* configured for fashion-mnist-resnet"
    ):
        asyncio.run(start(other))
    asyncio.run(start({}))  # and the MNIST one resumes


def test_onednn_is_timed_only_for_models_big_enough_to_gain() -> None:
    use, why = choose_onednn(prepare("mnist"))
    assert not use and "too small to gain" in why and not torch.backends.mkldnn.enabled
    use, why = choose_onednn(prepare("cifar10"))
    assert ("with" in why and "without" in why) or not torch.backends.mkldnn.is_available()
    assert torch.backends.mkldnn.enabled == use
    torch.backends.mkldnn.enabled = True  # type: ignore[assignment]  # as the rest of the suite expects
