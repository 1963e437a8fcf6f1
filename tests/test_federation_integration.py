"""A real federation: a coordinator process, 3 edge-client processes, real MNIST, real sockets.

Beside the three honest clients, this test process joins three protocol-level clients of
its own over the same wire: one sends every kind of bad update, one uploads a valid
update twice with one idempotency key, one takes its task and never answers. The
federation must finish anyway, with each of them in the ledger as what they were.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedgen.coordinator.config import parse_config
from fedgen.coordinator.local import LocalFederation, write_shards
from fedgen.core.data import load_idx_dataset
from fedgen.core.transport import bearer_metadata, channel_options
from fedgen.export.codec import Encoding, bundle_from_bytes, bundle_to_bytes, decode_state, encode_state
from fedgen.v1 import control_pb2, control_pb2_grpc, fleet_pb2, fleet_pb2_grpc

pytestmark = pytest.mark.integration

TOKEN = "integration-enrollment-token"
OPERATOR = "integration-operator-token"


class RawClient:
    """A protocol-level client driven by the test, straight on the generated stubs."""

    def __init__(self, address: str, client_id: str, max_send: int = 4 * 1024 * 1024) -> None:
        opts = [*channel_options(), ("grpc.max_send_message_length", max_send)]
        self.channel = grpc.insecure_channel(address, opts)
        self.stub = fleet_pb2_grpc.FleetStub(self.channel)
        reply = self.stub.Join(fleet_pb2.JoinRequest(enrollment_token=TOKEN, requested_client_id=client_id), timeout=10)
        self.client_id = reply.client_id
        self.md = bearer_metadata(reply.credential)

    def poll_train(self, timeout_s: float = 60) -> fleet_pb2.TrainTask:
        until = time.monotonic() + timeout_s
        while time.monotonic() < until:
            task = self.stub.PollTask(fleet_pb2.PollTaskRequest(max_wait_ms=2000), timeout=10, metadata=self.md)
            if task.HasField("train"):
                return task.train
        raise AssertionError(f"{self.client_id} got no task")

    def download(self, artifact_id: str, offset: int = 0, max_chunk: int = 0) -> list[fleet_pb2.ArtifactChunk]:
        req = fleet_pb2.DownloadRequest(artifact_id=artifact_id, offset=offset, max_chunk_bytes=max_chunk)
        return list(self.stub.DownloadArtifact(req, timeout=10, metadata=self.md))

    def upload(self, task: fleet_pb2.TrainTask, payload: bytes, key: str, **header: object) -> fleet_pb2.UploadAck:
        fields = {
            "round": task.round,
            "task_id": task.task_id,
            "idempotency_key": key,
            "num_examples": 100,
            "label_counts": [10] * 10,
            "payload_bytes": len(payload),
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
        }
        fields.update(header)
        msgs = [fleet_pb2.UploadMessage(header=fleet_pb2.UpdateHeader(**fields))]
        msgs += [fleet_pb2.UploadMessage(chunk=payload[i : i + 65536]) for i in range(0, len(payload), 65536)]
        return self.stub.UploadUpdate(iter(msgs), timeout=20, metadata=self.md)

    def leave(self) -> None:
        self.stub.Leave(fleet_pb2.LeaveRequest(reason="test done"), timeout=10, metadata=self.md)
        self.channel.close()


def _code(fn) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


@pytest.fixture(scope="module")
def federation(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    work = tmp_path_factory.mktemp("fed")
    train = load_idx_dataset(mnist_dir, "train")
    shards, _ = write_shards(train, work / "shards", n_clients=3, alpha=1.0, seed=1, samples_per_class=300)
    config = parse_config(
        {
            "state_dir": str(work / "state"),
            "server": {"address": "127.0.0.1:0", "max_update_bytes": 2 * 1024 * 1024},
            # A short heartbeat timeout: the test's own clients fall out of the sample after round 0.
            # FedAvg: this test is about the protocol; FedGen over the wire has its own test below.
            "federation": {
                "strategy": "fedavg",
                "rounds": 4,
                "clients_per_round": 6,
                "min_clients": 3,
                "min_completed": 3,
                "round_timeout_s": 20,
                "heartbeat_timeout_s": 4,
                "seed": 3,
            },
            "training": {"local_steps": 20, "learning_rate": 0.05},
            "data": {"test_data_dir": str(mnist_dir)},
            "auth": {"enrollment_tokens": [TOKEN], "operator_token": OPERATOR},
        }
    )
    with LocalFederation(config, shards, work) as fed:
        fed.start_coordinator()
        yield fed


def test_federation_with_bad_actors(federation: LocalFederation) -> None:
    fed = federation
    channel = grpc.insecure_channel(fed.address, channel_options())
    control = control_pb2_grpc.ControlStub(channel)
    op = bearer_metadata(OPERATOR)

    # Control needs the operator token.
    code, _ = _code(lambda: control.GetStatus(control_pb2.GetStatusRequest(), timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    # Hold round 0 until all six clients are in, so each of them is sampled.
    control.Pause(control_pb2.PauseRequest(), timeout=5, metadata=op)

    # Joining and authentication errors.
    stub = fleet_pb2_grpc.FleetStub(channel)
    code, msg = _code(lambda: stub.Join(fleet_pb2.JoinRequest(enrollment_token="wrong-token-123"), timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "enrollment token" in msg
    code, _ = _code(
        lambda: stub.PollTask(fleet_pb2.PollTaskRequest(), timeout=5, metadata=bearer_metadata("ghost.secret"))
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, msg = _code(lambda: stub.PollTask(fleet_pb2.PollTaskRequest(), timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "missing credential" in msg

    bad = RawClient(fed.address, "bad-actor", max_send=64 * 1024 * 1024)
    dup = RawClient(fed.address, "duplicator")
    silent = RawClient(fed.address, "silent")
    fed.start_clients(TOKEN)
    until = time.monotonic() + 120
    while control.GetStatus(control_pb2.GetStatusRequest(), timeout=5, metadata=op).connected_clients < 6:
        assert time.monotonic() < until, "client processes did not join"
        for c in (bad, dup, silent):  # stay eligible while the processes start
            c.stub.Heartbeat(fleet_pb2.HeartbeatRequest(), timeout=5, metadata=c.md)
        time.sleep(0.5)
    control.Resume(control_pb2.ResumeRequest(), timeout=5, metadata=op)

    task = bad.poll_train()
    assert task.round == 0 and task.config.local_steps == 20
    model_bytes = b"".join(c.data for c in bad.download(task.global_model.artifact_id))
    assert hashlib.sha256(model_bytes).hexdigest() == task.global_model.artifact_id
    good = decode_state(bundle_from_bytes(model_bytes))

    def payload(state: dict[str, np.ndarray]) -> bytes:
        return bundle_to_bytes(encode_state(state, Encoding()))

    # Wrong shape, wrong dtype, NaN, missing tensor: INVALID_ARGUMENT naming the tensor.
    wrong_shape = dict(good, **{"head.weight": np.zeros((10, 16), np.float32)})
    code, msg = _code(lambda: bad.upload(task, payload(wrong_shape), "k1"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'head.weight' has shape [10, 16], expected [10, 32]" in msg
    wrong_dtype = dict(good, **{"head.bias": good["head.bias"].astype(np.float16)})
    code, msg = _code(lambda: bad.upload(task, payload(wrong_dtype), "k2"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'head.bias' has dtype float16" in msg
    nan = dict(good, **{"body.fc.bias": np.full(32, np.nan, np.float32)})
    code, msg = _code(lambda: bad.upload(task, payload(nan), "k3"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'body.fc.bias' has 32 non-finite" in msg
    missing = {k: v for k, v in good.items() if k != "head.bias"}
    code, msg = _code(lambda: bad.upload(task, payload(missing), "k4"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "head.bias" in msg
    # Bad counts and a digest that does not match.
    code, msg = _code(lambda: bad.upload(task, payload(good), "k5", num_examples=0))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "num_examples" in msg
    code, msg = _code(lambda: bad.upload(task, payload(good), "k5b", label_counts=[100] * 10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "label_counts sum to 1000, more than the 640" in msg
    code, msg = _code(lambda: bad.upload(task, payload(good), "k6", payload_sha256="0" * 64))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "sha256" in msg
    code, msg = _code(lambda: bad.upload(task, b"\xff\x00garbage", "k7"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # A difference against a model this round never sent; a top-k tensor whose bitmap lies;
    # download timings that cannot be true.
    zero_delta = {k: np.zeros_like(v) for k, v in good.items()}
    stranger = bundle_to_bytes(encode_state(zero_delta, Encoding.parse("topk10+zstd"), "e" * 64))
    code, msg = _code(lambda: bad.upload(task, stranger, "k7b"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not round 0's global model" in msg
    lying = encode_state(zero_delta, Encoding.parse("topk10"), task.global_model.artifact_id)
    lying.tensors[0].data = b"\xff" * len(lying.tensors[0].data)
    code, msg = _code(lambda: bad.upload(task, bundle_to_bytes(lying), "k7c"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"tensor {lying.tensors[0].name!r}: top-k" in msg
    timing = fleet_pb2.TransferTiming(artifact_id="x", wire_bytes=10, seconds=1.0, first_chunk_seconds=2.0)
    code, msg = _code(lambda: bad.upload(task, payload(good), "k7d", downloads=[timing]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "first_chunk_seconds <= seconds" in msg
    # Stale / future round and someone else's task: FAILED_PRECONDITION.
    code, msg = _code(lambda: bad.upload(task, payload(good), "k8", round=task.round + 5))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "round 5" in msg
    code, msg = _code(lambda: bad.upload(task, payload(good), "k9", task_id="not-my-task"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    # Oversized: a declared payload over the limit, and one message over the gRPC limit.
    code, msg = _code(lambda: bad.upload(task, payload(good), "k10", payload_bytes=3 * 1024 * 1024))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "exceeds the limit" in msg
    huge = fleet_pb2.UploadMessage(chunk=b"\0" * (5 * 1024 * 1024))
    code, _ = _code(lambda: bad.stub.UploadUpdate(iter([huge]), timeout=20, metadata=bad.md))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Artifacts: unknown id and an offset past the end.
    code, _ = _code(lambda: bad.download("f" * 64))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = _code(lambda: bad.download(task.global_model.artifact_id, offset=len(model_bytes) + 1))
    assert code == grpc.StatusCode.OUT_OF_RANGE
    # An id that is a path, padded to 64 characters, must not walk out of the blob store.
    code, _ = _code(lambda: bad.download("/" + "./" * 26 + "etc//passwd"))
    assert code == grpc.StatusCode.NOT_FOUND

    # A resumed download: the first chunk, then the rest from its offset.
    dup_task = dup.poll_train()
    first = dup.download(dup_task.global_model.artifact_id, max_chunk=4096)[0]
    rest = dup.download(dup_task.global_model.artifact_id, offset=len(first.data))
    assert first.data + b"".join(c.data for c in rest) == model_bytes
    # The same upload twice with one idempotency key: acknowledged twice, counted once.
    update = {k: v * 0.9 if v.dtype.kind == "f" else v for k, v in good.items()}  # not the global model's bytes
    ack1 = dup.upload(dup_task, payload(update), "dup-key", num_examples=50)
    ack2 = dup.upload(dup_task, payload(update), "dup-key", num_examples=50)
    assert ack1.accepted and not ack1.duplicate and ack2.duplicate and ack2.received_bytes == ack1.received_bytes
    # Another client's update is in the store, but it is not published: nobody can download it.
    code, _ = _code(lambda: bad.download(hashlib.sha256(payload(update)).hexdigest()))
    assert code == grpc.StatusCode.NOT_FOUND

    silent.poll_train()  # takes the task, never answers: dropped at the deadline

    # The federation goes on and finishes with the honest clients.
    events = list(fed.events(timeout_s=600))
    assert events[-1].kind == control_pb2.RoundEvent.KIND_FEDERATION_FINISHED
    for c in (bad, dup, silent):
        c.leave()
    assert fed.wait_clients(timeout_s=120) == [0, 0, 0]

    rows = fed.ledger()
    assert [r.round for r in rows] == [0, 1, 2, 3]
    r0 = rows[0]
    assert (r0.cohort_size, r0.completed, r0.rejected, r0.dropped) == (6, 4, 1, 1)
    outcomes = {c.client_id: (c.outcome, c.reason) for c in r0.clients}
    assert outcomes["bad-actor"][0] == "rejected" and outcomes["bad-actor"][1]
    assert outcomes["silent"][0] == "dropped"
    assert outcomes["duplicator"][0] == "completed"
    dup_entry = next(c for c in r0.clients if c.client_id == "duplicator")
    # One upload counted (plus its task poll and download requests), not two.
    assert 0 <= dup_entry.bytes_up - ack1.received_bytes < 256 and dup_entry.num_examples == 50
    for r in rows[1:]:
        assert r.completed == 3 and r.dropped == 0 and r.rejected == 0
    for r in rows:
        assert r.bytes_down > 0 and r.bytes_up > 0
        for c in r.clients:
            if c.outcome == "completed" and c.client_id.startswith("client-"):
                # Down: the task plus the whole model artifact in chunks; up: header plus payload.
                assert c.bytes_down > len(model_bytes) and c.bytes_up > len(model_bytes)
    accuracies = [r.test_accuracy for r in rows]
    assert max(accuracies) > 0.5, accuracies  # chance is 0.1
    assert accuracies[-1] > accuracies[0] - 0.05, accuracies

    # The ledger on disk matches what Control served.
    state = Path(fed.config.state_dir)
    on_disk = [json.loads(line) for line in (state / "ledger.jsonl").read_text().splitlines()]
    assert [r["round"] for r in on_disk] == [0, 1, 2, 3]
    assert all(math.isclose(a["test_accuracy"], b.test_accuracy) for a, b in zip(on_disk, rows, strict=False))
    assert (state / "ledger.csv").read_text().count("\n") == 5

    status = control.GetStatus(control_pb2.GetStatusRequest(), timeout=5, metadata=op)
    assert status.state == control_pb2.FEDERATION_STATE_FINISHED and status.current_round == 4

    # Server reflection (what grpcurl uses) lists our services and the standard ones.
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    (answer,) = list(
        reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    )
    services = {s.name for s in answer.list_services_response.service}
    assert {"fedgen.v1.Fleet", "fedgen.v1.Control", "grpc.health.v1.Health"} <= services
    channel.close()


def test_fedgen_rounds_over_the_wire(mnist_dir: Path, tmp_path: Path) -> None:
    """Three FedGen rounds with real client processes: the generator the coordinator trains from the
    uploaded heads changes every round, travels as an ONNX artifact, and the clients report a non-zero
    regulariser from round 1 on (round 0 is plain local training, as in the official code)."""
    train = load_idx_dataset(mnist_dir, "train")
    test = load_idx_dataset(mnist_dir, "test")
    shards, _ = write_shards(
        train, tmp_path / "shards", n_clients=3, alpha=0.1, seed=2, samples_per_class=200, test=test
    )
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
                "seed": 5,
            },
            "training": {"local_steps": 20, "batch_size": 32, "learning_rate": 0.01},
            "fedgen": {"device": "cpu"},
            "data": {"test_data_dir": str(mnist_dir)},
        }
    )
    with LocalFederation(config, shards, tmp_path) as fed:
        fed.start_coordinator()
        fed.start_clients()
        events = list(fed.events(timeout_s=600))
        assert events[-1].kind == control_pb2.RoundEvent.KIND_FEDERATION_FINISHED
        assert fed.wait_clients(timeout_s=120) == [0, 0, 0]
        rows = fed.ledger()
    assert [r.round for r in rows] == [0, 1, 2]
    for r in rows:
        assert r.completed == 3 and r.rejected == 0
        for key in ("generator_seconds", "generator_teacher_loss", "generator_diversity_loss", "generator_onnx_bytes"):
            assert key in r.extras and math.isfinite(r.extras[key]), (r.round, key)
        regularisers = [c.metrics["regulariser"] for c in r.clients]
        if r.round == 0:
            assert regularisers == [0.0, 0.0, 0.0]
        else:
            assert all(v > 0 and math.isfinite(v) for v in regularisers), regularisers
            # The generator artifact travelled: each client downloaded more than the model alone.
            assert all(c.bytes_down > r.extras["generator_onnx_bytes"] for c in r.clients)
    # The generator the coordinator shipped changed from round to round (trained on the uploaded heads).
    blobs = Path(config.state_dir) / "blobs"
    onnx_blobs = {p.read_bytes() for p in blobs.rglob("*") if p.is_file() and p.read_bytes()[:2] == b"\x08\x08"}
    assert len(onnx_blobs) >= 2
    assert rows[-1].test_accuracy > 0.3  # chance is 0.1
