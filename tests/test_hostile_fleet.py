"""Attacks on identity and resources against a real coordinator process over real sockets, while
two real edge-client processes train on real MNIST beside them.

Each test plays one attack from this test process and asserts the status code the attacker gets,
that the coordinator's memory and descriptors stay bounded, and that the honest clients keep
committing rounds. The federation is shared by the module (one coordinator start); the lockout
test runs last because it locks this machine's address out of Join for a while.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from test_federation_integration import TOKEN, RawClient

from fedgen.coordinator.config import parse_config
from fedgen.coordinator.local import LocalFederation, write_shards
from fedgen.core.data import load_idx_dataset
from fedgen.core.transport import bearer_metadata, channel_options
from fedgen.v1 import control_pb2, fleet_pb2, fleet_pb2_grpc

pytestmark = pytest.mark.integration

OPERATOR = "hostile-operator-token"
PUSHBACK = "grpc-retry-pushback-ms"
MAX_UNPROVEN = 40


def _config(mnist_dir: Path, work: Path, **federation: Any) -> Any:
    return parse_config(
        {
            "state_dir": str(work / "state"),
            "server": {
                "address": "127.0.0.1:0",
                "handshake_timeout_s": 1.0,
                "idle_connection_s": 5.0,
                "upload_idle_s": 1.5,
                "max_upload_buffer_bytes": 4 * 1024 * 1024,
            },
            "federation": {
                "strategy": "fedavg",
                "rounds": 10_000,
                "clients_per_round": 2,
                "min_clients": 2,
                "min_completed": 2,
                "round_timeout_s": 30,
                "heartbeat_timeout_s": 20,
                "seed": 5,
                **federation,
            },
            "training": {"local_steps": 2, "learning_rate": 0.05},
            "data": {"test_data_dir": str(mnist_dir), "evaluate_every": 1000},
            "auth": {
                "enrollment_tokens": [TOKEN],
                "operator_token": OPERATOR,
                "failed_auth_per_peer_per_second": 0.5,
                "failed_auth_burst_per_peer": 20,
                "max_unproven_clients": MAX_UNPROVEN,
            },
        }
    )


@pytest.fixture(scope="module")
def fed(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    work = tmp_path_factory.mktemp("hostile")
    train = load_idx_dataset(mnist_dir, "train")
    shards, _ = write_shards(train, work / "shards", n_clients=2, alpha=1.0, seed=1, samples_per_class=60)
    with LocalFederation(
        _config(mnist_dir, work), shards, work, extra_client_args=["--call-timeout-s", "4", "--give-up-after-s", "120"]
    ) as f:
        f.start_coordinator()
        f.start_clients()
        _wait_round(f, 2, timeout_s=120)
        yield f


@pytest.fixture(scope="module")
def witness(fed: LocalFederation) -> RawClient:
    """A protocol-level client joined before any attack, that proves its credential once."""
    client = RawClient(fed.address, "lockout-witness")
    client.stub.Heartbeat(fleet_pb2.HeartbeatRequest(), timeout=10, metadata=client.md)
    return client


def _status(fed: LocalFederation) -> control_pb2.Status:
    with fed.channel() as channel:
        return fed.control(channel).GetStatus(
            control_pb2.GetStatusRequest(), timeout=10, metadata=bearer_metadata(OPERATOR)
        )


def _wait_round(fed: LocalFederation, round_: int, timeout_s: float = 90) -> None:
    until = time.monotonic() + timeout_s
    while time.monotonic() < until:
        if _status(fed).current_round >= round_:
            return
        assert all(p.poll() is None for p in fed.client_procs), "an honest client exited"
        time.sleep(0.3)
    raise AssertionError(f"round {round_} not reached in {timeout_s} s")


def _honest_keep_training(fed: LocalFederation, rounds: int = 2) -> None:
    """The honest clients commit `rounds` more rounds after an attack."""
    _wait_round(fed, _status(fed).current_round + rounds)


def _coordinator(fed: LocalFederation) -> psutil.Process:
    assert fed.coordinator_proc is not None
    return psutil.Process(fed.coordinator_proc.pid)


def _rpc_error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def _pushback_ms(err: grpc.RpcError) -> int | None:
    for key, value in err.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == PUSHBACK:
            return int(value)
    return None


def test_an_impostor_with_the_fleet_token_cannot_take_over_an_id(fed: LocalFederation, witness: RawClient) -> None:
    owner = RawClient(fed.address, "victim-device")
    stub = owner.stub
    err = _rpc_error(
        lambda: stub.Join(
            fleet_pb2.JoinRequest(enrollment_token=TOKEN, requested_client_id="victim-device"), timeout=10
        )
    )
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "previous_credential" in (err.details() or "")
    # The honest clients' ids are as safe: their credentials keep working (they keep training).
    err = _rpc_error(
        lambda: stub.Join(fleet_pb2.JoinRequest(enrollment_token=TOKEN, requested_client_id="client-00"), timeout=10)
    )
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    stub.Heartbeat(fleet_pb2.HeartbeatRequest(), timeout=10, metadata=owner.md)  # the owner never noticed
    _honest_keep_training(fed)
    owner.leave()


def test_a_client_cannot_hold_more_calls_open_than_its_share(fed: LocalFederation) -> None:
    """Eight long polls of one id are held; the ninth is refused with a time to retry, and once
    the polls return the id is served again. The honest clients never notice."""
    greedy = RawClient(fed.address, "greedy")
    # Not ready, so it is never sampled: its polls wait their whole time instead of getting a task.
    busy = fleet_pb2.DeviceState(not_ready=True, reason="holding calls open")
    greedy.stub.Heartbeat(fleet_pb2.HeartbeatRequest(state=busy), timeout=10, metadata=greedy.md)
    request = fleet_pb2.PollTaskRequest(max_wait_ms=4000, state=busy)
    held = [greedy.stub.PollTask.future(request, timeout=20, metadata=greedy.md) for _ in range(8)]
    time.sleep(1.0)  # all eight admitted and waiting
    refused = _rpc_error(lambda: greedy.stub.PollTask(request, timeout=20, metadata=greedy.md))
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "already has 8 calls in flight (server.max_calls_per_client)" in (refused.details() or "")
    assert (_pushback_ms(refused) or 0) > 0
    for call in held:
        call.result(timeout=20)
    greedy.stub.Heartbeat(fleet_pb2.HeartbeatRequest(), timeout=10, metadata=greedy.md)
    _honest_keep_training(fed)


def test_oversized_and_overlong_join_profiles_are_refused_before_they_cost_memory(fed: LocalFederation) -> None:
    process = _coordinator(fed)
    rss_before = process.memory_info().rss
    with grpc.insecure_channel(fed.address, channel_options()) as channel:
        stub = fleet_pb2_grpc.FleetStub(channel)
        huge = fleet_pb2.DeviceProfile(platform="x" * 1_500_000)
        for k in range(20):
            err = _rpc_error(
                lambda k=k: stub.Join(
                    fleet_pb2.JoinRequest(enrollment_token=TOKEN, requested_client_id=f"big-{k}", profile=huge),
                    timeout=10,
                )
            )
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "exceeds this call's limit of 16384" in (err.details() or "")
        many = fleet_pb2.DeviceProfile(supported_encodings=[1] * 1000)
        err = _rpc_error(lambda: stub.Join(fleet_pb2.JoinRequest(enrollment_token=TOKEN, profile=many), timeout=10))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "profile.supported_encodings has 1000 entries, at most 16" in (err.details() or "")
    # 20 x 1.5 MB took it from 306 MB to 2.5 GB before; now nothing of them is kept.
    assert process.memory_info().rss - rss_before < 150 * 1024 * 1024
    _honest_keep_training(fed)


def test_ids_that_only_join_are_capped_and_never_sampled(fed: LocalFederation) -> None:
    with grpc.insecure_channel(fed.address, channel_options()) as channel:
        stub = fleet_pb2_grpc.FleetStub(channel)
        codes: list[grpc.StatusCode] = []
        pushbacks: list[int | None] = []
        for k in range(MAX_UNPROVEN + 20):
            try:
                stub.Join(fleet_pb2.JoinRequest(enrollment_token=TOKEN, requested_client_id=f"fake-{k}"), timeout=10)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())
                pushbacks.append(_pushback_ms(err))
    # The cap counts joins that never called; an honest rejoin since the fixture started may hold a slot.
    assert MAX_UNPROVEN - 3 <= codes.count(grpc.StatusCode.OK) <= MAX_UNPROVEN
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all(p is not None and p > 0 for p in pushbacks)  # a time to come back is given
    first = _status(fed).current_round
    _honest_keep_training(fed, rounds=3)  # 200 fake ids cut 237 committed rounds to 1 before
    for row in fed.ledger():
        if row.round >= first:
            assert not any(c.client_id.startswith("fake-") for c in row.clients), row.round


def test_idle_sockets_are_closed_and_descriptors_come_back(fed: LocalFederation) -> None:
    process = _coordinator(fed)
    fds_before = process.num_fds()
    sockets = [socket.create_connection(("127.0.0.1", fed.port), timeout=10) for _ in range(200)]
    try:
        time.sleep(0.5)
        assert process.num_fds() >= fds_before + 150  # the server did accept them
        for s in sockets:  # no HTTP/2 preface within server.handshake_timeout_s (1 s): closed
            s.settimeout(10)
            while s.recv(4096):  # the server's SETTINGS frame, then end of stream (a timeout fails)
                pass
    finally:
        for s in sockets:
            s.close()
    until = time.monotonic() + 10
    while process.num_fds() > fds_before + 20 and time.monotonic() < until:
        time.sleep(0.2)
    assert process.num_fds() <= fds_before + 20
    _honest_keep_training(fed)


def test_a_hung_coordinator_is_outlived_by_its_clients(fed: LocalFederation) -> None:
    """SIGSTOP for 3x the clients' call deadline: their calls hit DEADLINE_EXCEEDED and retry."""
    assert fed.coordinator_proc is not None
    os.kill(fed.coordinator_proc.pid, signal.SIGSTOP)
    try:
        time.sleep(12)
    finally:
        os.kill(fed.coordinator_proc.pid, signal.SIGCONT)
    assert all(p.poll() is None for p in fed.client_procs), "an edge client gave up on a hung coordinator"
    _honest_keep_training(fed, rounds=2)


