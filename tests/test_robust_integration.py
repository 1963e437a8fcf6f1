"""One hostile client against a real federation (a coordinator process, 3 edge-client processes,
real MNIST, real sockets), with and without the defences of ``[robust]``.

The attacker is a protocol-level client in this test process: every round it is sampled into, it
downloads the global model and uploads it multiplied by 1e30 (finite, valid, accepted), which
under FedAvg's plain mean sets the global model to garbage.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from test_federation_integration import TOKEN, RawClient

from fedgen.coordinator.config import parse_config
from fedgen.coordinator.local import LocalFederation, write_shards
from fedgen.core.data import load_idx_dataset
from fedgen.export.codec import Encoding, bundle_from_bytes, bundle_to_bytes, decode_state, encode_state
from fedgen.v1 import control_pb2, fleet_pb2

pytestmark = pytest.mark.integration

ROUNDS = 4


class Attacker(threading.Thread):
    """Scales the global model by ``scale`` in the rounds listed (a stale copy in the others)."""

    def __init__(self, address: str, attack_rounds: set[int], scale: float = 1e30) -> None:
        super().__init__(daemon=True)
        self.client = RawClient(address, "attacker")
        self.attack_rounds, self.scale = attack_rounds, scale
        self.acks: dict[int, bool] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        c = self.client
        try:
            while True:
                task = c.stub.PollTask(fleet_pb2.PollTaskRequest(max_wait_ms=2000), timeout=10, metadata=c.md)
                if task.HasField("done"):
                    return
                if not task.HasField("train") or task.train.round in self.acks:
                    continue
                train = task.train
                chunks = c.download(train.global_model.artifact_id)
                model = decode_state(bundle_from_bytes(b"".join(x.data for x in chunks)))
                scale = self.scale if train.round in self.attack_rounds else 1.0
                update = {k: (v * scale).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in model.items()}
                payload = bundle_to_bytes(encode_state(update, Encoding()))
                self.acks[train.round] = c.upload(train, payload, f"attack-{train.round}").accepted
        except grpc.RpcError as err:  # the federation ended under us: fine once every round was played
            if len(self.acks) < ROUNDS:
                self.error = err


def run_federation(mnist_dir: Path, work: Path, robust: dict[str, Any], attack_rounds: set[int]) -> list[Any]:
    train = load_idx_dataset(mnist_dir, "train")
    shards, _ = write_shards(train, work / "shards", n_clients=3, alpha=1.0, seed=1, samples_per_class=300)
    config = parse_config(
        {
            "state_dir": str(work / "state"),
            "server": {"address": "127.0.0.1:0"},
            "federation": {
                "strategy": "fedavg",
                "rounds": ROUNDS,
                "clients_per_round": 4,
                "min_clients": 4,
                "min_completed": 4,
                "round_timeout_s": 60,
                "seed": 3,
            },
            "training": {"local_steps": 20, "learning_rate": 0.05},
            "data": {"test_data_dir": str(mnist_dir)},
            "auth": {"enrollment_tokens": [TOKEN]},
            "robust": robust,
        }
    )
    with LocalFederation(config, shards, work) as fed:
        fed.start_coordinator()
        attacker = Attacker(fed.address, attack_rounds)
        attacker.start()
        fed.start_clients(TOKEN)
        events = list(fed.events(timeout_s=600))
        assert events[-1].kind == control_pb2.RoundEvent.KIND_FEDERATION_FINISHED
        attacker.join(timeout=60)
        assert attacker.error is None, attacker.error
        assert attacker.acks == dict.fromkeys(range(ROUNDS), True)  # every attack was accepted as valid
        assert fed.wait_clients(timeout_s=120) == [0, 0, 0]
        return list(fed.ledger())


def test_a_model_that_collapses_is_not_committed_and_the_federation_recovers(mnist_dir: Path, tmp_path: Path) -> None:
    """Plain mean, one attack in round 1: the guard keeps round 0's model, later rounds go on."""
    rows = run_federation(mnist_dir, tmp_path, {"max_accuracy_drop": 0.3}, attack_rounds={1})
    assert [r.round for r in rows] == list(range(ROUNDS))
    assert rows[1].extras["global_model_kept_accuracy_drop"] == 1.0
    assert rows[1].extras["candidate_test_accuracy"] < rows[0].test_accuracy - 0.3
    assert rows[1].model_sha256 == rows[0].model_sha256 and rows[1].test_accuracy == rows[0].test_accuracy
    for r in rows[2:]:  # honest updates are accepted again and the model moves on
        assert r.completed == 4 and r.rejected == 0 and "global_model_kept_accuracy_drop" not in r.extras
        assert r.model_sha256 != rows[0].model_sha256
    assert rows[-1].test_accuracy > 0.7, [r.test_accuracy for r in rows]


@pytest.mark.parametrize("robust", [{"aggregator": "median"}, {"clip_norm": 5.0}], ids=["median", "clip"])
def test_a_defence_keeps_an_attacker_in_every_round_from_the_model(
    robust: dict[str, Any], mnist_dir: Path, tmp_path: Path
) -> None:
    rows = run_federation(mnist_dir, tmp_path, robust, attack_rounds=set(range(ROUNDS)))
    assert [r.round for r in rows] == list(range(ROUNDS))
    for r in rows:
        assert r.completed == 4 and r.rejected == 0, (r.round, r.completed, r.rejected)
        assert r.extras["robust_max_update_norm"] > 1e29  # the attack arrived, every round
        assert np.isfinite(r.test_accuracy)
    if "clip_norm" in robust:
        assert all(r.extras["robust_clipped_updates"] >= 1 for r in rows)
    assert rows[-1].test_accuracy > 0.7, [r.test_accuracy for r in rows]
