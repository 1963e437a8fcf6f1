"""Client credentials expire; real edge clients notice and join again with their enrollment token."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from fedgen.coordinator.config import parse_config
from fedgen.coordinator.local import LocalFederation, write_shards
from fedgen.core.data import load_idx_dataset
from fedgen.core.transport import bearer_metadata, channel_options
from fedgen.v1 import control_pb2, control_pb2_grpc, fleet_pb2, fleet_pb2_grpc

pytestmark = pytest.mark.integration

TOKEN = "ttl-test-enrollment-token"
TTL_S = 1.5


def test_expired_credentials_are_refused_and_clients_join_again(mnist_dir: Path, tmp_path: Path) -> None:
    train = load_idx_dataset(mnist_dir, "train")
    shards, _ = write_shards(train, tmp_path / "shards", n_clients=2, alpha=1.0, seed=6, samples_per_class=100)
    config = parse_config(
        {
            "state_dir": str(tmp_path / "state"),
            "server": {"address": "127.0.0.1:0", "max_poll_wait_s": 0.5},
            "federation": {
                "strategy": "fedavg",
                "rounds": 3,
                "clients_per_round": 2,
                "min_clients": 2,
                "min_completed": 2,
                "round_timeout_s": 120,
            },
            "training": {"local_steps": 5},
            "data": {"test_data_dir": str(mnist_dir)},
            "auth": {"enrollment_tokens": [TOKEN], "credential_ttl_s": TTL_S},
        }
    )
    with LocalFederation(config, shards, tmp_path) as fed:
        fed.start_coordinator()
        with grpc.insecure_channel(fed.address, channel_options()) as channel:
            stub = fleet_pb2_grpc.FleetStub(channel)
            md = bearer_metadata(stub.Join(fleet_pb2.JoinRequest(enrollment_token=TOKEN), timeout=5).credential)
            stub.Heartbeat(fleet_pb2.HeartbeatRequest(), timeout=5, metadata=md)
            time.sleep(TTL_S + 0.5)  # let the credential age past its TTL (no timing is asserted)
            with pytest.raises(grpc.RpcError) as err:
                stub.Heartbeat(fleet_pb2.HeartbeatRequest(), timeout=5, metadata=md)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "expired" in err.value.details()
            # This client never comes back: with an expired credential it is not sampled.

            control = control_pb2_grpc.ControlStub(channel)
            control.Pause(control_pb2.PauseRequest(), timeout=5)  # hold round 0 while the clients' credentials age
            fed.start_clients(TOKEN)
            until = time.monotonic() + 120
            while control.GetStatus(control_pb2.GetStatusRequest(), timeout=5).connected_clients < 2:
                assert time.monotonic() < until, "clients did not join"
                time.sleep(0.2)
            time.sleep(TTL_S + 1.0)
            control.Resume(control_pb2.ResumeRequest(), timeout=5)
        events = list(fed.events(timeout_s=300))
        assert events[-1].kind == control_pb2.RoundEvent.KIND_FEDERATION_FINISHED
        assert fed.wait_clients(timeout_s=120) == [0, 0]
        rows = fed.ledger()
    assert [r.round for r in rows] == [0, 1, 2] and all(r.completed == 2 for r in rows)
    logs = [(tmp_path / f"{s.stem}.log").read_text() for s in shards]
    assert all("expired" in log and "joining again" in log for log in logs), logs
