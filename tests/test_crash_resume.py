"""A coordinator killed with SIGKILL and restarted on the same state loses nothing it acknowledged.

Real processes, killed for real: the coordinator is a child process that gets SIGKILL in the
middle of a round (and, in the second test, in the middle of an upload), then starts again on
the same state directory and port. The clients are never told: they reconnect by themselves.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest

from fedgen.coordinator.config import parse_config
from fedgen.coordinator.local import LocalFederation, write_shards
from fedgen.core.data import load_idx_dataset
from fedgen.core.transport import bearer_metadata, channel_options
from fedgen.export.codec import Encoding, bundle_from_bytes, bundle_to_bytes, decode_state, encode_state
from fedgen.v1 import control_pb2, fleet_pb2, fleet_pb2_grpc

pytestmark = pytest.mark.integration

TOKEN = "crash-test-enrollment-token"
EVENT = control_pb2.RoundEvent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(state_dir: Path, port: int, mnist_dir: Path, **federation: object) -> object:
    return parse_config(
        {
            "state_dir": str(state_dir),
            "server": {"address": f"127.0.0.1:{port}"},
            "federation": {"strategy": "fedavg", "seed": 7, **federation},
            "training": {"local_steps": 20, "learning_rate": 0.05},
            "data": {"test_data_dir": str(mnist_dir)},
            "auth": {"enrollment_tokens": [TOKEN]},
        }
    )


def _read_ledger(state_dir: Path) -> list[dict]:
    path = state_dir / "ledger.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_sigkill_mid_round_resumes_the_same_federation(mnist_dir: Path, tmp_path: Path) -> None:
    train = load_idx_dataset(mnist_dir, "train")
    shards, _ = write_shards(train, tmp_path / "shards", n_clients=3, alpha=1.0, seed=4, samples_per_class=200)
    state = tmp_path / "state"
    config = _config(
        state,
        _free_port(),
        mnist_dir,
        rounds=4,
        clients_per_round=3,
        min_clients=3,
        min_completed=3,
        round_timeout_s=120,
    )
    with LocalFederation(config, shards, tmp_path, client_log_level="INFO") as fed:
        fed.start_coordinator()
        fed.start_clients(TOKEN)
        accepted_before_kill: list[str] = []
        for event in fed.events(timeout_s=300):
            if event.kind == EVENT.KIND_UPDATE_ACCEPTED and event.round == 1:
                accepted_before_kill.append(event.client_id)
                break  # one update of round 1 is acknowledged and the round is still open: kill now
        assert fed.coordinator_proc is not None
        fed.coordinator_proc.kill()  # SIGKILL: no shutdown code runs
        fed.coordinator_proc.wait()
        before = _read_ledger(state)
        assert [r["round"] for r in before] == [0]

        fed.start_coordinator()  # same state dir, same port; the clients reconnect on their own
        events = list(fed.events(timeout_s=300))
        assert events[-1].kind == EVENT.KIND_FEDERATION_FINISHED
        assert fed.wait_clients(timeout_s=120) == [0, 0, 0]
        rows = fed.ledger()

    assert [r.round for r in rows] == [0, 1, 2, 3]
    assert rows[0].model_sha256 == before[0]["model_sha256"]  # round 0 was not redone
    assert all(r.completed == 3 and r.rejected == 0 for r in rows)
    # The update acknowledged before the kill was used, not trained again: every client trained
    # each round exactly once, and the restarted coordinator said it recovered that update.
    for shard in shards:
        log = (tmp_path / f"{shard.stem}.log").read_text()
        for round_ in range(4):
            assert log.count(f"round {round_}: update accepted") == 1, (shard.stem, round_, log[-2000:])
    coordinator_log = (tmp_path / "coordinator.log").read_text()
    assert "recovered round 1 with" in coordinator_log
    recovered = int(coordinator_log.split("recovered round 1 with ")[1].split()[0])
    assert recovered >= len(accepted_before_kill) == 1


def _task_and_update(
    stub: fleet_pb2_grpc.FleetStub, md: tuple[tuple[str, str], ...], key: str, scale: float = 1.0
) -> tuple[fleet_pb2.TrainTask, fleet_pb2.UpdateHeader, bytes]:
    """A raw client's TRAIN task, and a valid update for it (the global model, floats scaled)."""
    task = None
    while task is None:
        reply = stub.PollTask(fleet_pb2.PollTaskRequest(max_wait_ms=2000), timeout=10, metadata=md)
        task = reply.train if reply.HasField("train") else None
    model = b"".join(
        c.data
        for c in stub.DownloadArtifact(
            fleet_pb2.DownloadRequest(artifact_id=task.global_model.artifact_id), timeout=10, metadata=md
        )
    )
    state = decode_state(bundle_from_bytes(model))
    payload = bundle_to_bytes(
        encode_state({k: v * scale if v.dtype.kind == "f" else v for k, v in state.items()}, Encoding())
    )
    header = fleet_pb2.UpdateHeader(
        round=task.round,
        task_id=task.task_id,
        idempotency_key=key,
        num_examples=100,
        label_counts=[10] * 10,
        payload_bytes=len(payload),
        payload_sha256=hashlib.sha256(payload).hexdigest(),
    )
    return task, header, payload


