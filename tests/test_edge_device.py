"""The edge client on a device: its memory budget, its readiness probes, its light install."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from fedgen.coordinator.config import parse_config
from fedgen.coordinator.local import LocalFederation, write_shards
from fedgen.core.data import load_idx_dataset
from fedgen.core.models import Classifier, state_to_numpy
from fedgen.core.task import prepare
from fedgen.edge.budget import (
    MIB,
    TaskNeeds,
    available_memory_mib,
    effective_budget_mib,
    freeze_start_up,
    peak_rss_mib,
    plan_task,
    release_free_memory,
    reset_peak_rss,
    rss_mib,
)
from fedgen.edge.conditions import combine, command_probe, on_mains_power
from fedgen.edge.trainer import LocalTrainer, TrainPlan
from fedgen.v1 import control_pb2, control_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
TOKEN = "edge-test-enrollment-token"
MODEL_BYTES = 106_481
#: A readiness probe that always answers "not ready", with a reason.
NOT_READY_COMMAND = "sh -c \"echo 'on battery (12%)'; exit 1\""
GENERATOR_BYTES = 80_000


# ------------------------------------------------------------------ the budget, as pure functions


def test_a_task_fits_at_full_batch_when_memory_is_plenty() -> None:
    plan = plan_task(300.0, 1024.0, TaskNeeds(MODEL_BYTES, GENERATOR_BYTES, 32, 32))
    assert plan.fits and plan.micro_batch == 32 and 300 < plan.needed_mib < 1024


def test_a_tight_budget_trains_in_micro_batches_and_a_tiny_one_declines() -> None:
    needs = TaskNeeds(MODEL_BYTES, GENERATOR_BYTES, 32, 32)
    full = plan_task(300.0, None, needs).needed_mib
    one = plan_task(300.0, 1e9, TaskNeeds(MODEL_BYTES, GENERATOR_BYTES, 1, 32)).needed_mib
    tight = plan_task(300.0, (full + one) / 2, needs)
    assert tight.fits and 1 <= tight.micro_batch < 32 and tight.needed_mib <= (full + one) / 2
    tiny = plan_task(300.0, 256.0, needs)
    assert not tiny.fits and "budget 256 MiB" in tiny.reason and tiny.needed_mib > 256


def test_the_budget_never_exceeds_what_the_os_can_give() -> None:
    assert effective_budget_mib(4096, available_mib=500, current_rss_mib=300) == 800
    assert effective_budget_mib(384, available_mib=5000, current_rss_mib=300) == 384
    assert effective_budget_mib(0, available_mib=500, current_rss_mib=300) == 800  # undeclared: what there is
    assert effective_budget_mib(0, None, None) is None


def test_rss_is_measured_from_proc_and_the_peak_resets() -> None:
    now = rss_mib()
    assert now is not None and now > 10 and available_memory_mib() is not None
    block = np.ones(64 * MIB // 8)  # 64 MiB, touched
    high = peak_rss_mib()
    del block
    assert high is not None and high >= now + 50
    assert reset_peak_rss()
    after = peak_rss_mib()
    assert after is not None and after < high - 40  # the peak now starts from here


class _Node:
    def __init__(self) -> None:
        self.other: _Node = self


def test_a_frozen_start_up_still_frees_what_a_round_left_in_cycles() -> None:
    """The client freezes start-up's objects so its per-round collection walks only the round's;
    the garbage a round leaves in reference cycles must still be freed before the next plan."""
    try:
        freeze_start_up()
        assert gc.get_freeze_count() > 1000  # pytest, numpy, torch: everything alive so far
        cycle = _Node()
        dead = weakref.ref(cycle)
        del cycle
        assert dead() is not None  # a cycle is not freed by reference counting
        release_free_memory()
        assert dead() is None
    finally:
        gc.unfreeze()


def test_micro_batches_add_up_to_the_same_step() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 28, 28), dtype=np.uint8)  # raw bytes, normalised per batch
    labels = rng.integers(0, 10, 64)
    state = state_to_numpy(Classifier())
    plan = TrainPlan(3, 16, 0.05, "fedavg")
    mnist = prepare("mnist")
    full = LocalTrainer(mnist, images, labels, seed=1).train(state, plan)
    micro = LocalTrainer(mnist, images, labels, seed=1).train(state, TrainPlan(3, 16, 0.05, "fedavg", micro_batch=4))
    assert full.label_counts == micro.label_counts
    # BatchNorm sees 4 examples at a time instead of 16, so the steps are close, not identical.
    diff = max(float(np.abs(full.state[k] - micro.state[k]).max()) for k in full.state if k.endswith("weight"))
    assert 0 < diff < 0.05


# ------------------------------------------------------------------ readiness probes


def test_mains_probe_reads_sysfs(tmp_path: Path) -> None:
    assert on_mains_power(tmp_path / "absent") is None  # no power-supply reporting: a board on mains
    bat = tmp_path / "BAT0"
    bat.mkdir()
    (bat / "type").write_text("Battery\n")
    (bat / "capacity").write_text("38\n")
    assert on_mains_power(tmp_path) == "on battery (38%)"
    ac = tmp_path / "AC"
    ac.mkdir()
    (ac / "type").write_text("Mains\n")
    (ac / "online").write_text("1\n")
    assert on_mains_power(tmp_path) is None


@pytest.mark.integration
def test_command_probe_and_combination() -> None:
    assert command_probe("true")() is None
    assert command_probe("sh -c 'echo metered link; exit 1'")() == "metered link"
    assert command_probe("false")() == "readiness probe exited 1"
    assert combine([command_probe("true"), command_probe("sh -c 'echo nope; exit 3'")])() == "nope"


# ------------------------------------------------------------------ a light install

COORDINATOR_ONLY = (
    "coordinator",
    "onnx",
    "grpc_health",
    "grpc_reflection",
    "rich",
    "matplotlib",
    "pydantic",
    "fedgen.export.onnx_export",
    "torch.onnx",
)


@pytest.mark.integration
def test_the_edge_client_imports_nothing_coordinator_only() -> None:
    """A fresh interpreter where the coordinator-only packages cannot be imported (as on a device
    with the base install) imports and sets up the whole edge client, and loads none of them."""
    blocked = [m for m in COORDINATOR_ONLY if "." not in m]
    code = f"""
