"""Every built-in task federated over real gRPC: `fedgen partition --task`, a coordinator process
and three edge-client processes training with FedGen's generator for three rounds, then the
global model exported over the Control RPC as ONNX and run in onnxruntime against torch.

The MNIST run also has a fourth client that runs another task: it is refused at Join, exits with
status 2, is never sampled, and the next round's ledger row says why.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch

from benchmarks.synthetic_data import write_cifar_binary, write_har_arrays
from fedgen.coordinator.config import parse_config
from fedgen.coordinator.file_blobs import FileBlobStore
from fedgen.coordinator.local import LocalFederation
from fedgen.core.models import load_numpy_state
from fedgen.core.task import prepare
from fedgen.core.transport import bearer_metadata, channel_options
from fedgen.export.codec import bundle_from_bytes, decode_state
from fedgen.v1 import control_pb2, control_pb2_grpc, fleet_pb2, fleet_pb2_grpc

pytestmark = pytest.mark.integration

TOKEN = "tasks-enrollment-token"
OPERATOR = "tasks-operator-token"
BIN = Path(sys.executable).parent


def _source(task: str, mnist_dir: Path, fashion_dir: Path, work: Path) -> Path:
    if task == "mnist":
        return mnist_dir
    if task.startswith("fashion"):
        return fashion_dir
    if task == "cifar10":
        return write_cifar_binary(work / "cifar-10-batches-bin")
    return write_har_arrays(work / "har")


def _export(address: str, request: control_pb2.ExportModelRequest) -> tuple[control_pb2.ExportedModel, bytes]:
    with grpc.insecure_channel(address, channel_options()) as channel:
        stream = control_pb2_grpc.ControlStub(channel).ExportModel(
            request, timeout=120, metadata=bearer_metadata(OPERATOR)
        )
        first = next(stream)
        data = b"".join(m.data for m in stream)
    return first.model, data


@pytest.mark.parametrize("task_name", ["mnist", "fashion-mnist", "fashion-mnist-resnet", "cifar10", "har"])
def test_builtin_task_federates_over_grpc_and_exports(
    task_name: str, mnist_dir: Path, fashion_dir: Path, tmp_path: Path
) -> None:
    task = prepare(task_name)
    source = _source(task_name, mnist_dir, fashion_dir, tmp_path)
    part = subprocess.run(
        [
            str(BIN / "fedgen"),
            "partition",
            "--task",
            task_name,
            "--data-dir",
            str(source),
            "--clients",
            "3",
            "--alpha",
            "1.0",
            "--samples-per-class",
            "40",
            "--out",
            str(tmp_path / "shards"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert part.returncode == 0, part.stderr
    shards = sorted((tmp_path / "shards").glob("client-*.npz"))
    intruder = task_name == "mnist"
    if intruder:
        (tmp_path / "shards" / "client-03.npz").write_bytes(shards[0].read_bytes())
        shards.append(tmp_path / "shards" / "client-03.npz")
    config = parse_config(
        {
            "state_dir": str(tmp_path / "state"),
            "server": {"address": "127.0.0.1:0"},
            "federation": {
                "strategy": "fedgen",
                "rounds": 3,
                "clients_per_round": 3,
                "min_clients": 3,
                "min_completed": 3,
                "round_timeout_s": 120,
                "seed": 1,
            },
            "training": {"local_steps": 10, "learning_rate": 0.02},
            "task": {"name": task_name},
            "data": {"test_data_dir": str(source)},
            "auth": {"enrollment_tokens": [TOKEN], "operator_token": OPERATOR},
        }
    )
    # The intruder runs fashion-mnist, whose network (and so state spec) is MNIST's own: only the
    # task's name tells them apart, and that is enough to be refused.
    per_client = {3: ["--task", "fashion-mnist"]} if intruder else {}
    with LocalFederation(config, shards, tmp_path, per_client_args=per_client) as fed:
        fed.start_coordinator()
        with fed.channel() as channel:
            control = control_pb2_grpc.ControlStub(channel)
            if intruder:  # held until the intruder has been refused, so round 0's row must list it
                control.Pause(control_pb2.PauseRequest(), timeout=10, metadata=fed.control_metadata())
            fed.start_clients(TOKEN)
            if intruder:
                assert fed.client_procs[3].wait(timeout=120) == 2
                control.Resume(control_pb2.ResumeRequest(), timeout=10, metadata=fed.control_metadata())
        codes = fed.wait_clients(timeout_s=600)
        assert codes == ([0, 0, 0, 2] if intruder else [0, 0, 0]), (tmp_path / "client-00.log").read_text()[-2000:]
        rows = fed.ledger()
        with fed.channel() as channel:
            status = control_pb2_grpc.ControlStub(channel).GetStatus(
                control_pb2.GetStatusRequest(), timeout=10, metadata=fed.control_metadata()
            )
        latest, onnx_bytes = _export(fed.address, control_pb2.ExportModelRequest(format=control_pb2.EXPORT_FORMAT_ONNX))
        _, bundle = _export(
            fed.address, control_pb2.ExportModelRequest(format=control_pb2.EXPORT_FORMAT_BUNDLE, round=1)
        )
        with pytest.raises(grpc.RpcError) as missing:
            _export(fed.address, control_pb2.ExportModelRequest(format=control_pb2.EXPORT_FORMAT_ONNX, round=9))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert "round 9 is not committed: committed rounds are 0..2" in (missing.value.details() or "")

    assert [r.round for r in rows] == [0, 1, 2]
    assert all(r.completed == 3 and r.rejected == 0 for r in rows), [(r.completed, r.rejected) for r in rows]
    assert (status.task.name, status.task.state_spec_sha256) == (task_name, task.identity.state_spec_sha256)
    # FedGen's generator was trained from the cohort's heads and shipped from round 1 on.
    assert all(r.extras["generator_onnx_bytes"] > 0 for r in rows)
    assert all(np.isfinite(r.test_loss) for r in rows)
    assert rows[-1].test_accuracy > 1.5 / task.task.n_classes  # learnt something in three short rounds
    if intruder:
        skipped = {s.client_id: s.reason for s in rows[0].skipped}
        assert "fashion-mnist 1, this coordinator trains mnist 1" in skipped["client-03"]
        assert all("client-03" not in {c.client_id for c in r.clients} for r in rows)
        assert "FAILED_PRECONDITION" in (tmp_path / "client-03.log").read_text()

    # The exported files: the latest model as ONNX over the Control stream, round 1's as a bundle.
    assert latest.committed and latest.round == 2 and latest.test_accuracy == pytest.approx(rows[-1].test_accuracy)
    assert hashlib.sha256(onnx_bytes).hexdigest() == latest.sha256 and len(onnx_bytes) == latest.total_size
    assert hashlib.sha256(bundle).hexdigest() == rows[1].model_sha256  # the stored global model, byte for byte
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["fedgen.task"])
    assert (meta["name"], meta["round"], meta["input"]["dtype"]) == (task_name, 2, task.task.input.dtype)
    test = task.task.read_eval(str(source))
    x = test.samples[:64]
    state = decode_state(bundle_from_bytes(FileBlobStore(tmp_path / "state" / "blobs").get(latest.model_sha256)))
    model = task.model()
    load_numpy_state(model, state)
    model.eval()
    with torch.no_grad():
        expected = model(task.task.preprocess(torch.from_numpy(x))).numpy()
    got = session.run(["logits"], {"input": x})[0]
    assert got.shape == (64, task.task.n_classes)
    assert np.abs(got - expected).max() <= 1e-5


def test_a_client_with_another_version_is_refused_at_join(mnist_dir: Path, tmp_path: Path) -> None:
    """Same name, other version; same name and version, other tensors: both FAILED_PRECONDITION."""
    config = parse_config(
        {
            "state_dir": str(tmp_path / "state"),
            "server": {"address": "127.0.0.1:0"},
            "federation": {"strategy": "fedavg", "rounds": 1, "clients_per_round": 1},
            "data": {"test_data_dir": str(mnist_dir)},
            "auth": {"enrollment_tokens": [TOKEN], "operator_token": OPERATOR},
        }
    )
    mine = prepare("mnist").identity
    with LocalFederation(config, [], tmp_path) as fed:
        fed.start_coordinator()
        with grpc.insecure_channel(fed.address, channel_options()) as channel:
            stub = fleet_pb2_grpc.FleetStub(channel)

            def join(task: fleet_pb2.TaskIdentity) -> tuple[grpc.StatusCode, str]:
                with pytest.raises(grpc.RpcError) as err:
                    stub.Join(
                        fleet_pb2.JoinRequest(enrollment_token=TOKEN, requested_client_id="x", task=task), timeout=10
                    )
                return err.value.code(), err.value.details() or ""

            code, msg = join(
                fleet_pb2.TaskIdentity(name="mnist", version="2", state_spec_sha256=mine.state_spec_sha256)
            )
            assert (
                code == grpc.StatusCode.FAILED_PRECONDITION and "task mnist 2, this coordinator trains mnist 1" in msg
            )
            code, msg = join(fleet_pb2.TaskIdentity(name="mnist", version="1", state_spec_sha256="0" * 64))
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "bump the task's version" in msg
            code, msg = join(fleet_pb2.TaskIdentity(name="mnist", version="1", state_spec_sha256="not-hex"))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "state_spec_sha256" in msg
            ok = stub.Join(
                fleet_pb2.JoinRequest(
                    enrollment_token=TOKEN,
                    task=fleet_pb2.TaskIdentity(
                        name=mine.name, version=mine.version, state_spec_sha256=mine.state_spec_sha256
                    ),
                ),
                timeout=10,
            )
            assert ok.client_id and ok.task.name == "mnist" and ok.task.state_spec_sha256 == mine.state_spec_sha256