class _PausableUpload:
    """An upload stream that sends the header and the first chunk, then waits to be released."""

    def __init__(self, header: fleet_pb2.UpdateHeader, payload: bytes, chunk: int) -> None:
        self.header, self.payload, self.chunk = header, payload, chunk
        self.first_chunk_sent = threading.Event()
        self.release = threading.Event()

    def __iter__(self):  # type: ignore[no-untyped-def]
        yield fleet_pb2.UploadMessage(header=self.header)
        yield fleet_pb2.UploadMessage(chunk=self.payload[: self.chunk])
        self.first_chunk_sent.set()
        self.release.wait(60)
        for start in range(self.chunk, len(self.payload), self.chunk):
            yield fleet_pb2.UploadMessage(chunk=self.payload[start : start + self.chunk])


def test_sigkill_during_an_upload_then_the_retry_counts_once(mnist_dir: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = _config(
        state,
        _free_port(),
        mnist_dir,
        rounds=1,
        clients_per_round=1,
        min_clients=1,
        min_completed=1,
        round_timeout_s=300,
    )
    with LocalFederation(config, [], tmp_path) as fed:
        fed.start_coordinator()
        channel = grpc.insecure_channel(fed.address, channel_options())
        stub = fleet_pb2_grpc.FleetStub(channel)
        joined = stub.Join(fleet_pb2.JoinRequest(enrollment_token=TOKEN, requested_client_id="raw-device"), timeout=10)
        md = bearer_metadata(joined.credential)
        _, header, payload = _task_and_update(stub, md, "raw-device:upload-1", scale=0.5)

        stream = _PausableUpload(header, payload, chunk=16 * 1024)
        future = stub.UploadUpdate.future(iter(stream), timeout=60, metadata=md)
        assert stream.first_chunk_sent.wait(30)
        assert fed.coordinator_proc is not None
        fed.coordinator_proc.kill()  # mid-upload: header and one chunk in, no ack
        fed.coordinator_proc.wait()
        stream.release.set()
        with pytest.raises(grpc.RpcError) as cut:
            future.result()
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        assert _read_ledger(state) == []  # nothing was acknowledged, nothing was committed

        fed.start_coordinator()
        channel.close()
        channel = grpc.insecure_channel(fed.address, channel_options())
        stub = fleet_pb2_grpc.FleetStub(channel)

        def upload() -> fleet_pb2.UploadAck:
            msgs = [fleet_pb2.UploadMessage(header=header)] + [
                fleet_pb2.UploadMessage(chunk=payload[i : i + 65536]) for i in range(0, len(payload), 65536)
            ]
            return stub.UploadUpdate(iter(msgs), timeout=30, metadata=md)

        # The credential survived the crash (stored hashed on disk) and the recovered round still
        # holds this client's task, so the retry with the same idempotency key is accepted.
        until = time.monotonic() + 60
        while True:
            try:
                ack = upload()
                break
            except grpc.RpcError as err:  # the restarted server may still be starting up
                if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > until:
                    raise
                time.sleep(0.2)
        assert ack.accepted and not ack.duplicate and ack.round == 0
        again = upload()
        assert again.duplicate and again.received_bytes == ack.received_bytes
        events = list(fed.events(timeout_s=120))
        assert events[-1].kind == EVENT.KIND_FEDERATION_FINISHED
        rows = fed.ledger()
        channel.close()

    assert len(rows) == 1 and rows[0].completed == 1
    (entry,) = rows[0].clients
    assert entry.client_id == "raw-device" and entry.outcome == "completed"
    # The update counted once (the cut attempt not at all), plus the small task-poll and download requests.
    assert 0 <= entry.bytes_up - ack.received_bytes < 256, (entry.bytes_up, ack.received_bytes)


def test_sigterm_drains_an_upload_in_flight(mnist_dir: Path, tmp_path: Path) -> None:
    """SIGTERM mid-upload: the coordinator stops taking new calls, lets the upload finish and
    acknowledges it, exits 0; restarted, it commits the round with that update."""
    import signal

    state = tmp_path / "state"
    config = _config(
        state,
        _free_port(),
        mnist_dir,
        rounds=1,
        clients_per_round=1,
        min_clients=1,
        min_completed=1,
        round_timeout_s=300,
    )
    with LocalFederation(config, [], tmp_path) as fed:
        fed.start_coordinator()
        channel = grpc.insecure_channel(fed.address, channel_options())
        stub = fleet_pb2_grpc.FleetStub(channel)
        md = bearer_metadata(stub.Join(fleet_pb2.JoinRequest(enrollment_token=TOKEN), timeout=10).credential)
        _, header, payload = _task_and_update(stub, md, "drain-1")
        stream = _PausableUpload(header, payload, chunk=16 * 1024)
        future = stub.UploadUpdate.future(iter(stream), timeout=60, metadata=md)
        assert stream.first_chunk_sent.wait(30)
        assert fed.coordinator_proc is not None
        fed.coordinator_proc.send_signal(signal.SIGTERM)
        # New calls are refused while the server drains...
        until = time.monotonic() + 30
        refused: grpc.StatusCode | None = None
        while refused is None:
            try:
                stub.Heartbeat(fleet_pb2.HeartbeatRequest(), timeout=2, metadata=md)
            except grpc.RpcError as err:
                refused = err.code()  # type: ignore[attr-defined]
                break
            assert time.monotonic() < until, "the coordinator kept taking new calls after SIGTERM"
            time.sleep(0.05)
        # grpc.aio answers a call that arrives while it drains either way.
        assert refused in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), refused
        # ...but the upload already in flight finishes and is acknowledged.
        stream.release.set()
        ack = future.result()
        assert ack.accepted and not ack.duplicate
        assert fed.coordinator_proc.wait(60) == 0
        channel.close()

        fed.start_coordinator()
        events = list(fed.events(timeout_s=120))
        assert events[-1].kind == EVENT.KIND_FEDERATION_FINISHED
        rows = fed.ledger()
    assert len(rows) == 1 and rows[0].completed == 1
    assert 0 <= rows[0].clients[0].bytes_up - ack.received_bytes < 256, (
        rows[0].clients[0].bytes_up,
        ack.received_bytes,
    )