def test_wrong_secrets_lock_the_peer_out_but_not_valid_credentials(fed: LocalFederation, witness: RawClient) -> None:
    """About 1,000 wrong tokens a second were all heard before; now the peer's budget runs out."""
    with grpc.insecure_channel(fed.address, channel_options()) as channel:
        stub = fleet_pb2_grpc.FleetStub(channel)
        codes = []
        for k in range(40):
            err = _rpc_error(
                lambda k=k: stub.Join(fleet_pb2.JoinRequest(enrollment_token=f"guess-{k:08d}"), timeout=10)
            )
            codes.append(err.code())
        assert codes[:15] == [grpc.StatusCode.UNAUTHENTICATED] * 15
        assert codes[-10:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 10
        assert (_pushback_ms(err) or 0) >= 1000
        # While locked out, even the right operator token is not checked from this address...
        with fed.channel() as control_channel:
            control = fed.control(control_channel)
            err = _rpc_error(
                lambda: control.Pause(control_pb2.PauseRequest(), timeout=10, metadata=bearer_metadata(OPERATOR))
            )
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # ...but a valid client credential is: the honest fleet behind this address keeps working.
        witness.stub.Heartbeat(fleet_pb2.HeartbeatRequest(), timeout=10, metadata=witness.md)
        forged = bearer_metadata("lockout-witness.forged")
        err = _rpc_error(lambda: stub.Heartbeat(fleet_pb2.HeartbeatRequest(), timeout=10, metadata=forged))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    time.sleep(2 * (_pushback_ms(err) or 0) / 1000)  # the budget refills: the operator is heard again
    _honest_keep_training(fed)


# ------------------------------------------------------------------ uploads that stall or pile up
def test_a_stalled_upload_is_ended_and_a_second_concurrent_one_refused(mnist_dir: Path, tmp_path: Path) -> None:
    config = _config(mnist_dir, tmp_path, rounds=2, clients_per_round=1, min_clients=1, min_completed=1)
    with LocalFederation(config, [], tmp_path) as fed:
        fed.start_coordinator()
        client = RawClient(fed.address, "staller")
        train = client.poll_train()
        payload = b"\0" * 100_000
        header = fleet_pb2.UpdateHeader(
            round=train.round,
            task_id=train.task_id,
            idempotency_key="stall-1",
            num_examples=10,
            label_counts=[1] * 10,
            payload_bytes=len(payload),
            payload_sha256=hashlib.sha256(payload).hexdigest(),
        )
        release = threading.Event()

        def stalling() -> Iterator[fleet_pb2.UploadMessage]:
            yield fleet_pb2.UploadMessage(header=header)
            yield fleet_pb2.UploadMessage(chunk=payload[:50_000])
            release.wait(30)  # and then nothing: the server's upload_idle_s (1.5 s) ends the stream

        outcome: dict[str, grpc.RpcError] = {}

        def upload() -> None:
            try:
                client.stub.UploadUpdate(stalling(), timeout=30, metadata=client.md)
            except grpc.RpcError as err:
                outcome["stalled"] = err

        thread = threading.Thread(target=upload)
        thread.start()
        time.sleep(0.5)
        second = _rpc_error(
            lambda: client.stub.UploadUpdate(
                iter([fleet_pb2.UploadMessage(header=header)]), timeout=10, metadata=client.md
            )
        )
        assert second.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "already has an upload in flight" in (second.details() or "")
        assert (_pushback_ms(second) or 0) > 0
        thread.join(timeout=20)
        release.set()
        stalled = outcome["stalled"]
        assert stalled.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "upload stalled: no message for 1.5 s" in (stalled.details() or "")
        assert not list((tmp_path / "state" / "incoming").iterdir()), "the stalled upload's scratch file stays"


def test_uploads_in_flight_are_written_to_disk_not_held_in_memory(
    mnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight clients each send 40 MB and wait: 320 MB in flight lie in scratch files, not in the
    coordinator's memory (gRPC's receive buffers still grow it: 30-115 MB seen), and go when their
    streams end."""
    n, size = 8, 40 * 1024 * 1024
    config = _config(mnist_dir, tmp_path, rounds=2, clients_per_round=n, min_clients=n, min_completed=n)
    config = config.model_copy(
        update={
            "server": config.server.model_copy(
                update={"max_upload_buffer_bytes": 512 * 1024 * 1024, "upload_idle_s": 10.0}
            )
        }
    )
    # Large blocks straight from mmap, so a freed one leaves the coordinator's RSS: RSS then
    # measures what is held, not what glibc keeps for reuse.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    with LocalFederation(config, [], tmp_path) as fed:
        fed.start_coordinator()
        clients = [RawClient(fed.address, f"bulk-{i}") for i in range(n)]
        with ThreadPoolExecutor(n) as pool:
            tasks = list(pool.map(lambda c: c.poll_train(), clients))
        process = _coordinator(fed)
        rss_before = process.memory_info().rss
        payload = os.urandom(size)
        release = threading.Event()

        def stalling(task: fleet_pb2.TrainTask, key: str) -> Iterator[fleet_pb2.UploadMessage]:
            yield fleet_pb2.UploadMessage(
                header=fleet_pb2.UpdateHeader(
                    round=task.round,
                    task_id=task.task_id,
                    idempotency_key=key,
                    num_examples=10,
                    label_counts=[1] * 10,
                    payload_bytes=size + 1,  # never complete: one byte is still to come
                    payload_sha256="0" * 64,
                )
            )
            for offset in range(0, size, 1 << 20):
                yield fleet_pb2.UploadMessage(chunk=payload[offset : offset + (1 << 20)])
            release.wait(30)  # then the stream ends, short of what its header declared

        def upload(i: int) -> grpc.StatusCode:
            try:
                clients[i].stub.UploadUpdate(stalling(tasks[i], f"bulk-{i}"), timeout=60, metadata=clients[i].md)
            except grpc.RpcError as err:
                return err.code()
            return grpc.StatusCode.OK

        incoming = tmp_path / "state" / "incoming"
        with ThreadPoolExecutor(n) as pool:
            outcomes = [pool.submit(upload, i) for i in range(n)]
            deadline = time.monotonic() + 20
            while sum(p.stat().st_size for p in incoming.iterdir()) < n * size and time.monotonic() < deadline:
                time.sleep(0.05)
            spooled = sum(p.stat().st_size for p in incoming.iterdir())
            grown = process.memory_info().rss - rss_before
            release.set()
            codes = [o.result(timeout=30) for o in outcomes]
        assert spooled == n * size
        # Held whole, the payloads grew it by more than what was in flight (286 MB for 192 MB).
        assert grown < n * size // 2, f"the coordinator grew {grown} bytes holding {n * size} in flight"
        assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * n  # each stream ended one byte short
        assert not list(incoming.iterdir())