import importlib.abc, json, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (coordinator-only)")
        return None
sys.meta_path.insert(0, Absent())
import fedgen.edge.cli, fedgen.edge.runner, fedgen.edge.generator_runtime, fedgen.edge.budget, fedgen.edge.conditions
fedgen.edge.cli.build_parser()
print(json.dumps(sorted(sys.modules)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert not [m for m in COORDINATOR_ONLY if m in loaded]


# ------------------------------------------------------------------ over the wire


@pytest.mark.integration
def test_budget_and_conditions_decide_who_is_sampled(mnist_dir: Path, tmp_path: Path) -> None:
    """client-00 trains; client-01's budget cannot hold a round, so it declines (and is not sampled
    for that kind of task again); client-02 is never ready by its own probe. The ledger says why."""
    train = load_idx_dataset(mnist_dir, "train")
    test = load_idx_dataset(mnist_dir, "test")
    shards, _ = write_shards(
        train, tmp_path / "shards", n_clients=3, alpha=1.0, seed=9, samples_per_class=100, test=test
    )
    config = parse_config(
        {
            "state_dir": str(tmp_path / "state"),
            "server": {"address": "127.0.0.1:0"},
            "federation": {
                "strategy": "fedgen",
                "rounds": 3,
                "clients_per_round": 3,
                "min_clients": 1,
                "min_completed": 1,
                "round_timeout_s": 120,
                "seed": 2,
            },
            "training": {"local_steps": 5},
            "fedgen": {"device": "cpu"},
            "data": {"test_data_dir": str(mnist_dir)},
            "auth": {"enrollment_tokens": [TOKEN]},
        }
    )
    per_client = {1: ["--memory-budget-mb", "100"], 2: ["--ready-command", NOT_READY_COMMAND]}
    with LocalFederation(config, shards, tmp_path, per_client_args=per_client, client_log_level="INFO") as fed:
        fed.start_coordinator()
        with fed.channel() as channel:
            control = control_pb2_grpc.ControlStub(channel)
            control.Pause(control_pb2.PauseRequest(), timeout=5)  # round 0 waits for all three
            fed.start_clients(TOKEN)
            until = time.monotonic() + 180
            # Eligible means joined and heard from since with the credential (a first poll): wait for both.
            status = control.GetStatus(control_pb2.GetStatusRequest(), timeout=5)
            while status.connected_clients < 3 or status.eligible_clients < 2:
                assert time.monotonic() < until, f"clients did not join and poll: {status}"
                time.sleep(0.2)
                status = control.GetStatus(control_pb2.GetStatusRequest(), timeout=5)
            assert status.eligible_clients == 2  # client-02 is connected but not ready
            control.Resume(control_pb2.ResumeRequest(), timeout=5)
        events = list(fed.events(timeout_s=300))
        assert events[-1].kind == control_pb2.RoundEvent.KIND_FEDERATION_FINISHED
        assert fed.wait_clients(timeout_s=120) == [0, 0, 0]
        rows = fed.ledger()

    assert [r.round for r in rows] == [0, 1, 2]
    r0 = rows[0]
    outcomes = {c.client_id: (c.outcome, c.reason) for c in r0.clients}
    assert outcomes["client-00"][0] == "completed"
    assert outcomes["client-01"][0] == "declined" and "memory: needs" in outcomes["client-01"][1]
    assert "budget 100 MiB" in outcomes["client-01"][1] and r0.declined == 1
    assert {s.client_id: s.reason for s in r0.skipped} == {"client-02": "not ready: on battery (12%)"}
    for r in rows[1:]:
        assert [c.client_id for c in r.clients] == ["client-00"] and r.completed == 1
        skipped = {s.client_id: s.reason for s in r.skipped}
        assert skipped["client-02"] == "not ready: on battery (12%)"
        assert skipped["client-01"].startswith("declined this kind of task: needs")
    # What each round cost the device, measured on it, is in the ledger.
    for r in rows:
        (entry,) = [c for c in r.clients if c.client_id == "client-00"]
        m = entry.metrics
        assert m["peak_rss_mb"] >= m["rss_before_mb"] > 50 and m["cpu_seconds"] > 0
        assert m["peak_rss_mb"] <= m["memory_budget_mb"]
        assert r.extras["client_peak_rss_mb_max"] == m["peak_rss_mb"]


# ------------------------------------------------------------------ a corrupt artifact on the way


class _HostileFleet:
    """A server that answers DownloadArtifact with bytes that do not match the id asked for
    (what a corrupting link or a compromised proxy would deliver)."""

    def __init__(self, good: bytes, truncate: bool) -> None:
        self.good, self.truncate, self.calls = good, truncate, 0

    def DownloadArtifact(self, request, context):  # type: ignore[no-untyped-def]
        from fedgen.v1 import fleet_pb2

        self.calls += 1
        data = self.good[: len(self.good) // 2] if self.truncate else bytes([self.good[0] ^ 0xFF]) + self.good[1:]
        yield fleet_pb2.ArtifactChunk(
            artifact_id=request.artifact_id, offset=request.offset, data=data[request.offset :], total_size=len(data)
        )


@pytest.mark.integration
@pytest.mark.parametrize("truncate", [False, True], ids=["flipped-byte", "truncated"])
def test_an_artifact_that_fails_its_digest_is_never_used(tmp_path: Path, truncate: bool) -> None:
    import hashlib
    from concurrent import futures

    import grpc

    from fedgen.edge.connection import FleetCallError, FleetConnection
    from fedgen.v1 import fleet_pb2

    good = b"generator-or-model-bytes" * 100
    hostile = _HostileFleet(good, truncate)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "fedgen.v1.Fleet",
                {
                    "DownloadArtifact": grpc.unary_stream_rpc_method_handler(
                        hostile.DownloadArtifact,
                        request_deserializer=fleet_pb2.DownloadRequest.FromString,
                        response_serializer=fleet_pb2.ArtifactChunk.SerializeToString,
                    )
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        conn = FleetConnection(f"127.0.0.1:{port}")
        conn._credential = "x.y"  # the hostile server does not check it
        digest = hashlib.sha256(good).hexdigest()
        ref = fleet_pb2.ArtifactRef(artifact_id=digest, size_bytes=len(good))
        with pytest.raises(FleetCallError) as err:
            conn.fetch_artifact(ref, tmp_path / "cache")
        assert err.value.code == grpc.StatusCode.DATA_LOSS and "failed its digest check" in err.value.message
        assert list((tmp_path / "cache").iterdir()) == []  # nothing kept, nothing to be used later
        conn.close()
    finally:
        server.stop(0)
    assert hostile.calls == 1  # the client asked once; the runner decides whether to try again


def test_the_enrollment_token_comes_from_a_file_or_the_environment(tmp_path: Path) -> None:
    """A token on the command line is readable by every local user (ps); a file or the environment is not."""
    from fedgen.edge.cli import TOKEN_ENV, TokenError, resolve_token

    secret = tmp_path / "token"
    secret.write_text("s3cret-enrollment\n")
    assert resolve_token(None, secret, {}) == "s3cret-enrollment"
    assert resolve_token(None, None, {TOKEN_ENV: " from-env-token "}) == "from-env-token"
    assert resolve_token("on-the-line", None, {TOKEN_ENV: "env"}) == "on-the-line"
    with pytest.raises(TokenError, match=r"no enrollment token: give --token-file PATH, set \$FEDGEN_ENROLLMENT_TOKEN"):
        resolve_token(None, None, {})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(TokenError, match=r"is empty: its first line must be the enrollment token"):
        resolve_token(None, tmp_path / "empty", {})
    with pytest.raises(TokenError, match=r"cannot read it"):
        resolve_token(None, tmp_path / "missing", {})