def test_a_client_killed_mid_round_comes_back_and_the_federation_finishes(mnist_dir: Path, tmp_path: Path) -> None:
    """A device that dies mid-round (SIGKILL) and restarts joins again under its id, takes its
    task again and the round completes with it; nothing waits beyond the round's deadline."""
    train = load_idx_dataset(mnist_dir, "train")
    shards, _ = write_shards(train, tmp_path / "shards", n_clients=3, alpha=1.0, seed=8, samples_per_class=200)
    config = _config(
        tmp_path / "state",
        _free_port(),
        mnist_dir,
        rounds=3,
        clients_per_round=3,
        min_clients=3,
        min_completed=3,
        round_timeout_s=120,
    )
    with LocalFederation(config, shards, tmp_path, client_log_level="INFO") as fed:
        fed.start_coordinator()
        fed.start_clients(TOKEN)
        for event in fed.events(timeout_s=300):
            if event.kind == EVENT.KIND_ROUND_OPENED and event.round == 1:
                break
        fed.client_procs[1].kill()  # client-01 dies with its task for round 1 in hand (or about to be)
        fed.client_procs[1].wait()
        fed.restart_client(1, TOKEN)
        events = list(fed.events(timeout_s=300))
        assert events[-1].kind == EVENT.KIND_FEDERATION_FINISHED
        assert fed.wait_clients(timeout_s=120) == [0, 0, 0]
        rows = fed.ledger()
    assert [r.round for r in rows] == [0, 1, 2]
    assert all(r.completed == 3 for r in rows)
    assert {c.client_id for c in rows[1].clients if c.outcome == "completed"} == {"client-00", "client-01", "client-02"}


def test_an_acknowledged_update_is_never_left_out_of_its_round(tmp_path: Path) -> None:
    """The round's deadline passes while an update is being written (a slow fsync): the update is
    either in the round or refused; it is never acknowledged and then recorded as dropped."""
    import asyncio

    from fedgen.coordinator.assignments import TrainAssignment
    from fedgen.coordinator.intake import UploadHeader
    from fedgen.coordinator.records import ClientProfile, UpdateRecord
    from fedgen.coordinator.server import build_federation

    async def scenario() -> tuple[object, dict[str, str]]:
        cfg = parse_config(
            {
                "state_dir": str(tmp_path / "state"),
                "data": {"test_data_dir": "builtin"},
                "federation": {
                    "strategy": "fedavg",
                    "rounds": 1,
                    "clients_per_round": 2,
                    "min_clients": 2,
                    "min_completed": 1,
                    "round_timeout_s": 1.0,
                },
                "auth": {"enrollment_tokens": [TOKEN]},
            }
        )
        fed = await build_federation(cfg)
        a, credential_a = await fed.join(TOKEN, ClientProfile(), "a")
        b, credential_b = await fed.join(TOKEN, ClientProfile(), "b")
        for credential in (credential_a, credential_b):  # both call once: only then may they be sampled
            fed.authenticate(credential)
        engine = asyncio.create_task(fed.run())
        ta, tb = await fed.poll(a, 5), await fed.poll(b, 5)
        assert isinstance(ta, TrainAssignment) and isinstance(tb, TrainAssignment)
        payload = bundle_to_bytes(encode_state(fed.load_state(ta.model.sha256), Encoding()))

        def header(t: TrainAssignment, key: str) -> UploadHeader:
            return UploadHeader(
                t.round, t.task_id, key, 10, (1,) * 10, len(payload), hashlib.sha256(payload).hexdigest(), {}, 0.0
            )

        await fed.accept_upload(a, header(ta, "ka"), payload, len(payload))
        real_add = fed.store.add_update

        async def slow_add(u: UpdateRecord) -> None:  # a slow fsync: the deadline passes meanwhile
            await asyncio.sleep(max(0.0, ta.deadline_unix_ms / 1000 - time.time()) + 0.3)
            await real_add(u)

        fed.store.add_update = slow_add  # type: ignore[method-assign]
        try:
            ack: object = await fed.accept_upload(b, header(tb, "kb"), payload, len(payload))
        except Exception as err:  # refused is fine: it was not acknowledged
            ack = err
        await engine
        row = (await fed.ledger())[0]
        await fed.close()
        return ack, {c.client_id: c.outcome for c in row.clients}

    ack, outcomes = asyncio.run(scenario())
    assert outcomes["a"] == "completed"
    if isinstance(ack, Exception):
        assert outcomes["b"] == "dropped"
    else:
        assert ack.round == 0 and outcomes["b"] == "completed", (ack, outcomes)
